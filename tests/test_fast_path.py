"""The fast data path gives what the slow tutorial path gives: same images, same labels, same normalization."""
import gzip
import shutil
from pathlib import Path

import pytest
import torch
from torchvision import datasets, transforms

from lab.data.idx import FashionMNIST

SYSTEM = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow  # the real Fashion-MNIST test set, through both pipelines
@pytest.mark.skipif(not SYSTEM.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_device_resident_batches_equal_the_dataloader_pipeline(tmp_path):
    dm = FashionMNIST(root=str(tmp_path / "none"), download=False, batch_size=500)
    dm.setup()
    # torchvision's class reads uncompressed files from ROOT/FashionMNIST/raw/.
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in SYSTEM.glob("*.gz"):
        with gzip.open(gz) as src, open(raw / gz.stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    slow = datasets.FashionMNIST(str(tmp_path / "tv"), train=False, download=False, transform=transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(dm.mean.tolist(), dm.std.tolist())]))
    loader = torch.utils.data.DataLoader(slow, batch_size=500, shuffle=False)
    assert dm.class_names == slow.classes
    batches = 0
    for (x_fast, y_fast), (x_slow, y_slow) in zip(dm.test_dataloader(), loader):
        assert torch.equal(y_fast, y_slow)
        torch.testing.assert_close(dm.prepare_batch(x_fast, training=False), x_slow, atol=1e-5, rtol=1e-5)
        batches += 1
    assert batches == len(loader) == 20


def test_training_batches_cover_the_split_once_per_epoch_in_a_new_order():
    from lab.data.synthetic import Synthetic

    dm = Synthetic(n_train=300, n_test=50, batch_size=64)
    dm.setup()
    epochs = []
    for _ in range(2):
        xs, ys = zip(*dm.train_dataloader())
        epochs.append(torch.cat(xs).flatten(1))
        assert len(torch.cat(ys)) == len(dm.splits["train"].y)
    # Same multiset of images each epoch (rows sorted), different order.
    key = lambda x: x.float() @ torch.arange(x.shape[1], dtype=torch.float)  # noqa: E731
    assert torch.equal(key(epochs[0]).sort().values, key(epochs[1]).sort().values)
    assert not torch.equal(epochs[0], epochs[1])
