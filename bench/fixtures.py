"""Inputs for every pipeline, written into one temp dir: raw Fashion-MNIST, a JPEG folder, synthetic RGB."""
import gzip
import shutil
from pathlib import Path

import torch
from torchvision.io import write_jpeg

from lab.data.idx import read_idx

FASHION_GZ = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def fashion_raw(tmp: Path) -> Path:
    """torchvision's FashionMNIST reads uncompressed files from root/FashionMNIST/raw/; returns root."""
    raw = tmp / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for stem in STEMS:
        src = FASHION_GZ / f"{stem}.gz"
        if not src.is_file():
            raise SystemExit(f"bench: {src} is missing (apt install dataset-fashion-mnist)")
        with gzip.open(src) as fin, open(raw / stem, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    return tmp


def fashion_tensors(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Train split as (60000, 1, 28, 28) uint8 and (60000,) int64, for the plain loop."""
    raw = root / "FashionMNIST" / "raw"
    return read_idx(raw / STEMS[0]).unsqueeze(1), read_idx(raw / STEMS[1]).long()


def synthetic_rgb(n: int, size: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, size, size) uint8: the throughput of a net does not depend on what the pixels show."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g), torch.arange(n) % classes


def jpeg_folder(tmp: Path, n: int, classes: int) -> Path:
    """root/class_k/*.jpg with flowers-like sizes (about 240-500 px a side, varying aspect)."""
    root = tmp / "flowers"
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        h, w = (int(v) for v in torch.randint(240, 500, (2,), generator=g))
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        # Smooth pixels (upsampled noise) compress like photos, not like white noise.
        img = torch.nn.functional.interpolate(torch.rand(1, 3, h // 16 + 1, w // 16 + 1, generator=g), size=(h, w),
                                              mode="bilinear")
        write_jpeg((img[0] * 255).to(torch.uint8), str(folder / f"{i:05d}.jpg"), quality=90)
    return root
