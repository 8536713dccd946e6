"""The one LightningDataModule behind every dataset: uint8 images in one store, splits as rows of it.

A dataset subclass only implements `load()`; everything after (channel conversion, resize, split,
normalization, augmentation, device placement) happens here once. Memory: the store is held once (for an
image folder it is a file mapped read-only, shared by every process on the machine through the page cache);
a split is an index into it, and batches are gathered from it. Nothing here makes a float copy of the data.
"""
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from lab.config_schema import check, check_arguments
from lab.data import placing
from lab.data.augment import Augment
from lab.data.batches import IndexBatches, StreamedBatches
from lab.data.normalise import Normalise
from lab.errors import LabError

STATS_IMAGES = 20_000  # normalisation statistics from at most this many training images (random: the split is)
CHUNK_BYTES = 1 << 20  # uint8 bytes converted to float at once: 4 MB of float32 (8 MB float64 sums) at any image size


@dataclass
class Images:
    """What a dataset loads: every image of one part (train, or a fixed test set)."""
    x: torch.Tensor  # (N, C, H, W) uint8
    y: torch.Tensor  # (N,) int64
    paths: list[str] | None = None  # each image's source file (image folders)


@dataclass
class Split:
    """Rows `index` of `store`: train, val and test carved from one load share its store, nothing is copied."""
    store: torch.Tensor  # (M, C, H, W) uint8
    index: torch.Tensor  # (N,) int64 rows of store
    y: torch.Tensor  # (N,) int64
    paths: list[str] | None = None

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.store[self.index[i]]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.store.shape[1:])

    def rows(self, which) -> torch.Tensor:
        """uint8 (n, C, H, W) copy of the split's images `which` (a slice or an index tensor)."""
        return self.store.index_select(0, self.index[which])

    @property
    def x(self) -> torch.Tensor:
        """The whole split as one uint8 tensor, a copy: for the test split's views and for tests, never the
        training loop."""
        return self.rows(slice(None))

    def chunks(self, limit: int | None = None):
        """The split's images in row order, a bounded number of bytes at a time."""
        n = len(self) if limit is None else min(limit, len(self))
        step = max(1, CHUNK_BYTES // max(1, self.store[0].numel()))
        for start in range(0, n, step):
            yield self.rows(slice(start, min(n, start + step)))


@dataclass
class Loaded:
    train: Images
    test: Images | None  # None: carved out of train
    class_names: list[str]


def _chunked(x: torch.Tensor, shape: tuple[int, ...], convert) -> torch.Tensor:
    """convert() applied to bounded slices of x, written into one preallocated uint8 output: the input and
    the output are the only full copies alive."""
    out = torch.empty((len(x), *shape), dtype=torch.uint8)
    step = max(1, CHUNK_BYTES // max(1, x[0].numel()))
    for start in range(0, len(x), step):
        out[start : start + step] = convert(x[start : start + step])
    return out


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size), antialiased."""
    if x.shape[-2:] == (size, size):
        return x

    def one(chunk):
        chunk = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return chunk.round_().clamp_(0, 255).to(torch.uint8)

    return _chunked(x, (x.shape[1], size, size), one)


def to_channels(x: torch.Tensor, channels: int | None) -> torch.Tensor:
    check("data.channels", channels)
    if channels is None or x.shape[1] == channels:
        return x
    if channels == 1 and x.shape[1] == 3:  # ITU-R 601 luma, as PIL's convert("L")
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return _chunked(x, (1, *x.shape[2:]),
                        lambda c: (c.float() * weights).sum(1, keepdim=True).round_().to(torch.uint8))
    if channels == 3 and x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1).contiguous()
    raise LabError(f"data.channels={channels} cannot be made from the data's {x.shape[1]}-channel images: use "
                   "null to keep them as stored.")


def channel_stats(split: Split, limit: int = STATS_IMAGES) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (unbiased) std of pixel values in 0..1, of the split's first `limit` images.

    From per-channel histograms of the uint8 values: exact integer counts, no float copy of any chunk (a
    float64 sum of a 224-px folder took ~10x longer), and the rows are read in the store's order, so a mapped
    cache is read front to back instead of page-faulted at random."""
    channels = split.store.shape[1]
    rows = split.index[:limit].sort().values
    step = max(1, CHUNK_BYTES // max(1, split.store[0].numel()))
    hist = torch.zeros(channels, 256, dtype=torch.int64)
    for start in range(0, len(rows), step):
        chunk = split.store.index_select(0, rows[start : start + step])  # (n, C, H, W) uint8
        for c in range(channels):
            hist[c] += torch.bincount(chunk[:, c].reshape(-1), minlength=256)
    values = torch.arange(256, dtype=torch.float64) / 255
    count = hist.sum(1).double()
    mean = (hist * values).sum(1) / count
    var = ((hist * values.square()).sum(1) - count * mean.square()) / (count - 1).clamp_min(1)
    return mean.float(), var.clamp_min(0).sqrt().float()


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
        placement: str = "auto",
        resident_max_gb: float | None = None,
    ):
        super().__init__()
        check_arguments("data", batch_size=batch_size, image_size=image_size, channels=channels,
                        val_fraction=val_fraction, test_fraction=test_fraction, resident_max_gb=resident_max_gb)
        self.batch_size, self.image_size, self.channels = batch_size, image_size, channels
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.normalize = normalize
        self.augment = Augment(**(augment or {}))
        self.expected_classes = num_classes
        self.placement_mode = placing.check_mode(placement)
        self.resident_max_gb = None if resident_max_gb is None else float(resident_max_gb)
        self.splits: dict[str, Split] = {}
        self.class_names: list[str] = []
        self.placement: placing.Decision | None = None
        self._placed: dict[int, torch.Tensor] = {}  # id(store) -> the store on the training device

    # -- what a dataset subclass provides -------------------------------------------------------
    def load(self) -> Loaded:
        raise NotImplementedError

    def check_source(self) -> None:
        """Raise a LabError if the data is not where the config says, without loading it: what `lab sweep` asks
        before its first trial, so that a wrong data.root is one sentence, not max_failures failed trials."""

    def content_id(self) -> str | None:
        """A string that changes whenever the loaded pixels would (an image folder's cache key), so that the
        run's dataset digest need not hash every pixel; None: hash the pixels."""
        return None

    @property
    def name(self) -> str:
        return type(self).__name__

    # -- shape facts the model is built from ------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.splits["train"].store.shape[1:])

    @property
    def stores(self) -> list[torch.Tensor]:
        """The distinct uint8 stores behind the splits (one, or two with a fixed test set)."""
        return list({id(s.store): s.store for s in self.splits.values()}.values())

    @property
    def nbytes(self) -> int:
        """Decoded bytes of the data: what placing it on a device costs."""
        return sum(s.numel() for s in self.stores)

    def _prepare(self, part: Images) -> Images:
        bad = (part.y < 0) | (part.y >= self.num_classes)
        if bad.any():
            raise LabError(f"{self.name}: label {int(part.y[bad][0])} is outside 0..{self.num_classes - 1} "
                           f"({self.num_classes} class names).")
        part.x = to_channels(part.x, self.channels)
        if self.image_size is not None:
            part.x = resize(part.x, int(self.image_size))
        return part

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
        train = self._prepare(loaded.train)
        test = self._prepare(loaded.test) if loaded.test is not None else None

        g = torch.Generator().manual_seed(self.split_seed)
        order = torch.randperm(len(train.y), generator=g)
        n_val = max(1, round(len(order) * self.val_fraction))
        n_test = 0 if test is not None else max(1, round(len(order) * self.test_fraction))

        def pick(part: Images, idx: torch.Tensor) -> Split:
            paths = [part.paths[i] for i in idx.tolist()] if part.paths is not None else None
            return Split(part.x, idx, part.y[idx], paths)

        self.splits = {
            "val": pick(train, order[:n_val]),
            "test": pick(test, torch.arange(len(test.y))) if test is not None else pick(train, order[n_val : n_val + n_test]),
            "train": pick(train, order[n_val + n_test :]),
        }
        n_train = len(self.splits["train"])
        if self.batch_size > n_train:
            raise LabError(
                f"data.batch_size={self.batch_size} is larger than the training set ({n_train} images after "
                f"the validation/test split): choose a batch size between 1 and {n_train}."
            )
        channels = self.shape[0]
        if self.normalize:
            self.mean, self.std = channel_stats(self.splits["train"])
            self.std = self.std.clamp_min(1e-3)
        else:
            self.mean, self.std = torch.zeros(channels), torch.ones(channels)

    # -- batches: gathered from the store on the training device, augmented and normalized there ----------
    def _device(self) -> torch.device:
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def decide_placement(self, device: torch.device) -> "placing.Decision":
        """Resident (the store on the device, batches gathered there) or streamed (batches gathered on the host
        from the store, one ahead, and copied): from the data's size against the device's measured memory."""
        if self.placement is None or self.placement.device != str(device):
            self.placement = placing.decide(self.placement_mode, self.nbytes, device, self.resident_max_gb)
        return self.placement

    def _loader(self, split: str, shuffle: bool):
        device = self._device()
        src = self.splits[split]
        if self.decide_placement(device).resident:
            store = self._placed.get(id(src.store))
            if store is None or store.device != device:
                self._placed = {k: v for k, v in self._placed.items() if v.device == device}
                store = self._placed[id(src.store)] = src.store.to(device)
            return IndexBatches(store, src.index.to(device), src.y.to(device), self.batch_size, shuffle)
        return StreamedBatches(src.store, src.index, src.y, self.batch_size, shuffle, pin=device.type == "cuda")

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val", shuffle=False)

    def test_dataloader(self):
        return self._loader("test", shuffle=False)

    def predict_dataloader(self):
        return self._loader("test", shuffle=False)

    def prepare_batch(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        """uint8 (N, C, H, W) -> normalized float (N, C, H, W) on x's device, by the rule a logged model applies
        (lab.data.normalise), augmented in between when training."""
        x = x.float().div_(255)
        if training:
            x = self.augment(x)
        x = self.normaliser(x.device).normalise_(x)  # in place: x is this call's own float copy (two more otherwise)
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def normaliser(self, device: torch.device | str = "cpu") -> Normalise:
        """The training split's normalisation (set up: mean, std) as a module on `device`, made once per device
        and statistics: a host-to-GPU copy per batch would sync."""
        device = torch.device(device)
        cached = self.__dict__.get("_normaliser")  # (mean, std, device, module)
        if cached is None or cached[0] is not self.mean or cached[1] is not self.std or cached[2] != device:
            cached = self._normaliser = (self.mean, self.std, device, Normalise(self.mean, self.std).to(device))
        return cached[3]

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y = batch
        trainer = getattr(self, "trainer", None)
        training = bool(trainer is not None and trainer.training)
        return self.prepare_batch(x, training), y
