"""The parent owns its workers to the end: all of them killed at once, a hung one, the parent itself killed or
its terminal closed. Faults injected with real signals; outcomes read through Optuna's and MLflow's clients."""
import os
import signal
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from test_faults import wait_for_running_trial

pytestmark = pytest.mark.slow


def pool_workers(parent_pid: int) -> list[int]:
    """Live processes started by this parent's pool (they carry LAB_PARENT_PID in their environment)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().split(")")[-1].split()[0]
        except OSError:
            continue
        if f"LAB_PARENT_PID={parent_pid}".encode() in environ and state != "Z":
            found.append(int(proc.name))
    return found


def wait_until(test, timeout=60, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        if test():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def nothing_left_running(study, client, parent_id):
    assert not [t for t in study.get_trials() if t.state == TrialState.RUNNING]
    exp = client.get_run(parent_id).info.experiment_id
    assert not client.search_runs([exp], "attributes.status = 'RUNNING'")


def test_all_workers_killed_at_once_are_restarted_and_supervised(workdir, start_lab, slow_sweep_file, journal):
    tmp, env = workdir
    path = slow_sweep_file(tmp / "both.yaml", "both", 4)
    proc = start_lab("sweep", path, "--workers", "2", "--no-live")
    wait_until(lambda: len(pool_workers(proc.pid)) == 2, what="two workers")
    wait_for_running_trial(journal, tmp, "both", proc)
    for pid in pool_workers(proc.pid):  # within one poll interval
        os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    assert not pool_workers(proc.pid)
    study = journal(tmp, "both")
    assert sum(t.state == TrialState.COMPLETE for t in study.get_trials()) == 4
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    parent = study.user_attrs["mlflow_parent_run_id"]
    assert client.get_run(parent).info.status == "FINISHED"
    nothing_left_running(study, client, parent)


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGHUP"])
def test_workers_stop_with_their_parent_and_the_same_command_resumes(workdir, lab, start_lab, slow_sweep_file,
                                                                     journal, sig):
    tmp, env = workdir
    path = slow_sweep_file(tmp / "orphan.yaml", "orphan", 3)
    proc = start_lab("sweep", path, "--workers", "2", "--no-live")
    caught = wait_for_running_trial(journal, tmp, "orphan", proc)
    os.kill(proc.pid, getattr(signal, sig))
    proc.wait(timeout=120)
    wait_until(lambda: not pool_workers(proc.pid), timeout=60, what="the workers to stop")

    study = journal(tmp, "orphan")
    stopped = study.get_trials()[caught.number]
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["fail_reason"] == "interrupted by SIGTERM"
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert client.get_run(caught.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    if sig == "SIGHUP":  # the terminal is gone: what the parent had to say is in the sweep's log
        assert "SIGHUP: stopping workers" in (tmp / "runs" / "orphan" / "sweep.log").read_text()

    again = lab("sweep", path, "--workers", "2", "--no-live")
    assert again.returncode == 0, again.stdout + again.stderr
    study = journal(tmp, "orphan")
    assert sum(t.state == TrialState.COMPLETE for t in study.get_trials()) == 3
    parent = study.user_attrs["mlflow_parent_run_id"]  # the orphaned parent run, reused and closed
    assert client.get_run(parent).info.status == "FINISHED"
    assert len(client.search_runs([client.get_run(parent).info.experiment_id], "tags.`lab.sweep` = 'true'")) == 1
    nothing_left_running(study, client, parent)


def test_a_hung_worker_is_killed_and_its_trial_retried(workdir, start_lab, slow_sweep_file, journal):
    tmp, env = workdir
    path = slow_sweep_file(tmp / "hung.yaml", "hung", 2)
    proc = start_lab("sweep", path, "--workers", "1", "--no-live", env_extra={"LAB_GRACE_S": "8"})
    caught = wait_for_running_trial(journal, tmp, "hung", proc)
    os.kill(int(caught.user_attrs["pid"]), signal.SIGSTOP)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    assert "hung (no sign of life for" in out
    study = journal(tmp, "hung")
    trials = study.get_trials()
    stopped = trials[caught.number]
    assert stopped.state == TrialState.FAIL and "hung" in stopped.user_attrs["fail_reason"]
    (retry,) = [t for t in trials if t.user_attrs.get("lab.retry_of") == caught.number]
    assert retry.state == TrialState.COMPLETE
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert client.get_run(caught.user_attrs["mlflow_run_id"]).info.status == "FAILED"
    nothing_left_running(study, client, study.user_attrs["mlflow_parent_run_id"])
