"""Servers that go away under a running sweep (issue 26): a PostgreSQL the test stops (`pg_ctl -m fast stop`, as
an administrator's restart) and starts again, and an MLflow tracking server the test kills and starts again.
The outcome is read back through Optuna's and MLflow's clients: nothing RUNNING, each trial finished, or
failed with its real reason and retried."""
import os
import re
import signal
import subprocess
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

import mlflow_server
from lab import server

pytestmark = pytest.mark.slow
OUTAGE_S = 8  # how long a server stays away: several epochs' worth of storage and tracking calls


def training_trials(study: optuna.Study, n: int, timeout: float = 300) -> list[optuna.trial.FrozenTrial]:
    """Wait until n trials are RUNNING past their first epoch (their workers call the storage every epoch)."""
    end = time.time() + timeout
    while time.time() < end:
        busy = [t for t in study.get_trials(states=(TrialState.RUNNING,)) if t.intermediate_values]
        if len(busy) >= n:
            return busy
        time.sleep(0.3)
    raise AssertionError(f"{n} trial(s) never trained: {[(t.number, t.state.name) for t in study.get_trials()]}")


def finished(procs, timeout: float = 600) -> list[str]:
    try:
        return [proc.communicate(timeout=timeout)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def nothing_running(client: MlflowClient, study: optuna.Study, children) -> list:
    assert not study.get_trials(states=(TrialState.RUNNING,))
    runs = children(client, study.user_attrs["mlflow_parent_run_id"])
    assert runs and all(r.info.status != "RUNNING" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    assert client.get_run(study.user_attrs["mlflow_parent_run_id"]).info.status == "FINISHED"
    return runs


def test_a_postgres_restart_is_waited_out_by_every_worker(workdir, lab, start_lab, slow_sweep_file, children,
                                                          postgres_server):
    tmp, env = workdir
    env, url = {**env, "LAB_TORCH_THREADS": "1"}, postgres_server.url
    path = slow_sweep_file(tmp / "pg.yaml", "restart", 2)
    prepared = lab("sweep", path, "--storage", url, "--prepare", env=env, timeout=300)
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    workers = []
    for host in range(2):
        (tmp / f"host{host}").mkdir()
        workers.append(start_lab("worker", path, "--storage", url, "--worker-id", f"host{host}",
                                 cwd=tmp / f"host{host}", env=env))
    study = optuna.load_study(study_name="restart", storage=url)
    training_trials(study, 2)
    postgres_server.stop("fast")
    time.sleep(OUTAGE_S)
    postgres_server.start()
    outs = finished(workers)
    for proc, out in zip(workers, outs):
        assert proc.returncode == 0 and "Traceback" not in out, out
    assert all("storage unreachable (" in out and "storage reachable again after" in out for out in outs), outs
    study = optuna.load_study(study_name="restart", storage=url)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 2  # each kept: none failed or retried
    runs = nothing_running(MlflowClient(env["MLFLOW_TRACKING_URI"]), study, children)
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 2


def test_an_outage_longer_than_the_setting_is_one_sentence_and_its_trial_is_retried(workdir, lab, start_lab,
                                                                                    slow_sweep_file, children,
                                                                                    postgres_server):
    tmp, env = workdir
    env, url = {**env, "LAB_TORCH_THREADS": "1", "LAB_STORAGE_OUTAGE_S": "3"}, postgres_server.url
    path = slow_sweep_file(tmp / "pg.yaml", "gone", 1)
    prepared = lab("sweep", path, "--storage", url, "--prepare", env=env, timeout=300)
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    worker = start_lab("worker", path, "--storage", url, env=env)
    study = optuna.load_study(study_name="gone", storage=url)
    (victim,) = training_trials(study, 1)
    postgres_server.stop("fast")
    (out,) = finished([worker], timeout=120)
    assert worker.returncode == 2 and "Traceback" not in out, out
    last = out.strip().splitlines()[-1]
    assert re.match(r"lab: error: the Optuna storage postgresql://\S+ has been unreachable since \d\d:\d\d:\d\d "
                    r"\(\d+ s, more than LAB_STORAGE_OUTAGE_S=3\): ", last), out
    assert "attempt 1 failed, next in 1 s" in out  # bounded, logged attempts
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    cut = client.get_run(victim.user_attrs["mlflow_run_id"])
    assert cut.info.status == "FAILED" and cut.data.tags["trial.reason"].startswith("storage unreachable (")

    postgres_server.start()
    again = lab("worker", path, "--storage", url, env=env, timeout=600)
    assert again.returncode == 0 and "Traceback" not in again.stdout + again.stderr, again.stdout + again.stderr
    study = optuna.load_study(study_name="gone", storage=url)
    trials = study.get_trials()
    lost = trials[victim.number]
    assert lost.state == TrialState.FAIL and lost.user_attrs["fail_reason"] == cut.data.tags["trial.reason"]
    (retry,) = [t for t in trials if t.user_attrs.get("lab.retry_of") == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["lab.retry_reason"].startswith("storage unreachable (")
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 1
    nothing_running(client, study, children)


def start_server(tmp, port: int) -> subprocess.Popen:
    cmd = server.server_cmd(f"sqlite:///{tmp}/server.db", tmp / "artifacts", "127.0.0.1", port, auth=False)
    proc = subprocess.Popen(cmd, stdout=open(tmp / "server.log", "a"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            start_new_session=True)  # its own group: the uvicorn workers are killed with it
    mlflow_server.wait_ready(f"http://127.0.0.1:{port}", proc)
    return proc


def kill_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_tracking_server_outage_is_said_in_the_live_view_and_the_logs(workdir, start_lab, slow_sweep_file, journal,
                                                                        children, free_port):
    tmp, env = workdir
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**env, "LAB_TORCH_THREADS": "1", "MLFLOW_TRACKING_URI": url}
    path = slow_sweep_file(tmp / "mlflow.yaml", "tracking_outage", 1)
    proc = start_server(tmp, port)
    try:
        sweep = start_lab("sweep", path, "--workers", "1", "--no-live", env=env)
        end = time.time() + 300
        while not (tmp / "runs" / "tracking_outage" / "study.journal").exists() and time.time() < end:
            time.sleep(0.5)
        training_trials(journal(tmp, "tracking_outage"), 1)
        kill_server(proc)
        time.sleep(OUTAGE_S)
        proc = start_server(tmp, port)
        (out,) = finished([sweep])
        assert sweep.returncode == 0 and "Traceback" not in out, out
        said = re.compile(r"tracking server unreachable since \d\d:\d\d:\d\d, retrying \(http://127\.0\.0\.1:\d+: ")
        assert said.search(out), out  # the live view (a line per change without a terminal)
        logs = (tmp / "runs" / "tracking_outage" / "workers" / "cpu0.log").read_text()
        assert said.search(logs) and "reachable again after" in logs, logs
        study = journal(tmp, "tracking_outage")
        assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]
        runs = nothing_running(MlflowClient(url), study, children)
        assert all("test/acc" in r.data.metrics for r in runs)  # nothing lost
    finally:
        kill_server(proc)
