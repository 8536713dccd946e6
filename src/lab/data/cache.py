"""Decoded image folders on disk, one entry per (files, image size, channels): a raw uint8 array that every
process on the machine maps read-only, so N sweep workers share one copy through the page cache.

An entry is KEY.u8 (rows of C x size x size bytes) plus KEY.json (shape, labels, files left out), written
under KEY.lock by one process: another that wants the same entry waits on the lock and then maps it. The
.json is renamed into place last, so an entry without one is incomplete and never read. The folder is kept
under a size cap by removing the least recently used entries (a removed file stays readable by processes
that have it mapped); `lab data cache` lists the entries and `--clear` removes them.
"""
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from lab.errors import LabError
from lab.locks import file_lock

DEFAULT_DIR = "~/.cache/lab/folders"
log = logging.getLogger(__name__)


@dataclass
class Entry:
    data: Path
    meta: Path

    @property
    def info(self) -> dict:
        return json.loads(self.meta.read_text())

    def expected_bytes(self) -> int:
        n = 1
        for d in self.info["shape"]:
            n *= d
        return n

    def complete(self) -> bool:
        try:
            return self.data.stat().st_size == self.expected_bytes()
        except (OSError, ValueError, KeyError):
            return False

    def open(self):
        """(uint8 store, info): the store mapped (pages are read on first touch, shared with other processes)."""
        import torch  # lab data cache lists entries without torch's import time

        info = self.info
        shape, n = tuple(info["shape"]), self.expected_bytes()
        if self.data.stat().st_size != n:
            raise LabError(f"the decoded cache {self.data} is damaged ({self.data.stat().st_size} bytes, expected "
                           f"{n}): remove it (lab data cache --clear) and run again.")
        store = torch.from_file(str(self.data), shared=False, size=n, dtype=torch.uint8) if n else torch.empty(0,
                                                                                                        dtype=torch.uint8)
        with contextlib.suppress(OSError):
            os.utime(self.meta)  # last use, for the least-recently-used cap (atime is often off)
        return store.view(shape), info


def entry(folder: Path, key: str) -> Entry:
    return Entry(folder / f"{key}.u8", folder / f"{key}.json")


def entries(folder: Path) -> list[Entry]:
    """Complete entries, least recently used first."""
    if not folder.is_dir():
        return []
    found = [entry(folder, meta.stem) for meta in folder.glob("*.json")]
    return sorted((e for e in found if e.data.exists()), key=lambda e: e.meta.stat().st_mtime)


def size_bytes(folder: Path) -> int:
    return sum(e.data.stat().st_size + e.meta.stat().st_size for e in entries(folder))


def build(folder: Path, key: str, shape: tuple[int, ...], fill, max_gb: float | None) -> Entry:
    """The entry KEY, made by fill(store) -> info (dict with at least "rows": how many rows it filled, in order)
    if no process has made it yet. Only the lock holder writes; the file is truncated to the rows filled."""
    import torch

    target = entry(folder, key)
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder / f"{key}.lock"):
        if target.meta.exists() and target.data.exists():
            if target.complete():
                return target
            log.warning("decoded cache %s is damaged (%d bytes, expected %d): decoding again", target.data,
                        target.data.stat().st_size, target.expected_bytes())
            target.meta.unlink()
        row = 1
        for d in shape[1:]:
            row *= d
        tmp = folder / f"{key}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.truncate(shape[0] * row)  # sparse until written: the disk fills as rows are decoded
            store = (torch.from_file(str(tmp), shared=True, size=shape[0] * row, dtype=torch.uint8).view(shape)
                     if shape[0] * row else torch.empty(shape, dtype=torch.uint8))
            info = fill(store)
            del store  # unmapped before the truncation below
            with open(tmp, "r+b") as f:
                f.truncate(info["rows"] * row)
                os.fsync(f.fileno())
            info = {**info, "shape": [info["rows"], *shape[1:]], "created": time.time()}
            os.replace(tmp, target.data)
            meta_tmp = target.meta.with_suffix(f".{os.getpid()}.tmp")
            meta_tmp.write_text(json.dumps(info))
            os.replace(meta_tmp, target.meta)  # last: the entry exists from here on
        finally:
            tmp.unlink(missing_ok=True)
    if max_gb is not None:
        evict(folder, int(max_gb * 1e9), keep=target)
    return target


def evict(folder: Path, limit: int, keep: Entry | None = None) -> list[Entry]:
    """Removes least recently used entries until the folder holds at most `limit` bytes (never `keep`)."""
    removed = []
    for old in entries(folder):
        if size_bytes(folder) <= limit:
            break
        if keep is not None and old.data == keep.data:
            continue
        with file_lock(folder / f"{old.data.stem}.lock"):
            old.meta.unlink(missing_ok=True)
            old.data.unlink(missing_ok=True)
        removed.append(old)
    return removed


def describe(folder: Path) -> str:
    found = entries(folder)
    if not found:
        return f"{folder}: no decoded folders cached."
    lines = [f"{folder}: {len(found)} decoded folder(s), {size_bytes(folder) / 1e9:.2f} GB (least recently used first)"]
    for e in found:
        info = e.info
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.meta.stat().st_mtime))
        lines.append(f"  {e.data.stem}  {e.data.stat().st_size / 1e6:9.1f} MB  {'x'.join(map(str, info['shape']))}"
                     f"  used {used}  {info.get('source', '?')}")
    return "\n".join(lines)


def command(args) -> None:
    folder = Path(args.dir).expanduser()
    if args.clear:
        n, size = len(entries(folder)), size_bytes(folder)
        evict(folder, 0)
        print(f"{folder}: removed {n} decoded folder(s), {size / 1e9:.2f} GB.")
    else:
        print(describe(folder))
