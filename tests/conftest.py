"""Shared fixtures: a throwaway MLflow DB, generated idx files and image folders, small-data overrides."""
import os

# Before torch loads here or in any `lab` process a test starts: OpenMP threads that wait for work sleep instead
# of spinning. With two test processes on 2 cores, spinning threads burnt the CPU the other process needed.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import glob
import gzip
import importlib
import json
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

if TYPE_CHECKING:  # imported where used: seconds of import time that most tests do not need
    import optuna
    from mlflow.tracking import MlflowClient

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


def lab_main(capsys, *args) -> tuple[int, str, str]:
    """`lab ARGS` in this process (no torch import paid again): (exit status, stdout, stderr)."""
    from lab import cli

    try:
        cli.main([*map(str, args)])
        status = 0
    except SystemExit as stop:
        status = stop.code
    out = capsys.readouterr()
    return status, out.out, out.err


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


# The files that take longest on 2 cores, longest first (wall seconds of their tests in one `make test`, 2026-12-03:
# journeys ~730, supervision ~420, cluster ~340, faults ~320, stack_sweep ~310, outages ~270 ...). `make test` hands
# whole files to its processes in collection order (--no-loadscope-reorder): started last, test_journeys alone
# ran ~10 minutes after the other processes had finished; started first, it runs beside the short files.
LONGEST_FIRST = ("test_journeys", "test_supervision", "test_cluster", "test_faults", "test_stack_sweep",
                 "test_outages", "test_sweep_e2e", "test_seeds", "test_slurm", "test_warm_stop", "test_train_cli",
                 "test_readme", "test_ensemble", "test_confirm_report", "test_first_contact3", "test_install",
                 "test_data_scale", "test_disk_full", "test_mlflow_views", "test_server", "test_journal",
                 "test_serving", "test_objectives", "test_stack")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    order = {item: i for i, item in enumerate(items)}  # within a file, the file's own order (module fixtures)
    items.sort(key=lambda item: (rank.get(item.path.stem, len(rank)), order[item]))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """LAB_TEST_CPU=FILE: each test's CPU seconds (this process and the `lab` processes it waited for) appended as
    `seconds<TAB>test id`. The suite's time on 2 cores is CPU-bound: this, not wall time, says what to trim."""
    out = os.environ.get("LAB_TEST_CPU")
    if not out:
        return (yield)
    import resource

    def cpu() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    start = cpu()
    try:
        return (yield)
    finally:
        with open(out, "a") as f:
            f.write(f"{cpu() - start:.1f}\t{item.nodeid}\n")


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
    """small_data(target, image_size=None, batch_size=8, classes=None): overrides that make a composed data config
    small and runnable offline, chosen by its _target_ class's family (any subclass of these gets them): generated
    idx files for MNIST-format sets (IdxDataModule), a generated image folder for folders (ImageFolder), fewer
    images for Synthetic. Any other dataset class gives its own as a classmethod small_settings(scratch) ->
    {argument: value}, files it writes going under SCRATCH; a class with neither is used as it is (Digits: small
    and bundled). image_size=None keeps each dataset's own size; classes: that many classes for folders and
    Synthetic (a binary experiment), None: their defaults."""
    from lab.data.folder import ImageFolder
    from lab.data.idx import IdxDataModule
    from lab.data.synthetic import Synthetic

    def overrides(target: str, image_size: int | None = None, batch_size: int = 8,
                  classes: int | None = None) -> list[str]:
        cls = target_class(target)
        out = [f"data.batch_size={batch_size}"]
        if image_size is not None:
            out.append(f"data.image_size={image_size}")
        if "small_settings" in vars(cls):  # the class says itself what small data it needs
            settings = cls.small_settings(tmp_path / f"small_{cls.__name__}")
            out += [f"data.{key}={json.dumps(str(v) if isinstance(v, Path) else v)}" for key, v in settings.items()]
        elif issubclass(cls, Synthetic):
            out += ["data.n_train=64", "data.n_test=16"] + ([f"data.size={image_size}"] if image_size else [])
            out += [f"data.classes={classes}"] if classes else []
        elif issubclass(cls, IdxDataModule):
            root = make_idx_dataset(tmp_path / f"idx_{cls.__name__}", classes=len(cls.CLASS_NAMES))
            out += [f"data.root={root}", "data.download=false"]
        elif issubclass(cls, ImageFolder):
            names = ("cat", "dog", "fox", "owl", "elk")[:classes] if classes else ("cat", "dog", "fox")
            root = make_image_folder(tmp_path / f"folder_{cls.__name__}_{len(names)}", classes=names)
            out += [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}"]
        elif hasattr(cls, "small_settings"):
            settings = cls.small_settings(tmp_path / f"small_{cls.__name__}")
            out += [f"data.{key}={json.dumps(str(v) if isinstance(v, Path) else v)}" for key, v in settings.items()]
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


def _lab_env(tmp: Path) -> dict:
    """The environment of a `lab` command run in TMP: its own MLflow DB and conf/, nothing inherited from Hydra,
    MLflow or lab settings of the calling shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "MLFLOW_", "LAB_"))}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db", LAB_CONF_DIR=str(tmp / "conf"))
    return env


def _copy_conf(tmp: Path) -> None:
    from lab.config import conf_dir

    shutil.copytree(conf_dir(), tmp / "conf")


def _run_lab(args, cwd, env, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([*LAB, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _load_journal(tmp, name):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name=name, storage=JournalStorage(
        JournalFileBackend(str(Path(tmp) / "runs" / name / "study.journal"))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A sweep small enough for seconds per trial: 4 classes of 8x8 images, a 32-unit MLP, 2 epochs.
TINY = ["data=synthetic", "model=mlp", "data.n_train=320", "data.n_test=64", "data.size=8",
        "model.net.hidden=[32]", "trainer.max_epochs=2"]
# Trials long enough (several epochs of ~1 s) to be caught in the middle, with a last.ckpt after every epoch.
SLOW_TRIALS = ("data.n_train=6000", "data.size=24", "model.net.hidden=[256,256]", "trainer.max_epochs=4",
               "checkpoint.last_every_s=0")
SLOW_BODY = """
metric: val/acc
n_trials: {n}
sampler: {{name: random, seed: 0}}
params:
  model.optimizer.lr: {{type: float, low: 1.0e-3, high: 1.0e-2, log: true}}
"""


def _write_sweep(path: Path, study: str, body: str, extra: tuple[str, ...] = ()) -> Path:
    path.write_text(f"study: {study}\noverrides: {json.dumps([*TINY, *extra])}\n{body}")
    return path


@pytest.fixture
def workdir(tmp_path):
    """(tmp, env): a working directory with its own MLflow DB and its own copy of conf/ (exports land there)."""
    _copy_conf(tmp_path)
    return tmp_path, _lab_env(tmp_path)


@pytest.fixture
def lab(workdir):
    """lab(*args): runs the real `lab` command in the working directory; returns the CompletedProcess.
    env= replaces the working directory's environment, env_extra= adds to it (to env= when both are given)."""
    tmp, base = workdir

    def run(*args, timeout=600, cwd=None, env=None, env_extra=None):
        return _run_lab(args, cwd or tmp, {**(base if env is None else env), **(env_extra or {})}, timeout)

    return run


@pytest.fixture
def start_lab(workdir):
    """start_lab(*args): the real `lab` command in the background, stdout and stderr merged; killed at teardown
    if still running. env= and env_extra= as for `lab`."""
    tmp, base = workdir
    procs = []

    def start(*args, cwd=None, env=None, env_extra=None):
        proc = subprocess.Popen([*LAB, *map(str, args)], cwd=cwd or tmp,
                                env={**(base if env is None else env), **(env_extra or {})},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def journal():
    """journal(tmp, name): the study a `lab sweep` wrote to TMP/runs/<name>/study.journal, read by Optuna."""
    return _load_journal


@pytest.fixture
def sweep_file():
    """sweep_file(path, study, body, extra=()): writes a sweep file of TINY trials (plus the EXTRA overrides)
    whose metric, n_trials, sampler, params... are BODY; returns PATH."""
    return _write_sweep


@pytest.fixture
def slow_sweep_file():
    """slow_sweep_file(path, study, n): a random-search sweep of N trials of several ~1 s epochs each, long enough
    to kill or interrupt a worker in the middle of one (after its first last.ckpt)."""
    return lambda path, study, n: _write_sweep(path, study, SLOW_BODY.format(n=n), extra=SLOW_TRIALS)


@pytest.fixture
def children():
    """children(client, parent_id): the MLflow runs nested under a sweep's parent run."""
    def find(client, parent_id):
        exp = client.get_run(parent_id).info.experiment_id
        return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000)

    return find


@pytest.fixture(scope="session")
def free_port():
    """free_port(): a TCP port on 127.0.0.1 that nothing listens on now."""
    return _free_port


@dataclass
class Swept:
    tmp: Path
    env: dict
    sweep_file: Path
    name: str
    study: "optuna.Study"
    client: "MlflowClient"
    parent_id: str
    experiment_id: str


@dataclass
class Reported:
    path: Path
    stdout: str
    plots: set[str]  # the alt text of every image the page must hold
    interactive: set[str]  # the Optuna plots it must hold as plotly figures (div id plot-NAME)


@pytest.fixture(scope="session")
def swept(tmp_path_factory) -> Swept:
    """One real 4-trial `lab sweep` (random search over lr and dropout of TINY trials), run once per session
    and shared by tests/test_confirm_report.py and tests/test_browser.py."""
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("swept")
    _copy_conf(tmp)
    env = {**_lab_env(tmp), "LAB_TORCH_THREADS": "1"}
    name = "confirm_report"
    path = _write_sweep(tmp / "sweep.yaml", name, """metric: val/acc
direction: maximize
n_trials: 4
sampler: {name: random, seed: 3}
params:
  model.optimizer.lr: {type: float, low: 1.0e-3, high: 3.0e-2, log: true}
  model.net.dropout: {type: float, low: 0.0, high: 0.4}
""")
    done = _run_lab(["sweep", path, "--workers", "1", "--no-live"], tmp, env, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    study = _load_journal(tmp, name)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    return Swept(tmp, env, path, name, study, client, parent_id, client.get_run(parent_id).info.experiment_id)


@pytest.fixture(scope="session")
def reported(swept) -> Reported:
    """`lab report` of the `swept` sweep: the page it wrote and what it printed."""
    done = _run_lab(["report", swept.sweep_file], swept.tmp, swept.env, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return Reported(swept.tmp / "runs" / swept.name / "report.html", done.stdout,
                    {"learning curves", "confusion matrix", "per-class F1", "misclassified test images"},
                    {"optimization_history", "param_importances", "parallel_coordinate", "slice"})


class PostgresServer:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (Debian's postgresql package; .ci/run installs it) that a test
    may stop (`pg_ctl -m fast stop`, as an administrator's restart does) and start again on the same port."""

    def __init__(self):
        self.bin_dir = os.path.dirname(PG_BIN[-1])
        self.data = tempfile.mkdtemp(prefix="lab-pg-", dir="/tmp")
        self.as_user = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            shutil.chown(self.data, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.port = _free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/lab"
        self.pg("initdb", "-D", f"{self.data}/db", "-A", "trust", "-U", "postgres")
        self.start()
        self.pg("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "lab")

    def pg(self, tool: str, *args: str) -> None:
        subprocess.run([*self.as_user, f"{self.bin_dir}/{tool}", *args], check=True, capture_output=True, text=True)

    def start(self) -> None:
        self.pg("pg_ctl", "-D", f"{self.data}/db", "-w", "-l", f"{self.data}/log",
                "-o", f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1", "start")

    def stop(self, mode: str = "fast") -> None:
        self.pg("pg_ctl", "-D", f"{self.data}/db", "-w", "-m", mode, "stop")

    def remove(self) -> None:
        subprocess.run([*self.as_user, f"{self.bin_dir}/pg_ctl", "-D", f"{self.data}/db", "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(self.data, ignore_errors=True)


@pytest.fixture
def postgres_server():
    """A PostgresServer (url, stop(), start()), removed at teardown."""
    if not PG_BIN:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    server = PostgresServer()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def postgres(postgres_server):
    """The URL of a throwaway PostgreSQL database on 127.0.0.1."""
    return postgres_server.url
