"""Image files -> uint8 (C, size, size) tensors, on a pool of threads (the decoders release the GIL), written
straight into the rows of the cache being built: no list of decoded images, no stacked copy.

An image whose header declares more than data.max_pixels pixels is refused before it is decoded: a 389 KB PNG
can declare 20000 x 20000 (1.2 GB decoded), and torchvision's decoders have no limit of their own.
"""
import logging
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import pil_to_tensor, resize

log = logging.getLogger(__name__)
# Told "start", then "image" per file decoded, then "end": a sweep worker's pulse counts a decode that stops
# getting through files as hung, as it does a training loop (lab.sweep.objective registers it; data cannot
# import the sweep layer).
listeners: list = []
MAX_PIXELS = 64_000_000  # 64 MP: above any camera's photo; 192 MB decoded as RGB, per decoding thread


def header_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the file's header (PIL reads no pixel data for this), None if PIL cannot tell."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # lab's own limit decides, below
            with Image.open(path) as img:
                return img.size
    except Image.DecompressionBombError:  # over twice PIL's limit (179 MP): over any sane data.max_pixels too
        return (1 << 20, 1 << 20)
    except (OSError, ValueError, SyntaxError):
        return None


def decode(path: str, size: int, channels: int, max_pixels: int = MAX_PIXELS) -> torch.Tensor | None:
    """(C, size, size) uint8, or None when the file is not a readable image within the pixel limit."""
    got = decode_or_why(path, size, channels, max_pixels)
    return None if isinstance(got, str) else got


def decode_or_why(path: str, size: int, channels: int, max_pixels: int = MAX_PIXELS) -> torch.Tensor | str:
    """(C, size, size) uint8, or the reason the file is left out."""
    dims = header_size(path)
    if dims is not None and dims[0] * dims[1] > max_pixels:
        return f"{dims[0]} x {dims[1]} pixels is over data.max_pixels={max_pixels}"
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB  # also flattens RGBA/palette/CMYK
    try:
        img = decode_image(path, mode=mode)
    except (RuntimeError, ValueError):
        img = None
    if img is not None and img.dtype == torch.uint16:  # 16-bit PNG
        img = (img.float() / 257).round().to(torch.uint8)
    if img is None or img.shape[0] != channels:
        if dims is None:
            return "unreadable"
        # torchvision decodes only JPEG/PNG/WebP/GIF (and WebP ignores GRAY); IMG_EXTENSIONS also admits
        # BMP, TIFF, PPM and PGM, which PIL reads.
        try:
            with Image.open(path) as pil:
                img = pil_to_tensor(pil.convert("L" if channels == 1 else "RGB"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return "unreadable"
    return resize(img, [size, size], antialias=True)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class Progress:
    """A tqdm bar on a terminal; in a log (a sweep worker's), one line per 10%."""

    def __init__(self, total: int, label: str):
        from tqdm import tqdm

        self.total, self.label, self.done, self.start, self.logged = total, label, 0, time.monotonic(), 0
        self.bar = tqdm(total=total, desc=label, unit="img", disable=None, leave=False)

    def update(self) -> None:
        self.done += 1
        self.bar.update(1)
        if self.bar.disable and self.done * 10 // self.total > self.logged:
            self.logged = self.done * 10 // self.total
            log.info("%s: %d/%d images", self.label, self.done, self.total)

    def close(self) -> float:
        self.bar.close()
        return time.monotonic() - self.start


def tell(event: str) -> None:
    for listener in listeners:
        listener(event)


def decode_into(out: torch.Tensor, paths: list[str], size: int, channels: int, threads: int,
                max_pixels: int = MAX_PIXELS, label: str = "decoding") -> dict[int, str]:
    """Decodes paths[i] into out[i]; returns {i: reason} for the files left out (their rows are untouched)."""
    failed: dict[int, str] = {}
    progress = Progress(len(paths), label)
    tell("start")

    def one(i: int) -> None:
        got = decode_or_why(paths[i], size, channels, max_pixels)
        if isinstance(got, str):
            failed[i] = got
        else:
            out[i].copy_(got)

    pool = ThreadPoolExecutor(threads)
    try:
        for _ in pool.map(one, range(len(paths))):
            progress.update()
            tell("image")
    finally:  # on Ctrl-C/SIGTERM the queued files are dropped, not decoded first
        pool.shutdown(wait=True, cancel_futures=True)
        tell("end")
    seconds = progress.close()
    log.info("decoded %d images at %d px in %.1f s: %.0f images/s on %d threads", len(paths), size, seconds,
             len(paths) / max(seconds, 1e-9), threads)
    return failed
