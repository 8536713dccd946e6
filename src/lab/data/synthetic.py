"""Generated images for tests and smoke runs: one fixed random template per class plus noise, learnable."""
import torch

from lab.data.base import Images, Loaded, TensorDataModule


class Synthetic(TensorDataModule):
    def __init__(self, n_train: int = 512, n_test: int = 128, size: int = 16, in_channels: int = 1,
                 classes: int = 4, noise: float = 0.5, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.n_train, self.n_test, self.size, self.in_channels = n_train, n_test, size, in_channels
        self.classes, self.noise, self.seed = classes, noise, seed

    def _make(self, n: int, g: torch.Generator, templates: torch.Tensor) -> Images:
        y = torch.arange(n) % self.classes  # balanced: every class in every split of reasonable size
        y = y[torch.randperm(n, generator=g)]
        x = templates[y] + self.noise * torch.randn(n, self.in_channels, self.size, self.size, generator=g)
        return Images((x.clamp(0, 1) * 255).round().to(torch.uint8), y)

    def load(self) -> Loaded:
        g = torch.Generator().manual_seed(self.seed)
        templates = torch.rand(self.classes, self.in_channels, self.size, self.size, generator=g)
        return Loaded(self._make(self.n_train, g, templates), self._make(self.n_test, g, templates),
                      [f"class_{i}" for i in range(self.classes)])
