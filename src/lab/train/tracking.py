"""MLflow: where runs go, how they start and end, and what each run records beside its metrics.

Every run is created here and ended here with FINISHED, FAILED or KILLED; nothing else sets a status.
"""
import csv
import io
import json
import os
import platform
import re
import subprocess
import time
import warnings
from contextlib import contextmanager, nullcontext
from functools import cache
from importlib import metadata
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from lab import uris
from lab.errors import Interrupted, StopRun
from lab.locks import file_lock
from lab.train import confusion
from lab.uris import absolute_uri, mask_password  # tracking.mask_password is used by callers

PACKAGES = ("torch", "torchvision", "pytorch-lightning", "torchmetrics", "hydra-core", "mlflow", "optuna")
DEFAULT_URI = "sqlite:///mlflow.db"
# The experiment tag that makes MLflow 3's UI open an experiment in its model-training view, not the GenAI one.
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
MAX_PARAM_CHARS = 6000  # MLflow's server-side limit for one param value
MODEL_TAG = "lab.model_uri"  # run tag: the models:/ URI of the run's logged model (its tested weights; exported.log)
SRC_DIR = Path(__file__).resolve().parent


def tracking_uri(uri: str | None = None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


@contextmanager
def creation_lock(uri: str):
    """One process at a time creates a SQLite store's schema: MLflow migrates a fresh database on first use,
    and two sweeps (or `lab train`s) started together on one crashed in the migration."""
    db = uris.sqlite_path(uri)
    if db is None:
        yield  # a server or a database server serialises this itself
        return
    with file_lock(db.with_name(f".{db.name}.create.lock")):  # hidden: it stays beside the user's mlflow.db
        yield


def create_sqlite_store(uri: str) -> None:
    """A fresh SQLite store is built under a temporary name, then renamed into place. MLflow's schema migration
    takes seconds, and a Ctrl-C inside it used to leave a half-made mlflow.db that every later command failed on
    (`table _alembic_tmp_experiments already exists`). Call under creation_lock."""
    path = uris.sqlite_path(uri)
    if path is None or (path.exists() and path.stat().st_size > 0):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in path.parent.glob(f".{path.name}.creating-*"):  # left by a creator that was killed
        old.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
    try:
        MlflowClient(f"sqlite:///{tmp}").search_experiments(max_results=1)  # runs every migration
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def experiment_id(uri: str, name: str) -> str:
    """Create the DB schema and the experiment once, before any worker touches them (SQLite migration race)."""
    with creation_lock(uri):
        create_sqlite_store(uri)
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(name)
        if exp is None:
            try:
                return client.create_experiment(name, tags={KIND_TAG: KIND})
            except mlflow.exceptions.MlflowException:  # another process created it between the two calls
                exp = client.get_experiment_by_name(name)
        if exp.tags.get(KIND_TAG) is None:  # created before lab set it, or by someone else: a user's own kind stays
            client.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
        return exp.experiment_id


def numbered_name(client: MlflowClient, exp_id: str, prefix: str) -> str:
    """PREFIX-N with N one above the highest PREFIX-N in the experiment (deleted runs included), from 1."""
    from mlflow.entities import ViewType

    quoted = prefix.replace("'", "\\'")
    runs = client.search_runs([exp_id], f"attributes.run_name LIKE '{quoted}-%'", run_view_type=ViewType.ALL,
                              max_results=50_000)
    numbers = [int(m.group(1)) for r in runs if (m := re.fullmatch(re.escape(prefix) + r"-(\d+)", r.info.run_name))]
    return f"{prefix}-{max(numbers, default=0) + 1}"


def flatten(cfg: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = mask_password(json.dumps(value) if isinstance(value, (list, dict)) else str(value))
    return out


def metric_name(name: str) -> str:
    """MLflow allows letters, digits, _ - . space and / in metric names; anything else becomes _."""
    return re.sub(r"[^\w\-. /]", "_", name)


@cache  # once per process: the code it runs is what it imported at start (a worker's 8 runs paid 2 git calls each)
def git_state() -> dict[str, str]:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(SRC_DIR), *args], capture_output=True, text=True, timeout=10).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        return {}
    if not commit:
        return {}
    # mlflow.source.git.commit is what MLflow's UI shows as the run's source version.
    return {"git.commit": commit, "mlflow.source.git.commit": commit, "git.dirty": str(dirty).lower()}


@cache
def environment_tags() -> dict[str, str]:
    tags = {"python": platform.python_version(), "host": platform.node()}
    for pkg in PACKAGES:
        try:
            tags[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return tags


@contextmanager
def run(uri: str, experiment: str, run_name: str | None = None, parent_run_id: str | None = None,
        tags: dict[str, str] | None = None, name_prefix: str | None = None):
    """Yields (client, run_id). The run ends FINISHED, or KILLED on an interrupt, or FAILED on any error.
    No run_name: name_prefix-N, numbered within the experiment (else MLflow's generated name)."""
    exp_id = experiment_id(uri, experiment)  # first: it creates a fresh store under the creation lock
    client = MlflowClient(uri)
    all_tags = {**environment_tags(), **git_state(), **(tags or {})}  # a copy: the cached dicts stay as they are
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    with creation_lock(uri) if run_name is None and name_prefix else nullcontext():  # two `lab train`s: two numbers
        if run_name is None and name_prefix:
            run_name = numbered_name(client, exp_id, name_prefix)
        created = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    run_id = created.info.run_id
    try:
        yield client, run_id
    except (KeyboardInterrupt, SystemExit, Interrupted) as stop:
        # Lightning turns Ctrl-C inside fit into sys.exit(1): both mean "interrupted", not "crashed".
        client.set_tag(run_id, "lab.end", type(stop).__name__)
        client.set_terminated(run_id, "KILLED")
        raise
    except StopRun as stop:
        client.set_tag(run_id, "lab.stopped", str(stop)[:5000])
        client.set_terminated(run_id, "FINISHED")
        raise
    except BaseException as err:
        client.set_tag(run_id, "lab.error", f"{type(err).__name__}: {err}"[:5000])
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def log_config(client: MlflowClient, run_id: str, cfg: DictConfig) -> None:
    """Every leaf of the resolved config as a param (full value), plus the whole of it as config.yaml."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    params = [Param(k, v[:MAX_PARAM_CHARS]) for k, v in flatten(resolved).items()]
    client.log_batch(run_id, params=params, synchronous=True)  # MLflow splits it into requests it accepts
    client.log_text(run_id, mask_password(OmegaConf.to_yaml(resolved)), "config.yaml")


def log_test_report(client: MlflowClient, run_id: str, report: dict, step: int, metrics: dict[str, float] | None = None,
                    tags: dict[str, str] | None = None) -> None:
    """Per-class F1 metrics, classification_report.json, per_class.json, confusion_matrix.csv and .png. metrics,
    tags: more of the run's, written in the same MLflow batch as the per-class F1 (one store commit for all)."""
    classes = list(report["classes"])
    confusion_rows = report["confusion"]
    now = int(time.time() * 1000)  # Metric's timestamp is milliseconds since 1970; 0 would plot them in 1970
    batch = [Metric(metric_name(f"test/f1/{name}"), v["f1"], now, step) for name, v in report["classes"].items()]
    batch += [Metric(k, v, now, step) for k, v in (metrics or {}).items()]
    client.log_batch(run_id, metrics=batch, tags=[RunTag(k, v) for k, v in (tags or {}).items()], synchronous=True)
    client.log_dict(run_id, report["classes"], "classification_report.json")
    # The same numbers as an MLflow table: the run's Artifacts tab renders it (and it is queryable).
    client.log_table(run_id, data={"class": classes, **{key: [report["classes"][c][key] for c in classes]
                                                       for key in ("precision", "recall", "f1", "support")}},
                     artifact_file="per_class.json")

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["true\\predicted", *classes])
    for name, row in zip(classes, confusion_rows):
        writer.writerow([name, *row])
    client.log_text(run_id, buf.getvalue(), "confusion_matrix.csv")
    client.log_image(run_id, confusion.image(confusion_rows, classes), artifact_file="confusion_matrix.png")


def log_dataset(client: MlflowClient, run_id: str, datamodule, name: str, source: str | None) -> str:
    """The data as the run's MLflow input (the UI's Datasets column), context "train": name, source (a folder, or
    the datamodule's class), digest (SHA-256 of the train and test uint8 tensors and the class names, so runs
    on different data or another split differ) and a profile of split sizes and class count. Returns the digest."""
    import hashlib

    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset as DatasetEntity
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    h = hashlib.sha256("\n".join(datamodule.class_names).encode())
    content = datamodule.content_id()  # an image folder's cache keys: hashing GBs of pixels per run costs seconds
    if content is not None:
        h.update(content.encode())
    for split in ("train", "test"):
        part = datamodule.splits[split]
        h.update(str(tuple(part.shape)).encode())
        if content is None:
            for chunk in part.chunks():  # ~50 MB for Fashion-MNIST: about 0.1 s with the logging
                h.update(chunk.numpy())
        h.update(part.index.contiguous().cpu().numpy())
        h.update(part.y.contiguous().cpu().numpy())
    digest = h.hexdigest()[:16]
    profile = {f"{split}_images": int(len(datamodule.splits[split].y)) for split in ("train", "val", "test")}
    profile |= {"classes": int(datamodule.num_classes), "shape": list(map(int, datamodule.shape))}
    if source is not None:
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": two local sources, the same class
            warnings.simplefilter("ignore")
            src = resolve_dataset_source(source)
    else:
        src = CodeDatasetSource({"lab.data": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}"})

    class Profiled(MetaDataset):  # MetaDataset has no profile; MLflow's UI shows the one to_dict() gives
        @property
        def profile(self):
            return profile

        def to_dict(self):
            return {**super().to_dict(), "profile": json.dumps(profile)}

    # What Dataset._to_mlflow_entity() does, through the public entity and to_dict().
    fields = Profiled(src, name=name, digest=digest).to_dict()
    entity = DatasetEntity(name=fields["name"], digest=fields["digest"], source_type=fields["source_type"],
                           source=fields["source"], schema=fields.get("schema"), profile=fields.get("profile"))
    inputs = [DatasetInput(entity, [InputTag(MLFLOW_DATASET_CONTEXT, "train")])]
    for attempt in range(5):
        try:
            client.log_inputs(run_id, inputs)
            break
        except mlflow.exceptions.MlflowException as err:
            # MLflow's store looks the dataset up, then inserts it: 8 trials starting at once on one SQLite file
            # raced there (UNIQUE constraint failed: datasets...) and one trial failed. Again, it finds the row.
            if not any(w in str(err) for w in ("UNIQUE constraint", "duplicate key", "IntegrityError")) or attempt == 4:
                raise
            time.sleep(0.05 * (attempt + 1))
    return digest


def run_url(client: MlflowClient, uri: str, run_id: str) -> str | None:
    """The run's page when uri is an MLflow server (http/https), else None."""
    if not uri.startswith(("http://", "https://")):
        return None
    exp_id = client.get_run(run_id).info.experiment_id
    return uris.run_url(uri, exp_id, run_id)


def summary(client: MlflowClient, uri: str, run_id: str) -> str:
    """What `lab train` prints at its end: test accuracy, macro F1, the tested epoch, where to look."""
    run = client.get_run(run_id)
    m, tags = run.data.metrics, run.data.tags
    lines = [f"run {run.info.run_name} ({run_id}) {run.info.status}"]
    if "test/acc" in m:
        lines.append(f"  test accuracy {m['test/acc']:.4f}, macro F1 {m.get('test/f1_macro', float('nan')):.4f}")
    if "lab.best_epoch" in tags:
        lines.append(f"  tested: the best epoch by {tags.get('lab.monitor', 'the monitored metric')}, epoch "
                     f"{tags['lab.best_epoch']} (counting from 0, as the step in MLflow's charts)")
    if MODEL_TAG in tags:
        lines.append(f"  model: mlflow.pytorch.load_model('{tags[MODEL_TAG]}')")
    url = run_url(client, uri, run_id)
    if url:
        lines.append(f"  MLflow: {url}")
    else:
        backend = uri if uri.startswith("sqlite:////") else absolute_uri(uri)
        lines.append(f"  MLflow: mlflow ui --backend-store-uri {mask_password(backend)}  (then open "
                     f"http://127.0.0.1:5000; `make ui` in a lab checkout)")
    return "\n".join(lines)
