"""Datamodules on generated files: idx reading, splits, image folders and their cache, batch augmentation."""
import gzip
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from lab.data.augment import Augment
from lab.data.base import Images, Loaded, TensorDataModule
from lab.data.batches import IndexBatches
from lab.data.digits import Digits
from lab.data.folder import ImageFolder
from lab.data.idx import FashionMNIST, read_idx
from lab.data.synthetic import Synthetic
from lab.errors import LabError


# -- idx files ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_read_idx_roundtrip(tmp_path, name, write_idx):
    array = np.random.default_rng(0).integers(0, 256, (7, 5, 3)).astype(np.uint8)
    out = read_idx(write_idx(tmp_path / name, array))
    assert out.dtype == torch.uint8
    assert torch.equal(out, torch.from_numpy(array))
    labels = read_idx(write_idx(tmp_path / f"labels-{name}", np.arange(9) % 4))
    assert labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0]


def test_read_idx_truncated_data_raises(tmp_path, write_idx):
    path = write_idx(tmp_path / "x-idx3-ubyte", np.zeros((4, 6, 6)))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(LabError, match="truncated"):
        read_idx(path)


def test_read_idx_truncated_header_raises(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 0x08, 3, 0, 0, 0]))  # three dims promised, less than one given
    with pytest.raises(LabError, match="truncated"):
        read_idx(path)


def test_read_idx_truncated_gzip_raises(tmp_path, write_idx):
    path = write_idx(tmp_path / "x-idx3-ubyte.gz", np.random.default_rng(0).integers(0, 256, (50, 28, 28)))
    path.write_bytes(path.read_bytes()[:2000])  # a download cut short
    with pytest.raises(LabError, match=str(path)):
        read_idx(path)


@pytest.mark.parametrize("name, payload", [
    ("empty", b""),
    ("text", b"not an idx file"),
    ("float.gz", gzip.compress(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1, 0]), mtime=0)),  # dtype 0x0D: float32
], ids=["empty", "text", "float.gz"])
def test_read_idx_rejects_other_files(tmp_path, name, payload):
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(LabError, match="not an uint8 idx file"):
        read_idx(path)


def test_idx_datamodule_reads_root_first(tmp_path, idx_dataset, write_idx):
    root = idx_dataset(tmp_path / "fm", n_train=50, n_test=20)
    (root / "t10k-labels-idx1-ubyte.gz").unlink()  # and one of them uncompressed
    write_idx(root / "t10k-labels-idx1-ubyte", np.arange(20) % 10)
    dm = FashionMNIST(root=str(root), download=False, batch_size=8)
    dm.setup("fit")
    assert dm.num_classes == 10 and dm.shape == (1, 28, 28)
    assert len(dm.splits["test"].y) == 20  # the files' own test set, not the system copy's 10,000
    assert len(dm.splits["train"].y) + len(dm.splits["val"].y) == 50


def test_idx_datamodule_missing_files_names_root(tmp_path):
    dm = FashionMNIST(root=str(tmp_path / "empty"), download=False)
    dm.SYSTEM_DIRS = ()
    with pytest.raises(LabError, match="empty"):
        dm.setup("fit")


# -- splits and batches ------------------------------------------------------------------------------
class Numbered(TensorDataModule):
    """Image i is filled with the value i, so every split can be traced back to the images it holds."""

    def __init__(self, n: int = 200, **kwargs):
        super().__init__(**kwargs)
        self.n = n

    def load(self) -> Loaded:
        x = torch.arange(self.n, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
        return Loaded(Images(x, torch.arange(self.n) % 3), None, ["a", "b", "c"])


def split_ids(**kwargs) -> dict[str, list[int]]:
    dm = Numbered(**kwargs)
    dm.setup("fit")
    return {name: part.x[:, 0, 0, 0].tolist() for name, part in dm.splits.items()}


def test_split_is_deterministic_and_disjoint():
    first, again = split_ids(split_seed=7, batch_size=4), split_ids(split_seed=7, batch_size=4)
    assert first == again
    assert split_ids(split_seed=8, batch_size=4) != first
    assert (len(first["val"]), len(first["test"]), len(first["train"])) == (20, 20, 160)
    everything = first["train"] + first["val"] + first["test"]
    assert sorted(everything) == list(range(200))  # disjoint, and nothing dropped


def test_split_with_fixed_test_set():
    dm = Synthetic(n_train=100, n_test=30, val_fraction=0.2, batch_size=8)
    dm.setup("fit")
    assert (len(dm.splits["train"].y), len(dm.splits["val"].y), len(dm.splits["test"].y)) == (80, 20, 30)


def test_digits_split_sizes():
    dm = Digits(val_fraction=0.15, test_fraction=0.15, batch_size=64)
    dm.setup("fit")
    sizes = [len(dm.splits[s].y) for s in ("train", "val", "test")]
    assert sum(sizes) == 1797 and sizes[1] == sizes[2] == round(1797 * 0.15)
    assert dm.shape == (1, 8, 8) and dm.splits["train"].x.max() == 255


def test_batch_size_larger_than_train_set_names_value():
    dm = Synthetic(n_train=40, n_test=10, batch_size=1000)
    with pytest.raises(LabError, match="data.batch_size=1000"):
        dm.setup("fit")


def test_class_count_must_match_the_data():
    with pytest.raises(LabError, match="data.num_classes=7"):
        Synthetic(classes=4, num_classes=7).setup("fit")


@pytest.mark.parametrize("shuffle", [True, False])
def test_index_batches_yield_every_index_once(shuffle):
    n = 50
    batches = IndexBatches(torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.arange(n), torch.arange(n), 7, shuffle)
    assert len(batches) == math.ceil(n / 7)
    torch.manual_seed(0)
    epochs = [torch.cat([y for _, y in batches]) for _ in range(2)]
    for seen in epochs:
        assert len(seen) == n and sorted(seen.tolist()) == list(range(n))
    assert (not torch.equal(epochs[0], epochs[1])) == shuffle
    assert [len(y) for _, y in batches] == [7] * 7 + [1]


def test_prepare_batch_normalizes_with_train_statistics():
    dm = Synthetic(n_train=128, n_test=16, batch_size=8, val_fraction=0.1)
    dm.setup("fit")
    x = dm.prepare_batch(dm.splits["train"].x, training=False)
    assert x.dtype == torch.float32
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-2


# -- image folders -----------------------------------------------------------------------------------
def folder_dm(root, tmp_path, **kwargs) -> ImageFolder:
    defaults = dict(image_size=16, batch_size=4, cache_dir=str(tmp_path / "cache"))
    return ImageFolder(root=str(root), **{**defaults, **kwargs})


def all_images(dm) -> Images:
    parts = [dm.splits[s] for s in ("train", "val", "test")]
    return Images(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))


def test_folder_loads_classes(tmp_path, image_folder):
    dm = folder_dm(image_folder(per_class=10), tmp_path)
    dm.setup("fit")
    assert dm.class_names == ["cat", "dog", "fox"] and dm.shape == (3, 16, 16)
    images = all_images(dm)
    assert len(images.y) == 30 and torch.bincount(images.y).tolist() == [10, 10, 10]
    assert dm.skipped == []


def test_folder_with_train_and_test_subfolders(tmp_path, image_folder):
    image_folder(tmp_path / "split" / "train", per_class=8)
    image_folder(tmp_path / "split" / "test", per_class=3)
    dm = folder_dm(tmp_path / "split", tmp_path)
    dm.setup("fit")
    assert len(dm.splits["test"].y) == 9 and len(dm.splits["train"].y) + len(dm.splits["val"].y) == 24


def test_folder_missing_root(tmp_path):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(LabError, match=f"data.root={missing}"):
        folder_dm(missing, tmp_path).setup("fit")


def test_folder_root_not_set():
    with pytest.raises(LabError, match="data.root"):
        ImageFolder(root=None, image_size=16)


def test_folder_with_one_class(tmp_path, image_folder):
    root = image_folder(classes=["only"], per_class=5)
    with pytest.raises(LabError, match=r"one class folder \['only'\]"):
        folder_dm(root, tmp_path).setup("fit")


def test_folder_with_empty_class(tmp_path, image_folder):
    root = image_folder(classes=["cat", "dog"], per_class=5)
    (root / "hollow").mkdir()
    (root / "hollow" / "notes.txt").write_text("not an image")
    with pytest.raises(LabError, match="hollow"):
        folder_dm(root, tmp_path).setup("fit")


def add_corrupt(root):
    (root / "cat" / "garbage.jpg").write_bytes(b"this is not a jpeg" * 10)
    good = (root / "dog" / "0.png").read_bytes()
    (root / "dog" / "cut.png").write_bytes(good[: len(good) // 2])
    return sorted([f'{root / "cat" / "garbage.jpg"}: unreadable', f'{root / "dog" / "cut.png"}: unreadable'])


def test_corrupt_images_are_skipped_and_listed(tmp_path, image_folder):
    root = image_folder(per_class=10)
    bad = add_corrupt(root)
    dm = folder_dm(root, tmp_path)
    dm.setup("fit")
    assert sorted(dm.skipped) == bad
    assert len(all_images(dm).y) == 30


def test_corrupt_image_with_strict_raises(tmp_path, image_folder):
    root = image_folder(per_class=10)
    add_corrupt(root)
    with pytest.raises(LabError, match="garbage.jpg"):
        folder_dm(root, tmp_path, strict=True).setup("fit")
    # also when a non-strict run already cached the folder without them
    folder_dm(root, tmp_path).setup("fit")
    with pytest.raises(LabError, match="cut.png"):
        folder_dm(root, tmp_path, strict=True).setup("fit")


def solid(root, name, mode, colour, n=6, side=12):
    (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new(mode, (side, side), colour).save(root / name / f"{i}.png")


def test_gray_and_rgba_become_rgb(tmp_path):
    root = tmp_path / "modes"
    solid(root, "gray", "L", 100)
    solid(root, "rgba", "RGBA", (10, 200, 30, 128))
    solid(root, "palette", "P", 5)
    dm = folder_dm(root, tmp_path, image_size=12, channels=3)
    dm.setup("fit")
    assert dm.shape == (3, 12, 12)
    images = all_images(dm)
    expected = {"gray": (100, 100, 100), "rgba": (10, 200, 30)}
    for k, name in enumerate(dm.class_names):
        x = images.x[images.y == k]
        if name in expected:
            assert (x == torch.tensor(expected[name], dtype=torch.uint8).view(1, 3, 1, 1)).all(), name
        assert x.shape[1:] == (3, 12, 12)


def test_rgb_to_one_channel(tmp_path):
    root = tmp_path / "rgb"
    solid(root, "red", "RGB", (255, 0, 0))
    solid(root, "white", "RGB", (255, 255, 255))
    dm = folder_dm(root, tmp_path, image_size=8, channels=1)
    dm.setup("fit")
    images = all_images(dm)
    assert dm.shape == (1, 8, 8)
    assert set(images.x[images.y == 0].unique().tolist()) == {76}  # ITU-R 601 luma of pure red
    assert set(images.x[images.y == 1].unique().tolist()) == {255}


def test_bmp_tiff_and_16_bit_png_are_read(tmp_path):
    root = tmp_path / "formats"
    (root / "bmp").mkdir(parents=True)
    (root / "tiff").mkdir()
    (root / "deep").mkdir()
    for i in range(4):
        Image.new("RGB", (10, 10), (40, 80, 120)).save(root / "bmp" / f"{i}.bmp")
        Image.new("RGB", (10, 10), (200, 0, 50)).save(root / "tiff" / f"{i}.tif")
        Image.fromarray(np.full((10, 10), 65535, dtype=np.uint16)).save(root / "deep" / f"{i}.png")
    dm = folder_dm(root, tmp_path, image_size=10, batch_size=2)
    dm.setup("fit")
    assert dm.skipped == []
    images = all_images(dm)
    means = {name: images.x[images.y == k].float().mean((0, 2, 3)).tolist() for k, name in enumerate(dm.class_names)}
    assert means == {"bmp": [40, 80, 120], "tiff": [200, 0, 50], "deep": [255, 255, 255]}


def test_folder_cache_reused_and_invalidated(tmp_path, image_folder):
    root = image_folder(per_class=6)
    cache = tmp_path / "cache"
    folder_dm(root, tmp_path).setup("fit")
    files = list(cache.glob("*.u8"))
    assert len(files) == 1
    # Blank the cached pixels: a second setup that shows blank images read the cache, not the files.
    files[0].write_bytes(bytes(files[0].stat().st_size))
    again = folder_dm(root, tmp_path)
    again.setup("fit")
    assert all_images(again).x.max() == 0
    assert list(cache.glob("*.u8")) == files

    changed = root / "dog" / "3.png"
    Image.new("RGB", (20, 20), (1, 2, 3)).save(changed)
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    fresh = folder_dm(root, tmp_path)
    fresh.setup("fit")
    assert len(list(cache.glob("*.u8"))) == 2
    assert all_images(fresh).x.max() > 0
    # A different image size is a different cache entry too.
    folder_dm(root, tmp_path, image_size=8).setup("fit")
    assert len(list(cache.glob("*.u8"))) == 3


# -- augmentation ------------------------------------------------------------------------------------
def batch(n=6, c=3, h=9, w=9):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(0))


def test_augment_hflip_only_is_a_flip():
    x = batch(h=8, w=11)
    assert torch.allclose(Augment(hflip=1.0)(x), torch.flip(x, dims=[-1]), atol=1e-5)


def test_augment_all_zero_is_identity():
    x = batch()
    aug = Augment(hflip=0.0, rotation=0.0, zoom=0.0, translate=0.0)
    assert not aug.active
    assert torch.equal(aug(x), x)


def test_augment_rotation_keeps_center_pixel():
    x = batch(n=16)
    out = Augment(rotation=40.0)(x, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(out[..., 4, 4], x[..., 4, 4], atol=1e-5)
    assert not torch.allclose(out, x, atol=1e-2)  # the rest did move


def test_augment_draws_per_image():
    x = batch(n=64)
    out = Augment(hflip=0.5)(x, generator=torch.Generator().manual_seed(2))
    flipped = torch.tensor([torch.allclose(o, torch.flip(i, dims=[-1]), atol=1e-5) for o, i in zip(out, x)])
    kept = torch.tensor([torch.allclose(o, i, atol=1e-5) for o, i in zip(out, x)])
    assert (flipped | kept).all()
    assert 10 < int(flipped.sum()) < 54


def test_augment_applies_in_training_only():
    dm = Synthetic(n_train=64, n_test=16, size=8, batch_size=8, normalize=False, augment={"hflip": 1.0})
    dm.setup("fit")
    x = dm.splits["train"].x[:8]
    plain = dm.prepare_batch(x, training=False)
    assert torch.allclose(plain, x.float() / 255)
    assert torch.allclose(dm.prepare_batch(x, training=True), torch.flip(plain, dims=[-1]), atol=1e-5)
