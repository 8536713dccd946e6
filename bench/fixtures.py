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
    """torchvision's FashionMNIST reads uncompressed files from root/FashionMNIST/raw/; returns root. Without
    Debian's files (a GPU machine's bare image, no internet) they are Fashion-MNIST-shaped synthetic ones
    (fashion_like): the same sizes, so the same throughput; `source` says which the numbers came from."""
    global source
    raw = tmp / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    if not all((FASHION_GZ / f"{stem}.gz").is_file() for stem in STEMS):
        print(f"bench: {FASHION_GZ} is missing (apt install dataset-fashion-mnist): synthetic images of "
              "Fashion-MNIST's shape instead", flush=True)
        source = "synthetic, Fashion-MNIST-shaped"
        fashion_like(raw, gz=False)
        return tmp
    for stem in STEMS:
        with gzip.open(FASHION_GZ / f"{stem}.gz") as fin, open(raw / stem, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    source = "Fashion-MNIST"
    return tmp


source = "Fashion-MNIST"


def write_idx(path: Path, data: torch.Tensor, gz: bool) -> None:
    """The IDX format (big-endian dims after a magic of 0, 0, type 0x08 = ubyte, rank) of uint8 data."""
    header = bytes([0, 0, 0x08, data.dim()]) + b"".join(int(n).to_bytes(4, "big") for n in data.shape)
    with (gzip.open(path, "wb", compresslevel=1) if gz else open(path, "wb")) as f:
        f.write(header + data.contiguous().numpy().tobytes())


def fashion_like(folder: Path, gz: bool = True, n_train: int = 60000, n_test: int = 10000) -> Path:
    """The four Fashion-MNIST files (STEMS, .gz when gz) of n_train / n_test 28x28 uint8 images in 10 classes:
    a smooth template per class plus noise, so a CNN learns them (not to Fashion-MNIST's accuracy)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    templates = torch.nn.functional.interpolate(torch.rand(10, 1, 7, 7, generator=g), size=(28, 28), mode="bilinear")
    for images, labels, n in ((STEMS[0], STEMS[1], n_train), (STEMS[2], STEMS[3], n_test)):
        y = torch.randint(0, 10, (n,), generator=g)
        x = (templates[y, 0] * 60 + torch.rand(n, 28, 28, generator=g) * 195).to(torch.uint8)
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{images}{suffix}", x, gz)
        write_idx(folder / f"{labels}{suffix}", y.to(torch.uint8), gz)
    return folder


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
