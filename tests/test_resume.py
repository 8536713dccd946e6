"""A retried trial resumes from what its killed attempt left: a last.ckpt written after the final epoch, one
whose best checkpoint was replaced since, a torn one. Each run ends with test metrics, FINISHED."""
import shutil

import pytest
from mlflow.tracking import MlflowClient

from lab.config import load
from lab.errors import LabError
from lab.train import job

TINY = ["data=synthetic", "data.n_train=256", "data.n_test=64", "data.size=8", "model=mlp", "model.net.hidden=[16]",
        "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "checkpoint.last_every_s=0"]


@pytest.fixture
def killed_while_testing(mlflow_uri, tmp_path):
    """The checkpoint folder of an attempt that trained every epoch, then died (in its test phase, say)."""
    cfg = load([*TINY, f"mlflow.tracking_uri={mlflow_uri}"])
    first = job.run(cfg, tmp_path / "first")
    folder = tmp_path / "first" / "checkpoints"
    assert (folder / "last.ckpt").is_file()
    return cfg, folder, first


def resumed_run(cfg, tmp_path, last, require="val/acc"):
    results = job.run(cfg, tmp_path / "retry", resume_from=str(last), require=require, run_name="retry")
    client = MlflowClient(cfg.mlflow.tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()], "attributes.run_name = 'retry'")
    return results, run


def test_a_checkpoint_written_after_the_last_epoch_resumes_to_test_metrics(killed_while_testing, tmp_path):
    cfg, folder, first = killed_while_testing
    results, run = resumed_run(cfg, tmp_path, folder / "last.ckpt")
    assert run.info.status == "FINISHED"
    assert run.data.tags["lab.resume"].startswith("resumed after epoch 1")
    assert results["val/acc"] == pytest.approx(first["val/acc"])  # the last epoch's validation, run again
    assert results["test/acc"] == pytest.approx(first["test/acc"])
    assert run.data.tags["lab.tested"].startswith("best epoch")


def test_a_replaced_best_checkpoint_tests_the_final_weights(killed_while_testing, tmp_path):
    cfg, folder, _ = killed_while_testing
    for best in folder.glob("epoch=*.ckpt"):  # a better epoch replaced it after last.ckpt was written
        best.unlink()
    results, run = resumed_run(cfg, tmp_path, folder / "last.ckpt")
    assert run.info.status == "FINISHED" and "test/acc" in results
    assert "no longer exists" in run.data.tags["lab.tested"]


def test_a_torn_checkpoint_starts_afresh(killed_while_testing, tmp_path):
    cfg, folder, first = killed_while_testing
    torn = tmp_path / "torn.ckpt"
    shutil.copy(folder / "last.ckpt", torn)
    with open(torn, "r+b") as f:
        f.truncate(torn.stat().st_size // 2)
    results, run = resumed_run(cfg, tmp_path, torn)
    assert run.info.status == "FINISHED"
    assert run.data.tags["lab.resume"].startswith("started afresh")
    assert results["test/acc"] == pytest.approx(first["test/acc"])  # same seed, trained from epoch 0 again


def test_a_metric_never_logged_ends_the_run_failed(mlflow_uri, tmp_path):
    cfg = load([*TINY, f"mlflow.tracking_uri={mlflow_uri}", "mlflow.run_name=retry"])
    with pytest.raises(LabError, match="'val/nonexistent' was not logged"):
        job.run(cfg, tmp_path / "out", require="val/nonexistent", run_name="retry")
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED"  # as its trial: Optuna and MLflow agree
