"""Faults injected for real: SIGKILL of a worker, Ctrl-C of the sweep, a torn journal, a changed sweep."""
import os
import signal
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from lab.errors import LabError
from lab.sweep import spec
from lab.sweep import study as studies


def wait_for_running_trial(journal, tmp, study_name, proc, timeout=300):
    """A RUNNING trial that finished at least one epoch, so it has a last.ckpt to resume from."""
    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, proc.stdout.read()
        try:
            running = journal(tmp, study_name).get_trials(states=(TrialState.RUNNING,))
        except (KeyError, FileNotFoundError):
            running = []
        for trial in running:
            last = Path(trial.user_attrs.get("checkpoint_dir", "/nonexistent")) / "last.ckpt"
            if trial.intermediate_values and "mlflow_run_id" in trial.user_attrs and last.exists():
                return trial
        time.sleep(0.3)
    raise AssertionError("no trial reached its second epoch in time")


@pytest.mark.slow
def test_sigkilled_worker_trial_is_failed_and_retried_from_its_checkpoint(workdir, start_lab, slow_sweep_file,
                                                                          journal):
    tmp, env = workdir
    path = slow_sweep_file(tmp / "k.yaml", "killed", 3)
    proc = start_lab("sweep", path, "--workers", "2", "--no-live")
    victim = wait_for_running_trial(journal, tmp, "killed", proc)
    os.kill(int(victim.user_attrs["pid"]), signal.SIGKILL)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out

    trials = journal(tmp, "killed").get_trials()
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3  # the budget is still reached
    dead = trials[victim.number]
    assert dead.state == TrialState.FAIL and "died" in dead.user_attrs["fail_reason"]
    (retry,) = [t for t in trials if t.user_attrs.get("lab.retry_of") == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.params == victim.params
    assert retry.user_attrs["lab.resume_from"].endswith("last.ckpt")

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert client.get_run(victim.user_attrs["mlflow_run_id"]).info.status == "FAILED"
    resumed = client.get_run(retry.user_attrs["mlflow_run_id"])
    assert resumed.data.tags["lab.resumed_from"] == retry.user_attrs["lab.resume_from"]
    # It continued where the killed one stopped: its first logged epoch is not epoch 0.
    steps = [m.step for m in client.get_metric_history(resumed.info.run_id, "val/acc")]
    assert min(steps) >= 1 and max(steps) == 3
    assert not [t for t in trials if t.state == TrialState.RUNNING]


@pytest.mark.slow
def test_ctrl_c_stops_marks_and_the_same_command_resumes(workdir, lab, start_lab, slow_sweep_file, journal):
    tmp, env = workdir
    path = slow_sweep_file(tmp / "i.yaml", "interrupted", 3)
    proc = start_lab("sweep", path, "--workers", "1", "--no-live")
    caught = wait_for_running_trial(journal, tmp, "interrupted", proc)
    started = time.time()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert time.time() - started < 60
    study = journal(tmp, "interrupted")
    first = study.get_trials()
    assert not [t for t in first if t.state == TrialState.RUNNING]
    stopped = first[caught.number]
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["fail_reason"].startswith("interrupted")
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert client.get_run(caught.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    parent = study.user_attrs["mlflow_parent_run_id"]
    assert client.get_run(parent).info.status == "KILLED"

    again = lab("sweep", path, "--workers", "1", "--no-live", timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    trials = journal(tmp, "interrupted").get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3  # the total stays n_trials
    assert max(t.number for t in trials) >= len(first)  # numbers continue
    done_before = {t.number for t in first if t.state == TrialState.COMPLETE}
    assert not [t for t in trials if t.user_attrs.get("lab.retry_of") in done_before]  # nothing finished reran
    assert client.get_run(parent).info.status == "FINISHED"


def test_resuming_with_a_changed_sweep_is_refused(tmp_path):
    path = tmp_path / "s.yaml"
    base = ("study: same\noverrides: [data=synthetic, model=mlp]\nmetric: val/acc\ndirection: maximize\n"
            "params:\n  model.optimizer.lr: {type: float, low: 1.0e-3, high: 1.0e-1, log: true}\n")
    storage = str(tmp_path / "study.journal")
    path.write_text(base)
    studies.create_or_resume(spec.load(path), storage)
    for changed, named in [(base.replace("maximize", "minimize"), "direction"),
                           (base.replace("metric: val/acc", "metric: val/loss"), "metric"),
                           (base.replace("high: 1.0e-1", "high: 0.5"), "space"),
                           (base + "sampler: {name: random, seed: 0}\n", "sampler"),
                           (base + "pruner: {name: median}\n", "pruner"),
                           (base.replace("model=mlp]", "model=mlp, trainer.max_epochs=9]"), "the overrides")]:
        path.write_text(changed)
        with pytest.raises(LabError, match=f"created with {named}"):
            studies.create_or_resume(spec.load(path), storage)
    path.write_text(base)
    studies.create_or_resume(spec.load(path), storage)  # the unchanged file resumes


@pytest.mark.slow
def test_two_sweeps_started_together_on_a_fresh_mlflow_database(workdir, start_lab, sweep_file, journal):
    tmp, env = workdir
    body = "metric: val/acc\nn_trials: 1\nparams:\n  model.optimizer.lr: {type: float, low: 1.0e-3, high: 1.0e-1}\n"
    assert not (tmp / "mlflow.db").exists()
    procs = [start_lab("sweep", sweep_file(tmp / f"{name}.yaml", name, body), "--no-live") for name in ("one", "two")]
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0 and "Traceback" not in out, out
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    for name in ("one", "two"):
        parent = journal(tmp, name).user_attrs["mlflow_parent_run_id"]
        assert client.get_run(parent).info.status == "FINISHED"


@pytest.mark.slow
def test_a_trial_asked_by_a_worker_that_died_before_labelling_it_does_not_hang_reruns(workdir, lab, sweep_file, journal):
    tmp, env = workdir
    body = "metric: val/acc\nn_trials: 2\nparams:\n  model.optimizer.lr: {type: float, low: 1.0e-3, high: 1.0e-1}\n"
    path = sweep_file(tmp / "orphan.yaml", "orphan", body)
    assert lab("sweep", path, "--prepare").returncode == 0
    # What a worker killed between study.ask and recording its host and pid leaves: a RUNNING trial, no owner.
    orphan = journal(tmp, "orphan").ask()
    result = lab("sweep", path, "--workers", "2", "--no-live", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    trials = journal(tmp, "orphan").get_trials()
    assert trials[orphan.number].state == TrialState.FAIL
    assert "no owner recorded" in trials[orphan.number].user_attrs["fail_reason"]
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2
    assert not [t for t in trials if t.state == TrialState.RUNNING]
