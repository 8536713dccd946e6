"""Shared fixtures: a throwaway MLflow DB, generated idx files and image folders, small-data overrides."""
import glob
import gzip
import importlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

LAB = [sys.executable, "-m", "lab.cli"]
PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))

def _write_idx(path: Path, array: np.ndarray) -> Path:
    """An uint8 idx file as MNIST ships it (gzipped when the name ends in .gz)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def make_idx_dataset(root: Path, n_train: int = 60, n_test: int = 20, side: int = 28, classes: int = 10,
                     seed: int = 0) -> Path:
    """The four MNIST-format files (gzipped) with every class present in both splits."""
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, side, side)))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % classes)
    return root


def make_image_folder(root: Path, classes=("cat", "dog", "fox"), per_class: int = 10, side: int = 20,
                      mode: str = "RGB", ext: str = "png", seed: int = 0) -> Path:
    """ROOT/<class>/<i>.<ext>: one base colour per class plus noise, so the classes are learnable."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, 3)
        for i in range(per_class):
            pixels = np.clip(base + rng.normal(0, 20, (side, side, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "RGB").convert(mode).save(root / name / f"{i}.{ext}")
    return root


def target_class(target: str) -> type:
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


def pytest_configure(config):
    # Library notices a test cannot act on: torchvision's TorchCodec announcement on every decode_image,
    # Lightning's pytree and log-interval hints, SQLAlchemy internals of MLflow's store.
    for line in ("ignore:The image decoding and encoding capabilities:DeprecationWarning",
                 "ignore:.*LeafSpec.*", "ignore:.*smaller than the logging interval.*",
                 "ignore:The ``noload`` loader strategy is deprecated"):
        config.addinivalue_line("filterwarnings", line)


@pytest.fixture
def write_idx():
    return _write_idx


@pytest.fixture
def idx_dataset(tmp_path):
    return lambda root=None, **kw: make_idx_dataset(Path(root or tmp_path / "idx"), **kw)


@pytest.fixture
def image_folder(tmp_path):
    return lambda root=None, **kw: make_image_folder(Path(root or tmp_path / "images"), **kw)


@pytest.fixture
def small_data(tmp_path):
    """Overrides that make a composed data config small and runnable offline, chosen by its _target_ class:
    generated idx files for MNIST-format sets, a generated image folder for folders, fewer images for
    synthetic. image_size=None keeps each dataset's own size."""
    from lab.data.folder import ImageFolder
    from lab.data.idx import IdxDataModule
    from lab.data.synthetic import Synthetic

    def overrides(target: str, image_size: int | None = None, batch_size: int = 8) -> list[str]:
        cls = target_class(target)
        out = [f"data.batch_size={batch_size}"]
        if image_size is not None:
            out.append(f"data.image_size={image_size}")
        if issubclass(cls, Synthetic):
            out += ["data.n_train=64", "data.n_test=16"] + ([f"data.size={image_size}"] if image_size else [])
        elif issubclass(cls, IdxDataModule):
            root = make_idx_dataset(tmp_path / f"idx_{cls.__name__}", classes=len(cls.CLASS_NAMES))
            out += [f"data.root={root}", "data.download=false"]
        elif issubclass(cls, ImageFolder):
            root = make_image_folder(tmp_path / f"folder_{cls.__name__}")
            out += [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}"]
        return out

    return overrides


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    """A fresh SQLite tracking DB; the working directory moves to tmp so ./mlruns artifacts land there too."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def keep_sigint():
    """Lightning ignores SIGINT after it catches a KeyboardInterrupt; give Ctrl-C back to pytest."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


@pytest.fixture(scope="session")
def lab_exe() -> str:
    exe = Path(sys.executable).parent / "lab"
    found = str(exe) if exe.is_file() else shutil.which("lab")
    if found is None:
        pytest.fail("the `lab` console script is not installed: pip install -e .")
    return found


@pytest.fixture
def cli_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "MLFLOW_"))}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return env


@pytest.fixture
def workdir(tmp_path):
    """A working directory with its own MLflow DB and its own copy of conf/ (exports land there)."""
    from lab.config import conf_dir

    shutil.copytree(conf_dir(), tmp_path / "conf")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "MLFLOW_", "LAB_"))}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db", LAB_CONF_DIR=str(tmp_path / "conf"))
    return tmp_path, env


@pytest.fixture
def lab(workdir):
    """lab(*args): runs the real `lab` command in the working directory; returns the CompletedProcess."""
    tmp, env = workdir

    def run(*args, timeout=600, cwd=None, env_extra=None):
        return subprocess.run([*LAB, *map(str, args)], cwd=cwd or tmp, env={**env, **(env_extra or {})},
                              capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture
def start_lab(workdir):
    """start_lab(*args): the real `lab` command in the background, stdout and stderr merged."""
    tmp, base = workdir
    procs = []

    def start(*args, cwd=None, env=None):
        proc = subprocess.Popen([*LAB, *map(str, args)], cwd=cwd or tmp, env={**base, **(env or {})},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def journal_study(workdir):
    """journal_study(tmp, name): the study a `lab sweep` wrote to runs/<name>/study.journal, read by Optuna."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    def load(tmp, name):
        return optuna.load_study(study_name=name, storage=JournalStorage(
            JournalFileBackend(str(Path(tmp) / "runs" / name / "study.journal"))))

    return load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL cluster on 127.0.0.1 (Debian's postgresql package; .ci/run installs it)."""
    if not PG_BIN:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    bin_dir = os.path.dirname(PG_BIN[-1])
    data = tempfile.mkdtemp(prefix="lab-pg-", dir="/tmp")
    as_user = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(data, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True)  # noqa: E731
    run(f"{bin_dir}/initdb", "-D", f"{data}/db", "-A", "trust", "-U", "postgres")
    run(f"{bin_dir}/pg_ctl", "-D", f"{data}/db", "-w", "-l", f"{data}/log",
        "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start")
    try:
        run(f"{bin_dir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "lab")
        yield f"postgresql://postgres@127.0.0.1:{port}/lab"
    finally:
        run(f"{bin_dir}/pg_ctl", "-D", f"{data}/db", "-m", "immediate", "stop")
        shutil.rmtree(data, ignore_errors=True)
