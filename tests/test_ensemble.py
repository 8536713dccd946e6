"""A real 3-trial sweep, then the commands that use its models: `lab ensemble` (copies of one trial equal that
trial; different trials are logged with their members), `lab best` registering the winner as
models:/<study>@champion (once per run), and `lab predict` by that alias and by the sweep file."""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import _copy_conf, _lab_env, _load_journal, _run_lab, _write_sweep, lab_main
from lab.sweep import ranking

pytestmark = pytest.mark.slow  # a real `lab sweep` of 3 trials, then `lab best` twice

STUDY = "ens"
BODY = """metric: val/acc
direction: maximize
n_trials: 3
sampler: {name: random, seed: 1}
params:
  model.optimizer.lr: {type: float, low: 1.0e-3, high: 3.0e-2, log: true}
"""


@dataclass
class Sweep:
    tmp: Path
    env: dict
    file: Path
    client: MlflowClient
    parent: str


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Sweep:
    tmp = tmp_path_factory.mktemp("ensemble")
    _copy_conf(tmp)
    env = {**_lab_env(tmp), "LAB_TORCH_THREADS": "1"}
    path = _write_sweep(tmp / "sweep.yaml", STUDY, BODY)
    done = _run_lab(["sweep", path, "--workers", "1", "--no-live"], tmp, env, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    study = _load_journal(tmp, STUDY)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    return Sweep(tmp, env, path, client, study.user_attrs["mlflow_parent_run_id"])


@pytest.fixture
def inside(sweep, monkeypatch):
    """This process in the sweep's folder with its environment, for commands run in-process."""
    monkeypatch.chdir(sweep.tmp)
    for key, value in sweep.env.items():
        monkeypatch.setenv(key, value)
    return sweep


def lab_in_process(capsys, *args) -> tuple[int, str]:
    status, out, err = lab_main(capsys, *args)
    return status, out + err


def ensemble_runs(client: MlflowClient, parent: str) -> list:
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}' and tags.`ensemble.size` != ''",
                              order_by=["start_time DESC"])


def test_copies_of_one_trial_equal_that_trial(inside, capsys):
    study = _load_journal(inside.tmp, STUDY)
    best = ranking.ranked(study)[0]
    run_id = ranking.model_run_id(best)
    status, out = lab_in_process(capsys, "ensemble", inside.file, "--trials", f"{best.number},{best.number},{best.number}")
    assert status == 0, out
    logged = ensemble_runs(inside.client, inside.parent)[0]
    single = inside.client.get_run(run_id).data.metrics
    assert logged.data.metrics["test/acc"] == single["test/acc"]
    assert logged.data.metrics["test/f1_macro"] == pytest.approx(single["test/f1_macro"], abs=1e-6)
    assert logged.data.tags["ensemble.run_ids"] == ",".join([run_id] * 3)
    assert f"best by val/acc (trial {best.number}): test/acc {single['test/acc']:.4f}" in out


def test_top_k_is_logged_with_its_members_under_the_sweep_run(inside, capsys):
    study = _load_journal(inside.tmp, STUDY)
    top = ranking.ranked(study)[:3]
    assert len({t.number for t in top}) == 3
    status, out = lab_in_process(capsys, "ensemble", inside.file, "--top", "3")
    assert status == 0, out
    run = ensemble_runs(inside.client, inside.parent)[0]
    assert run.info.run_name == "ensemble-top-3" and run.info.status == "FINISHED"
    assert run.data.tags["ensemble.trials"] == ",".join(str(t.number) for t in top)
    assert run.data.tags["ensemble.run_ids"] == ",".join(ranking.model_run_id(t) for t in top)
    assert 0 <= run.data.metrics["test/acc"] <= 1 and "test/f1_macro" in run.data.metrics
    assert any(k.startswith("test/f1/") for k in run.data.metrics)
    artifacts = {a.path for a in inside.client.list_artifacts(run.info.run_id)}
    assert {"confusion_matrix.csv", "confusion_matrix.png", "classification_report.json", "members.json"} <= artifacts
    assert "ensemble of 3 (" in out and "best by val/acc (trial " in out and "best single model" not in out


def test_bad_members_are_refused(inside, capsys):
    status, out = lab_in_process(capsys, "ensemble", inside.file, "--trials", "99")
    assert status == 2 and "there is no trial 99 (the study has trials 0-" in out and "the completed ones are [" in out
    status, out = lab_in_process(capsys, "ensemble", inside.file, "--top", "0")
    assert status == 2 and "--top=0 is not valid" in out


def test_best_registers_the_champion_once_and_predict_loads_it(inside, capsys, tmp_path):
    study = _load_journal(inside.tmp, STUDY)
    best = ranking.best(study)
    run_id = ranking.model_run_id(best)
    # As a sweep that logs only some trials' models leaves it: `lab best` logs the model first.
    if inside.client.get_run(run_id).data.tags.get("lab.model_uri"):
        inside.client.delete_tag(run_id, "lab.model_uri")
    for _ in range(2):
        done = _run_lab(["best", inside.file], inside.tmp, inside.env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"registered: models:/{STUDY}@champion" in done.stdout
        assert f'mlflow.pytorch.load_model("models:/{STUDY}@champion")' in done.stdout
    version = inside.client.get_model_version_by_alias(STUDY, "champion")
    assert version.run_id == run_id
    assert len(inside.client.search_model_versions(f"name = '{STUDY}'")) == 1
    assert inside.client.get_run(run_id).data.tags["lab.model_uri"]

    image = tmp_path / "x.png"
    shape = inside.client.get_run(run_id).data.params  # data.size=8 (TINY), channels as synthetic makes them
    side = int(shape.get("data.size", 8))
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(image)
    status, by_alias = lab_in_process(capsys, "predict", f"models:/{STUDY}@champion", image)
    assert status == 0, by_alias
    status, by_sweep = lab_in_process(capsys, "predict", inside.file, image)
    assert status == 0, by_sweep
    row = lambda text: next(line for line in text.splitlines() if line.startswith(str(image)))  # noqa: E731
    assert row(by_alias) == row(by_sweep)


@pytest.mark.parametrize("command", ["best", "ensemble", "report", "confirm"])
def test_commands_after_a_sweep_name_the_store_it_ran_in_when_pointed_at_another(inside, capsys, monkeypatch,
                                                                                tmp_path, command):
    elsewhere = f"sqlite:///{tmp_path}/other.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    status, out = lab_in_process(capsys, command, inside.file)
    assert status == 2, out
    assert f"parent run {inside.parent}, which is not in {elsewhere}" in out
    assert f"It was started with MLFLOW_TRACKING_URI={inside.env['MLFLOW_TRACKING_URI']}" in out
    assert "--study NAME" not in out and "Traceback" not in out
    assert not (tmp_path / "other.db").exists()  # a read: nothing created where the user pointed by mistake
