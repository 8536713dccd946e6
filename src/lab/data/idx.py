"""MNIST-format datasets (idx files): Fashion-MNIST and MNIST.

Files are looked up, gzipped or not, in data.root and then in system folders (Debian's
dataset-fashion-mnist package installs /usr/share/datasets/fashion-mnist); when none has them they are
downloaded from data.url into data.root.
"""
from pathlib import Path

from lab.data import fetch
from lab.data.base import Images, Loaded, TensorDataModule
from lab.data.idx_file import read_idx
from lab.errors import LabError

FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


class IdxDataModule(TensorDataModule):
    CLASS_NAMES: list[str] = []
    SYSTEM_DIRS: tuple[str, ...] = ()  # fetch.DATASETS's: the folders a system package installs the files in
    DATASET = ""  # its name in lab.data.fetch.DATASETS: where it downloads from, and the pinned MD5s

    def __init__(self, root: str = "data/mnist", url: str | None = None, download: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.root, self.url, self.download = Path(root).expanduser(), url, download

    def _find(self, stem: str) -> Path | None:
        for folder in (self.root, *map(Path, self.SYSTEM_DIRS)):
            for candidate in (folder / stem, folder / f"{stem}.gz"):
                if candidate.is_file():
                    return candidate
        return None

    def _missing(self) -> list[str]:
        return [stem for stem in FILES.values() if self._find(stem) is None]

    def prepare_data(self) -> None:
        missing = self._missing()
        if not missing:
            return
        if not self.download:
            raise LabError(self._where_message(missing))
        # The one download path: MD5 and idx format checked, no junk left behind.
        fetch.fetch_idx(fetch.DATASETS[self.DATASET], self.root, self.url, force=False, system_dirs=False)

    def check_source(self) -> None:
        missing = self._missing()
        if missing and not self.download:
            raise LabError(self._where_message(missing))

    def _where_message(self, missing: list[str]) -> str:
        places = ", ".join(str(p) for p in (self.root, *self.SYSTEM_DIRS))
        return f"{self.name} files {missing} were not found in {places}: copy them (gzipped or not) into {self.root}."

    def load(self) -> Loaded:
        self.prepare_data()
        t = {key: read_idx(self._find(stem)) for key, stem in FILES.items()}
        return Loaded(
            train=Images(t["train_x"].unsqueeze(1), t["train_y"].long()),
            test=Images(t["test_x"].unsqueeze(1), t["test_y"].long()),
            class_names=list(self.CLASS_NAMES),
        )


class FashionMNIST(IdxDataModule):
    CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]  # fmt: skip
    SYSTEM_DIRS = fetch.DATASETS["fashion_mnist"].system_dirs
    DATASET = "fashion_mnist"


class MNIST(IdxDataModule):
    CLASS_NAMES = [str(d) for d in range(10)]
    SYSTEM_DIRS = fetch.DATASETS["mnist"].system_dirs
    DATASET = "mnist"
