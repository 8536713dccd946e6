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
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from lab import figures
from lab.errors import Interrupted, StopRun  # noqa: E402
from lab.locks import file_lock
from lab.uris import mask_password  # noqa: E402,F401 - tracking.mask_password is used by callers

PACKAGES = ("torch", "torchvision", "pytorch-lightning", "torchmetrics", "hydra-core", "mlflow", "optuna")
DEFAULT_URI = "sqlite:///mlflow.db"
MAX_PARAM_CHARS = 6000  # MLflow's server-side limit for one param value
SRC_DIR = Path(__file__).resolve().parent


def tracking_uri(uri: str | None = None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


@contextmanager
def creation_lock(uri: str):
    """One process at a time creates a SQLite store's schema: MLflow migrates a fresh database on first use,
    and two sweeps (or `lab train`s) started together on one crashed in the migration."""
    if not uri.startswith("sqlite:///"):
        yield  # a server or a database server serialises this itself
        return
    with file_lock(Path(uri.removeprefix("sqlite:///") + ".create.lock")):
        yield


def experiment_id(uri: str, name: str) -> str:
    """Create the DB schema and the experiment once, before any worker touches them (SQLite migration race)."""
    with creation_lock(uri):
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(name)
        except mlflow.exceptions.MlflowException:  # another process created it between the two calls
            return client.get_experiment_by_name(name).experiment_id


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
        tags: dict[str, str] | None = None):
    """Yields (client, run_id). The run ends FINISHED, or KILLED on an interrupt, or FAILED on any error."""
    exp_id = experiment_id(uri, experiment)  # first: it creates a fresh store under the creation lock
    client = MlflowClient(uri)
    all_tags = {**environment_tags(), **git_state(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
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


def log_test_report(client: MlflowClient, run_id: str, report: dict, step: int) -> None:
    """Per-class F1 metrics, classification_report.json, confusion_matrix.csv and .png."""
    from sklearn.metrics import ConfusionMatrixDisplay  # ~1 s of imports: not for the sweep parent

    classes = list(report["classes"])
    confusion = report["confusion"]
    now = int(time.time() * 1000)  # Metric's timestamp is milliseconds since 1970; 0 would plot them in 1970
    metrics = [Metric(metric_name(f"test/f1/{name}"), v["f1"], now, step) for name, v in report["classes"].items()]
    client.log_batch(run_id, metrics=metrics, synchronous=True)
    client.log_dict(run_id, report["classes"], "classification_report.json")

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["true\\predicted", *classes])
    for name, row in zip(classes, confusion):
        writer.writerow([name, *row])
    client.log_text(run_id, buf.getvalue(), "confusion_matrix.csv")

    side = max(4.0, 0.6 * len(classes) + 2)
    fig, ax = figures.figure(side + 1, side)
    ConfusionMatrixDisplay(np.array(confusion), display_labels=classes).plot(
        ax=ax, cmap="Blues", xticks_rotation=45, colorbar=True, values_format="d"
    )
    ax.set_title("Test confusion matrix (rows: true class)")
    fig.tight_layout()
    client.log_figure(run_id, fig, "confusion_matrix.png")

