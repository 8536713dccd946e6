"""One folder per class (flowers, cats vs dogs): decoded once per image size into a cache every process maps.

Layout: ROOT/<class>/*.jpg, or ROOT/train/<class>/... and ROOT/test/<class>/... for a fixed test set.
The cache key covers every file's path, size and mtime plus the image size and channels, so a changed
or added file makes a new cache entry instead of serving stale pixels. What is listed and what is left out
(links, hidden files, special files, unreadable or oversized images) is lab.data.scan's and decode's.
"""
import hashlib
import logging
import os
from pathlib import Path

import torch

from lab.config_schema import check_arguments
from lab.data import cache, decode, scan
from lab.data.base import Images, Loaded, TensorDataModule
from lab.errors import LabError

log = logging.getLogger(__name__)


def missing_root(folder: Path) -> str:
    """The sentence for a data.root that is not there; for a lecture dataset's folder name, how to download it."""
    from lab.data import fetch  # the datasets `lab data fetch` knows, and the folder each lands in

    fetchable = next((name for name, d in fetch.DATASETS.items()
                      if isinstance(d, fetch.Archive) and d.target == folder.name), None)
    how = (f" `lab data fetch {fetchable} --root {folder.parent}` downloads it there." if fetchable else "")
    return (f"data.root={folder} does not exist or is not a folder: it must hold one sub-folder of images per "
            f"class.{how}")


class ImageFolder(TensorDataModule):
    def __init__(self, root: str | None = None, strict: bool = False, cache_dir: str | None = cache.DEFAULT_DIR,
                 cache_max_gb: float | None = 20.0, decode_threads: int | None = None,
                 max_pixels: int = decode.MAX_PIXELS, **kwargs):
        super().__init__(**kwargs)
        if root is None:
            raise LabError("data.root is not set: point it at a folder with one sub-folder per class, "
                           "e.g. data.root=data/flower_photos.")
        check_arguments("data", cache_max_gb=cache_max_gb, max_pixels=max_pixels)
        self.root, self.strict = Path(root).expanduser(), strict
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.cache_max_gb = None if cache_max_gb is None else float(cache_max_gb)
        self.decode_threads = int(decode_threads or min(16, decode.usable_cores()))
        self.max_pixels = int(max_pixels)
        self.skipped: list[str] = []  # "path: why" for each file left out, logged to the run
        self.keys: list[str] = []  # the cache keys of what was loaded: the data's identity for the run's digest

    def check_source(self) -> None:
        if not self.root.is_dir():
            raise LabError(missing_root(self.root))

    def content_id(self) -> str | None:
        return ",".join(self.keys) or None

    # -- what the folder holds -----------------------------------------------------------------------
    def listing(self, folder: Path) -> scan.Listing:
        """Classes and (path, label) samples under `folder`; a subclass reads another layout."""
        if not folder.is_dir():
            raise LabError(missing_root(folder))
        found = scan.scan(folder)
        counts = [0] * len(found.classes)
        for _, label in found.samples:
            counts[label] += 1
        empty = [c for c, n in zip(found.classes, counts) if n == 0]
        if empty:
            raise LabError(f"data.root={folder}: class folder(s) {empty} hold no images "
                           f"(extensions {', '.join(scan.IMG_EXTENSIONS)}); remove them or add images.")
        return found

    def _report(self, found: scan.Listing) -> None:
        if found.hidden:
            log.warning("data.root=%s: passed over %d hidden file(s)/folder(s) such as %s", self.root,
                        len(found.hidden), found.hidden[0])
        if found.skipped:
            log.warning("data.root=%s: left out %d file(s)/link(s): %s", self.root, len(found.skipped),
                        found.skipped[:5])
        self.skipped += found.skipped

    # -- decoding, once per machine ----------------------------------------------------------------------
    def _key(self, samples: list[tuple[str, int]], size: int, channels: int) -> str:
        h = hashlib.sha256(f"{size}:{channels}:{self.max_pixels}".encode())
        for path, label in samples:
            st = os.stat(path)
            h.update(f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:24]

    def _check_strict(self, bad: list[str]) -> None:
        if bad and self.strict:
            raise LabError(f"{len(bad)} unreadable image(s) under data.root={self.root} with data.strict=true: "
                           f"{bad[:10]}{' ...' if len(bad) > 10 else ''}. Remove them or set data.strict=false.")

    def _fill(self, samples: list[tuple[str, int]], size: int, channels: int):
        """fill(store) for cache.build: decodes every sample into its row, then closes the gaps of the files
        left out, so rows [0, kept) hold the kept images in order."""
        paths = [p for p, _ in samples]

        def fill(store: torch.Tensor) -> dict:
            log.info("decoding %d images of %s at %d px on %d threads (once: later runs map the cache)",
                     len(paths), self.root, size, self.decode_threads)
            failed = decode.decode_into(store, paths, size, channels, self.decode_threads, self.max_pixels,
                                        label=f"decoding {self.root.name} at {size} px")
            kept = [i for i in range(len(paths)) if i not in failed]
            for row, i in enumerate(kept):
                if row != i:
                    store[row].copy_(store[i])
            return {"rows": len(kept), "labels": [samples[i][1] for i in kept], "source": str(self.root),
                    "skipped": [f"{paths[i]}: {failed[i]}" for i in sorted(failed)],
                    "kept": kept}

        return fill

    def _decode_all(self, samples: list[tuple[str, int]], size: int, channels: int) -> Images:
        key = self._key(samples, size, channels)
        self.keys.append(key)
        shape = (len(samples), channels, size, size)
        if self.cache_dir is None:
            store = torch.empty(shape, dtype=torch.uint8)
            info = self._fill(samples, size, channels)(store)
            store = store[: info["rows"]]
        else:
            store, info = cache.build(self.cache_dir, key, shape, self._fill(samples, size, channels),
                                      self.cache_max_gb).open()
        self._check_strict(info["skipped"])  # the cache may come from a run with data.strict=false
        if info["skipped"]:
            log.warning("skipping %d unreadable image(s): %s", len(info["skipped"]), info["skipped"][:10])
        self.skipped += info["skipped"]
        if not info["rows"]:
            raise LabError(f"data.root={self.root}: none of the {len(samples)} images could be decoded.")
        paths = [samples[i][0] for i in info["kept"]]
        return Images(store, torch.tensor(info["labels"], dtype=torch.long), paths)

    def load(self) -> Loaded:
        if self.image_size is None:
            raise LabError("data.image_size is not set: an image folder needs one size, e.g. data.image_size=64.")
        size, channels = int(self.image_size), int(self.channels or 3)
        split_dirs = [self.root / "train", self.root / "test"]
        if all(d.is_dir() for d in split_dirs):
            train, test = self.listing(split_dirs[0]), self.listing(split_dirs[1])
            if test.classes != train.classes:
                raise LabError(f"{split_dirs[1]} has classes {test.classes}, {split_dirs[0]} has {train.classes}.")
            for found in (train, test):
                self._report(found)
            return Loaded(self._decode_all(train.samples, size, channels),
                          self._decode_all(test.samples, size, channels), train.classes)
        found = self.listing(self.root)
        if len(found.classes) < 2:
            raise LabError(f"data.root={self.root} has one class folder {found.classes}: a classifier needs at "
                           "least two, one sub-folder of images per class.")
        self._report(found)
        return Loaded(self._decode_all(found.samples, size, channels), None, found.classes)
