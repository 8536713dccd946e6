"""Augmentation of a whole batch on its own device: one random affine matrix per image, one grid_sample.

torchvision's v2 transforms draw one set of parameters per call, i.e. the same flip/rotation for the
whole batch; here every image gets its own, and no per-sample Python runs.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augment:
    hflip: float = 0.0  # probability of a horizontal flip
    rotation: float = 0.0  # max degrees, uniform in [-rotation, rotation]
    zoom: float = 0.0  # scale uniform in [1 - zoom, 1 + zoom]
    translate: float = 0.0  # max shift as a fraction of the image side, per axis

    @property
    def active(self) -> bool:
        return any((self.hflip, self.rotation, self.zoom, self.translate))

    def matrices(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, 2, 3) affine matrices in affine_grid's normalized coordinates (output -> input)."""
        def uniform(low: float, high: float) -> torch.Tensor:
            return torch.rand(n, device=device, generator=generator) * (high - low) + low

        angle = uniform(-self.rotation, self.rotation) * (math.pi / 180)
        scale = uniform(1 - self.zoom, 1 + self.zoom)
        flip = torch.where(torch.rand(n, device=device, generator=generator) < self.hflip, -1.0, 1.0)
        tx, ty = (uniform(-self.translate, self.translate) * 2 for _ in range(2))  # [-1, 1] spans the side
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        # Sampling grid maps output pixel -> input pixel, so zoom-in (scale>1) shrinks the grid.
        return torch.stack(
            [torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1
        )

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x: (N, C, H, W) float. Pixels moved in from outside the image are zero (black)."""
        if not self.active:
            return x
        theta = self.matrices(x.shape[0], x.device, generator).to(x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
