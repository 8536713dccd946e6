"""One folder per class (flowers, cats vs dogs): decoded once per image size, cached on disk.

Layout: ROOT/<class>/*.jpg, or ROOT/train/<class>/... and ROOT/test/<class>/... for a fixed test set.
The cache key covers every file's path, size and mtime plus the image size and channels, so a changed
or added file makes a new cache entry instead of serving stale pixels.
"""
import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import pil_to_tensor, resize

from lab.data.base import Images, Loaded, TensorDataModule
from lab.errors import LabError

log = logging.getLogger(__name__)


def decode(path: str, size: int, channels: int) -> torch.Tensor | None:
    """(C, size, size) uint8, or None when the file is not a readable image."""
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB  # also flattens RGBA/palette/CMYK
    try:
        img = decode_image(path, mode=mode)
    except (RuntimeError, ValueError):
        img = None
    if img is not None and img.dtype == torch.uint16:  # 16-bit PNG
        img = (img.float() / 257).round().to(torch.uint8)
    if img is None or img.shape[0] != channels:
        # torchvision decodes only JPEG/PNG/WebP/GIF (and WebP ignores GRAY); IMG_EXTENSIONS also admits
        # BMP, TIFF, PPM and PGM, which PIL reads.
        try:
            with Image.open(path) as pil:
                img = pil_to_tensor(pil.convert("L" if channels == 1 else "RGB"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None
    return resize(img, [size, size], antialias=True)


def missing_root(folder: Path) -> str:
    """The sentence for a data.root that is not there; for a lecture dataset's folder name, how to download it."""
    from lab.data import fetch  # the datasets `lab data fetch` knows, and the folder each lands in

    fetchable = next((name for name, d in fetch.DATASETS.items()
                      if isinstance(d, fetch.Archive) and d.target == folder.name), None)
    how = (f" `lab data fetch {fetchable} --root {folder.parent}` downloads it there." if fetchable else "")
    return (f"data.root={folder} does not exist or is not a folder: it must hold one sub-folder of images per "
            f"class.{how}")


class ImageFolder(TensorDataModule):
    def __init__(self, root: str | None = None, strict: bool = False,
                 cache_dir: str | None = "~/.cache/lab/folders", decode_threads: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if root is None:
            raise LabError("data.root is not set: point it at a folder with one sub-folder per class, "
                           "e.g. data.root=data/flower_photos.")
        self.root, self.strict = Path(root).expanduser(), strict
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.decode_threads = decode_threads or min(16, os.cpu_count() or 1)
        self.skipped: list[str] = []  # unreadable files left out, logged to the run

    def check_source(self) -> None:
        if not self.root.is_dir():
            raise LabError(missing_root(self.root))

    def _scan(self, folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
        if not folder.is_dir():
            raise LabError(missing_root(folder))
        try:
            classes, class_to_idx = find_classes(str(folder))
        except FileNotFoundError as err:
            raise LabError(f"data.root={folder} holds no class sub-folders ({err}).") from err
        counts = {c: sum(1 for f in (folder / c).rglob("*") if f.suffix.lower() in IMG_EXTENSIONS) for c in classes}
        empty = [c for c, n in counts.items() if n == 0]
        if empty:
            raise LabError(f"data.root={folder}: class folder(s) {empty} hold no images "
                           f"(extensions {', '.join(IMG_EXTENSIONS)}); remove them or add images.")
        return classes, make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS)

    def _cache_path(self, samples: list[tuple[str, int]], size: int, channels: int) -> Path | None:
        if self.cache_dir is None:
            return None
        h = hashlib.sha256(f"{size}:{channels}".encode())
        for path, label in samples:
            st = os.stat(path)
            h.update(f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return self.cache_dir / f"{h.hexdigest()[:24]}.pt"

    def _check_strict(self, bad: list[str]) -> None:
        if bad and self.strict:
            raise LabError(f"{len(bad)} unreadable image(s) under data.root={self.root} with data.strict=true: "
                           f"{bad[:10]}{' ...' if len(bad) > 10 else ''}. Remove them or set data.strict=false.")

    def _decode_all(self, samples: list[tuple[str, int]], size: int, channels: int) -> Images:
        cache = self._cache_path(samples, size, channels)
        if cache is not None and cache.is_file():
            stored = torch.load(cache, weights_only=True)
            self._check_strict(stored["skipped"])  # the cache may come from a run with data.strict=false
            self.skipped += stored["skipped"]
            left_out = set(stored["skipped"])
            return Images(stored["x"], stored["y"], [path for path, _ in samples if path not in left_out])
        with ThreadPoolExecutor(self.decode_threads) as pool:  # libjpeg decoding releases the GIL
            images = list(pool.map(lambda s: decode(s[0], size, channels), samples))
        bad = [path for (path, _), img in zip(samples, images) if img is None]
        self._check_strict(bad)
        if bad:
            log.warning("skipping %d unreadable image(s): %s", len(bad), bad[:10])
        keep = [(img, label, path) for (path, label), img in zip(samples, images) if img is not None]
        if not keep:
            raise LabError(f"data.root={self.root}: none of the {len(samples)} images could be decoded.")
        x = torch.stack([img for img, _, _ in keep])
        y = torch.tensor([label for _, label, _ in keep], dtype=torch.long)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            torch.save({"x": x, "y": y, "skipped": bad}, tmp)
            os.replace(tmp, cache)  # atomic: concurrent workers never read a half-written cache
        self.skipped += bad
        return Images(x, y, [path for _, _, path in keep])

    def load(self) -> Loaded:
        if self.image_size is None:
            raise LabError("data.image_size is not set: an image folder needs one size, e.g. data.image_size=64.")
        size, channels = int(self.image_size), int(self.channels or 3)
        split_dirs = [self.root / "train", self.root / "test"]
        if all(d.is_dir() for d in split_dirs):
            (classes, train), (test_classes, test) = self._scan(split_dirs[0]), self._scan(split_dirs[1])
            if test_classes != classes:
                raise LabError(f"{split_dirs[1]} has classes {test_classes}, {split_dirs[0]} has {classes}.")
            return Loaded(self._decode_all(train, size, channels), self._decode_all(test, size, channels), classes)
        classes, samples = self._scan(self.root)
        if len(classes) < 2:
            raise LabError(f"data.root={self.root} has one class folder {classes}: a classifier needs at least "
                           "two, one sub-folder of images per class.")
        return Loaded(self._decode_all(samples, size, channels), None, classes)
