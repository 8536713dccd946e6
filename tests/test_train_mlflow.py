"""lab.train.run end to end into a throwaway SQLite MLflow DB, read back through MlflowClient."""
import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra.utils import get_class
from mlflow.tracking import MlflowClient
from pytorch_lightning.callbacks import Callback
from sklearn.metrics import f1_score

from lab.config import load
from lab.errors import LabError
from lab.train import job
from lab.train.module import Diverged

EPOCHS = 2
# Small and quick to learn: four classes, 12x12 images, a narrow CNN.
FAST = ["data=synthetic", "data.n_train=256", "data.n_test=96", "data.size=12", "data.noise=0.3",
        "data.batch_size=32", "model=cnn", "model.net.channels=[8,16]", "model.net.hidden=[32]",
        "model.optimizer.lr=0.01", "trainer.enable_progress_bar=false"]


def only_run(uri: str):
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    return client, runs[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One 2-epoch run shared by the readback tests below (training is the slow part)."""
    tmp = tmp_path_factory.mktemp("finished")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        cfg = load([*FAST, f"trainer.max_epochs={EPOCHS}", f"mlflow.tracking_uri={uri}", "mlflow.run_name=e2e"])
        results = job.run(cfg, tmp / "out", run_name=cfg.mlflow.run_name)
    client, run = only_run(uri)
    return client, run, results, cfg, tmp


def test_run_finished(finished):
    client, run, results, _, _ = finished
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "e2e"
    assert results["test/acc"] > 0.5  # four learnable classes: better than chance (0.25)


def test_params_are_the_flattened_resolved_config(finished):
    _, run, _, _, _ = finished
    params = run.data.params
    assert params["model.net._target_"] == "lab.train.nets.CNN"
    assert params["model.optimizer._target_"] == "torch.optim.Adam"
    assert params["data._target_"] == "lab.data.synthetic.Synthetic"
    assert params["model.net.channels"] == "[8, 16]"
    assert params["trainer.max_epochs"] == str(EPOCHS)
    assert params["data.size"] == "12"
    assert params["seed"] == "0"


def test_epoch_metric_histories(finished):
    client, run, _, _, _ = finished
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "val/f1_macro"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(EPOCHS)), key
        assert all(np.isfinite(m.value) for m in history)
        assert all(m.timestamp > 1e12 for m in history)  # milliseconds since 1970, i.e. a real time


def test_final_test_metrics(finished):
    client, run, results, cfg, _ = finished
    metrics = run.data.metrics
    for key in ("test/loss", "test/acc", "test/precision_macro", "test/recall_macro", "test/f1_macro"):
        assert key in metrics and metrics[key] == pytest.approx(results[key], abs=1e-6), key
    classes = [f"class_{i}" for i in range(cfg.data.classes)]
    for name in classes:
        assert f"test/f1/{name}" in metrics
        history = client.get_metric_history(run.info.run_id, f"test/f1/{name}")
        assert len(history) == 1 and history[0].timestamp > 1e12


def test_artifacts(finished, tmp_path):
    client, run, _, cfg, _ = finished
    run_id = run.info.run_id
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"confusion_matrix.png", "confusion_matrix.csv", "classification_report.json", "config.yaml"} <= names

    png = Path(client.download_artifacts(run_id, "confusion_matrix.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = yaml.safe_load(Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text())
    assert config["model"]["net"]["_target_"] == "lab.train.nets.CNN" and config["trainer"]["max_epochs"] == EPOCHS
    report = json.loads(Path(client.download_artifacts(run_id, "classification_report.json", str(tmp_path))).read_text())
    assert list(report) == [f"class_{i}" for i in range(cfg.data.classes)]
    assert sum(v["support"] for v in report.values()) == cfg.data.n_test


def test_confusion_matrix_matches_f1(finished, tmp_path):
    client, run, _, cfg, _ = finished
    path = client.download_artifacts(run.info.run_id, "confusion_matrix.csv", str(tmp_path))
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    classes = [f"class_{i}" for i in range(cfg.data.classes)]
    assert rows[0][1:] == classes
    assert [r[0] for r in rows[1:]] == classes
    counts = np.array([[int(v) for v in r[1:]] for r in rows[1:]])
    assert counts.sum() == cfg.data.n_test
    y_true = np.repeat(np.arange(len(classes)), counts.sum(1))
    y_pred = np.concatenate([np.repeat(np.arange(len(classes)), row) for row in counts])
    metrics = run.data.metrics
    assert metrics["test/f1_macro"] == pytest.approx(f1_score(y_true, y_pred, average="macro"), abs=1e-5)
    assert metrics["test/acc"] == pytest.approx(np.trace(counts) / counts.sum(), abs=1e-5)
    per_class = f1_score(y_true, y_pred, average=None)
    for i, name in enumerate(classes):
        assert metrics[f"test/f1/{name}"] == pytest.approx(per_class[i], abs=1e-5)


def test_tags(finished):
    _, run, _, _, _ = finished
    tags = run.data.tags
    assert tags["seed"] == "0"
    assert tags["version.torch"]
    assert tags["data"] == "Synthetic" and tags["model"] == "CNN"
    head = subprocess.run(["git", "-C", str(Path(job.__file__).parent), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    if head.returncode != 0:
        pytest.skip("lab is not installed from a git checkout here: no commit to record")
    assert tags["git.commit"] == tags["mlflow.source.git.commit"] == head.stdout.strip()  # the UI shows the latter
    assert tags["git.dirty"] in ("true", "false")


def test_artifacts_stay_in_the_working_directory(finished):
    _, run, _, _, tmp = finished
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(tmp)


def test_long_values_are_logged_in_full(mlflow_uri):
    from omegaconf import OmegaConf

    from lab.train import tracking
    cfg = load(["data=synthetic", "model=mlp", "model.net.hidden=[" + ",".join(["1024"] * 200) + "]"])
    with tracking.run(mlflow_uri, "params") as (client, run_id):
        tracking.log_config(client, run_id, cfg)
    params = client.get_run(run_id).data.params
    assert params["model.net.hidden"] == "[" + ", ".join(["1024"] * 200) + "]"  # 1,200 characters
    assert len(params) == len(tracking.flatten(OmegaConf.to_container(cfg, resolve=True)))


CONF = Path(__file__).resolve().parents[1] / "conf"
CHOICES = [f"{group}={p.stem}" for group in ("optimizer", "scheduler") for p in sorted((CONF / group).glob("*.yaml"))]


@pytest.fixture(scope="module")
def shared_uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('choices') / 'mlflow.db'}"


@pytest.mark.parametrize("choice", CHOICES)
def test_every_optimizer_and_scheduler_builds(choice):
    group, name = choice.split("=")
    target = get_class(yaml.safe_load((CONF / group / f"{name}.yaml").read_text())["_target_"])
    _, model = job.build(load([*FAST, choice, "trainer.max_epochs=2"]))
    configured = model.configure_optimizers()  # the optimizer, or a dict with its scheduler
    if group == "optimizer":
        built = configured["optimizer"] if isinstance(configured, dict) else configured
    else:
        built = configured["lr_scheduler"]["scheduler"]
    assert isinstance(built, target)


@pytest.mark.slow
@pytest.mark.parametrize("choice", CHOICES)
def test_every_optimizer_and_scheduler_trains(choice, shared_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load([*FAST, choice, "trainer.max_epochs=2", f"mlflow.tracking_uri={shared_uri}",
                "early_stopping.patience=1"])
    job.run(cfg, tmp_path / "out", run_name=choice)
    client = MlflowClient(shared_uri)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id
    (run,) = client.search_runs([experiment], f"attributes.run_name = '{choice}'")
    assert run.info.status == "FINISHED"
    group, name = choice.split("=")
    target = yaml.safe_load((CONF / group / f"{name}.yaml").read_text())["_target_"]
    assert run.data.params[f"model.{group}._target_"] == target


# -- runs that do not finish -------------------------------------------------------------------------
class RaiseAtEpochEnd(Callback):
    def __init__(self, exc: BaseException):
        self.exc = exc

    def on_train_epoch_end(self, trainer, pl_module):
        raise self.exc


def status_after(uri, tmp_path, overrides=(), callbacks=(), expect=BaseException):
    cfg = load([*FAST, "trainer.max_epochs=2", f"mlflow.tracking_uri={uri}", *overrides])
    with pytest.raises(expect):
        job.run(cfg, tmp_path / "out", callbacks=callbacks)
    _, run = only_run(uri)
    return run


def test_diverging_run_ends_failed(mlflow_uri, tmp_path):
    # Plain SGD at lr 1e6 on an MLP overflows to inf/nan in the first epoch: the loss check ends the run as Diverged.
    cfg = load(["data=synthetic", "data.n_train=256", "data.n_test=96", "data.size=12", "model=mlp",
                "model.net.hidden=[32]", "optimizer=sgd", "model.optimizer.lr=1e6", "trainer.max_epochs=2",
                "trainer.enable_progress_bar=false", f"mlflow.tracking_uri={mlflow_uri}"])
    with pytest.raises(Diverged):
        job.run(cfg, tmp_path / "out")
    _, run = only_run(mlflow_uri)
    assert run.info.status == "FAILED"
    assert run.data.tags["lab.error"].startswith("Diverged")


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_nan_learning_rate_is_refused_before_any_run(mlflow_uri, tmp_path, optimizer):
    # Adam would reject lr=nan only once fit builds it, SGD would take it and diverge: it is checked first.
    cfg = load([*FAST, f"optimizer={optimizer}", "model.optimizer.lr=nan", f"mlflow.tracking_uri={mlflow_uri}"])
    with pytest.raises(LabError, match=r"model.optimizer.lr=nan is not valid"):
        job.run(cfg, tmp_path / "out")
    client = MlflowClient(mlflow_uri)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_crashing_callback_ends_failed(mlflow_uri, tmp_path):
    run = status_after(mlflow_uri, tmp_path, callbacks=(RaiseAtEpochEnd(RuntimeError("boom")),), expect=RuntimeError)
    assert run.info.status == "FAILED"
    assert run.data.tags["lab.error"] == "RuntimeError: boom"


def test_keyboard_interrupt_ends_killed(mlflow_uri, tmp_path, keep_sigint):
    # Lightning turns a KeyboardInterrupt inside fit into sys.exit(1).
    run = status_after(mlflow_uri, tmp_path, callbacks=(RaiseAtEpochEnd(KeyboardInterrupt()),),
                       expect=(KeyboardInterrupt, SystemExit))
    assert run.info.status == "KILLED"
    assert "lab.error" not in run.data.tags


def test_last_checkpoint_is_the_last_epoch_not_the_best(mlflow_uri, tmp_path):
    # lr=0: val/acc never improves after epoch 0, so the best checkpoint stays at epoch 0 while training
    # goes on; a retried trial must resume from the last epoch, not from the best one.
    cfg = load([*FAST, "trainer.max_epochs=3", "model.optimizer.lr=0", "checkpoint.last_every_s=0",
                f"mlflow.tracking_uri={mlflow_uri}"])
    job.run(cfg, tmp_path / "out")
    checkpoints = tmp_path / "out" / "checkpoints"
    last = torch.load(checkpoints / "last.ckpt", weights_only=False, map_location="cpu")
    assert last["epoch"] == 2
    (best,) = [p for p in checkpoints.iterdir() if p.name != "last.ckpt"]  # no partial file left behind
    assert best.name.startswith("epoch=0-")
    # last.ckpt resumes training, so it holds Adam's state; the best is only tested or used: weights alone.
    assert last["optimizer_states"]
    assert "optimizer_states" not in torch.load(best, weights_only=False, map_location="cpu")


def test_last_checkpoint_waits_its_interval(mlflow_uri, tmp_path):
    cfg = load([*FAST, "trainer.max_epochs=2", "checkpoint.last_every_s=3600", f"mlflow.tracking_uri={mlflow_uri}"])
    job.run(cfg, tmp_path / "out")
    assert not (tmp_path / "out" / "checkpoints" / "last.ckpt").exists()


@pytest.mark.parametrize("bad", ["-1", "soon", "nan"])
def test_bad_checkpoint_interval_is_refused(mlflow_uri, tmp_path, bad):
    cfg = load([*FAST, f"checkpoint.last_every_s={bad}", f"mlflow.tracking_uri={mlflow_uri}"])
    with pytest.raises(LabError, match=rf"checkpoint.last_every_s={bad} is not valid.*>= 0"):
        job.run(cfg, tmp_path / "out")
    client = MlflowClient(mlflow_uri)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.slow
def test_a_store_creation_killed_midway_leaves_no_half_made_database(tmp_path):
    """SIGKILL while MLflow migrates a fresh SQLite file (seconds): the next command finds no broken mlflow.db
    (it used to fail on `_alembic_tmp_experiments already exists` for ever after)."""
    import sys
    import time

    from lab.train import tracking

    db = tmp_path / "mlflow.db"
    creating = f".{db.name}.creating-*"
    proc = subprocess.Popen([sys.executable, "-c", f"from lab.train import tracking; "
                             f"tracking.experiment_id('sqlite:///{db}', 'first')"])
    end = time.time() + 120
    while not list(tmp_path.glob(creating)) and proc.poll() is None and time.time() < end:
        time.sleep(0.002)
    assert list(tmp_path.glob(creating)), "the first command never began creating its store"
    proc.kill()
    proc.wait()
    assert not db.exists()

    exp_id = tracking.experiment_id(f"sqlite:///{db}", "first")
    assert MlflowClient(f"sqlite:///{db}").get_experiment(exp_id).name == "first"
    assert not list(tmp_path.glob(creating))
