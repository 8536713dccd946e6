"""The one LightningDataModule behind every dataset: uint8 images held as tensors, batched by index.

A dataset subclass only implements `load()`; everything after (channel conversion, resize, split,
normalization, augmentation, device placement) happens here once, on whole tensors.
"""
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from lab.data.augment import Augment
from lab.errors import LabError


@dataclass
class Images:
    x: torch.Tensor  # (N, C, H, W) uint8
    y: torch.Tensor  # (N,) int64
    paths: list[str] | None = None  # each image's source file (image folders), kept through the split


@dataclass
class Loaded:
    train: Images
    test: Images | None  # None: carved out of train
    class_names: list[str]


class IndexBatches:
    """Yields (x, y) slices of tensors; shuffling draws one permutation per epoch on the tensors' device."""

    def __init__(self, images: Images, batch_size: int, shuffle: bool):
        self.images, self.batch_size, self.shuffle = images, batch_size, shuffle

    def __len__(self) -> int:
        return -(-len(self.images.y) // self.batch_size)

    def __iter__(self):
        n = len(self.images.y)
        order = torch.randperm(n, device=self.images.y.device) if self.shuffle else None
        for start in range(0, n, self.batch_size):
            if order is None:
                yield self.images.x[start : start + self.batch_size], self.images.y[start : start + self.batch_size]
            else:
                idx = order[start : start + self.batch_size]
                yield self.images.x[idx], self.images.y[idx]


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size), antialiased; done in chunks to bound memory."""
    if x.shape[-2:] == (size, size):
        return x
    out = [
        F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        .round_()
        .clamp_(0, 255)
        .to(torch.uint8)
        for chunk in x.split(4096)
    ]
    return torch.cat(out)


def to_channels(x: torch.Tensor, channels: int | None) -> torch.Tensor:
    if channels is None or x.shape[1] == channels:
        return x
    if channels == 1 and x.shape[1] == 3:  # ITU-R 601 luma, as PIL's convert("L")
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (x.float() * weights).sum(1, keepdim=True).round_().to(torch.uint8)
    if channels == 3 and x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1).contiguous()
    raise LabError(f"data.channels={channels} is not valid: use 1 (grayscale), 3 (RGB) or null (as stored).")


class TensorDataModule(pl.LightningDataModule):
    @classmethod
    def small_settings(cls, scratch) -> dict:
        """Constructor arguments for a quick run on little data (tests, smoke runs); files it needs go under
        the folder `scratch`. A dataset that is small already needs none."""
        return {}

    def __init__(
        self,
        batch_size: int = 64,
        image_size: int | None = None,
        channels: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        normalize: bool = True,
        augment: dict | None = None,
        num_classes: int | None = None,
    ):
        super().__init__()
        if int(batch_size) < 1:
            raise LabError(f"data.batch_size={batch_size} is not valid: it must be a positive integer.")
        if image_size is not None and int(image_size) < 1:
            raise LabError(f"data.image_size={image_size} is not valid: it must be a positive number of pixels.")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 < value < 1:
                raise LabError(f"data.{name}={value} is not valid: it must lie strictly between 0 and 1.")
        self.batch_size, self.image_size, self.channels = int(batch_size), image_size, channels
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.normalize = normalize
        self.augment = Augment(**(augment or {}))
        self.expected_classes = num_classes
        self.splits: dict[str, Images] = {}
        self.class_names: list[str] = []
        self._placed: dict[str, Images] = {}

    # -- what a dataset subclass provides -------------------------------------------------------
    def load(self) -> Loaded:
        raise NotImplementedError

    def check_source(self) -> None:
        """Raise a LabError if the data is not where the config says, without loading it: what `lab sweep` asks
        before its first trial, so that a wrong data.root is one sentence, not max_failures failed trials."""

    @property
    def name(self) -> str:
        return type(self).__name__

    # -- shape facts the model is built from ------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.splits["train"].x.shape[1:])

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        loaded = self.load()
        self.class_names = [str(c) for c in loaded.class_names]
        if len(self.class_names) < 2:
            raise LabError(
                f"{self.name} has {len(self.class_names)} class(es) {self.class_names}: a classifier needs at "
                "least two. For an image folder, put one sub-folder per class under data.root."
            )
        if self.expected_classes is not None and self.expected_classes != self.num_classes:
            raise LabError(
                f"data.num_classes={self.expected_classes} disagrees with the data, which has "
                f"{self.num_classes} classes {self.class_names}: set data.num_classes={self.num_classes} or null."
            )
        parts = [loaded.train] + ([loaded.test] if loaded.test is not None else [])
        for part in parts:
            bad = (part.y < 0) | (part.y >= self.num_classes)
            if bad.any():
                raise LabError(
                    f"{self.name}: label {int(part.y[bad][0])} is outside 0..{self.num_classes - 1} "
                    f"({self.num_classes} class names)."
                )
            part.x = to_channels(part.x, self.channels)
            if self.image_size is not None:
                part.x = resize(part.x, int(self.image_size))

        g = torch.Generator().manual_seed(self.split_seed)
        train = loaded.train
        order = torch.randperm(len(train.y), generator=g)
        n_val = max(1, round(len(order) * self.val_fraction))
        n_test = 0 if loaded.test is not None else max(1, round(len(order) * self.test_fraction))
        def pick(idx: torch.Tensor) -> Images:
            paths = [train.paths[i] for i in idx.tolist()] if train.paths is not None else None
            return Images(train.x[idx], train.y[idx], paths)

        self.splits = {
            "val": pick(order[:n_val]),
            "test": loaded.test if loaded.test is not None else pick(order[n_val : n_val + n_test]),
            "train": pick(order[n_val + n_test :]),
        }
        n_train = len(self.splits["train"].y)
        if self.batch_size > n_train:
            raise LabError(
                f"data.batch_size={self.batch_size} is larger than the training set ({n_train} images after "
                f"the validation/test split): choose a batch size between 1 and {n_train}."
            )
        stats = self.splits["train"].x[:20000].float() / 255
        self.mean = stats.mean(dim=(0, 2, 3)) if self.normalize else torch.zeros(stats.shape[1])
        self.std = stats.std(dim=(0, 2, 3)).clamp_min(1e-3) if self.normalize else torch.ones(stats.shape[1])

    # -- batches: resident on the training device, augmented and normalized there ------------------
    def _device(self) -> torch.device:
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _loader(self, split: str, shuffle: bool) -> IndexBatches:
        device = self._device()
        placed = self._placed.get(split)
        if placed is None or placed.x.device != device:
            src = self.splits[split]
            placed = self._placed[split] = Images(src.x.to(device), src.y.to(device))
        return IndexBatches(placed, self.batch_size, shuffle)

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val", shuffle=False)

    def test_dataloader(self):
        return self._loader("test", shuffle=False)

    def predict_dataloader(self):
        return self._loader("test", shuffle=False)

    def prepare_batch(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        """uint8 (N, C, H, W) -> normalized float (N, C, H, W) on x's device."""
        x = x.float().div_(255)
        if training:
            x = self.augment(x)
        mean, std = self._stats_on(x.device)
        x = (x - mean) / std
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _stats_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, C, 1, 1) mean and std on `device`, copied once: a host-to-GPU copy per batch would sync."""
        cached = self.__dict__.get("_stats")
        if cached is None or cached[0].device != device:
            cached = self._stats = tuple(t.to(device).view(1, -1, 1, 1) for t in (self.mean, self.std))
        return cached

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y = batch
        trainer = getattr(self, "trainer", None)
        training = bool(trainer is not None and trainer.training)
        return self.prepare_batch(x, training), y
