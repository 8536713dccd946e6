"""Across hosts: one study on a real PostgreSQL server shared by separate `lab worker` processes, and
sweeps logging to a real `mlflow server` over HTTP under load. Those are slow; the server's own checks are not."""
import signal
import subprocess
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

import mlflow_server
from lab import server


@pytest.mark.slow
def test_workers_on_separate_hosts_share_one_postgres_study(workdir, lab, start_lab, slow_sweep_file, children,
                                                            postgres):
    tmp, env = workdir
    env = {**env, "LAB_HEARTBEAT_S": "1", "LAB_GRACE_S": "6"}
    path = slow_sweep_file(tmp / "pg.yaml", "on_postgres", 4)
    prepared = lab("sweep", path, "--storage", postgres, "--prepare", env=env, timeout=300)
    assert prepared.returncode == 0, prepared.stderr
    # Three "hosts": separate processes with their own working directories, one storage URL.
    workers = []
    for host in range(3):
        cwd = tmp / f"host{host}"
        cwd.mkdir()
        workers.append(start_lab("worker", path, "--storage", postgres, "--worker-id", f"host{host}", cwd=cwd, env=env))
    study = optuna.load_study(study_name="on_postgres", storage=postgres)
    victim, end = None, time.time() + 300
    while victim is None and time.time() < end:
        for t in study.get_trials(states=(TrialState.RUNNING,)):
            if t.intermediate_values and t.user_attrs.get("worker") == "host0":
                victim = t
        time.sleep(0.3)
    assert victim is not None, "host0 never ran a trial"
    workers[0].send_signal(signal.SIGSTOP)  # the "host" freezes: no more heartbeats for its trial
    try:
        end = time.time() + 120
        while study.get_trials()[victim.number].state == TrialState.RUNNING and time.time() < end:
            time.sleep(0.5)
        workers[0].send_signal(signal.SIGCONT)  # it wakes up to find its trial failed and queued again
        for proc in workers:
            out, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0 and "Traceback" not in out, out
    except subprocess.TimeoutExpired as err:
        states = [(t.number, t.state.name, t.user_attrs.get("worker")) for t in study.get_trials()]
        raise AssertionError(f"workers did not finish; trials: {states}") from err
    finally:
        for proc in workers:
            proc.kill()
            proc.wait()

    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4
    dead = trials[victim.number]
    assert dead.state == TrialState.FAIL and dead.user_attrs["fail_reason"] == "heartbeat lost"
    (retry,) = [t for t in trials if t.user_attrs.get("lab.retry_of") == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["lab.retry_reason"] == "heartbeat lost"
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = children(client, study.user_attrs["mlflow_parent_run_id"])
    numbers = [int(r.data.tags["trial.number"]) for r in runs]
    assert sorted(numbers) == sorted(t.number for t in trials if t.state != TrialState.WAITING)  # each ran once
    assert client.get_run(victim.user_attrs["mlflow_run_id"]).info.status == "FAILED"
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])  # the last worker closed it
    assert parent.info.status == "FINISHED"
    assert "trials.csv" in [a.path for a in client.list_artifacts(parent.info.run_id)]


N_LOAD = 16  # 2 trials per worker: every worker asks, runs and tells under load, and the suite stays short
LOAD = f"""
metric: val/acc
n_trials: {N_LOAD}
sampler: {{name: random, seed: 0}}
params:
  model.optimizer.lr: {{type: float, low: 1.0e-3, high: 1.0e-1, log: true}}
  model.net.dropout: {{type: float, low: 0.0, high: 0.3}}
"""
TINY = ("data.n_train=96", "data.n_test=32", "model.net.hidden=[8]", "trainer.max_epochs=1", "data.batch_size=32")
METRICS = {"train/loss", "train/acc", "val/loss", "val/acc", "val/f1_macro", "test/loss", "test/acc",
           "test/precision_macro", "test/recall_macro", "test/f1_macro"}


def check_load(tmp, env, study_name, journal, children):
    trials = journal(tmp, study_name).get_trials()
    assert len(trials) == N_LOAD and all(t.state == TrialState.COMPLETE for t in trials)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = children(client, journal(tmp, study_name).user_attrs["mlflow_parent_run_id"])
    assert len(runs) == N_LOAD
    for run in runs:
        assert METRICS <= set(run.data.metrics), run.info.run_id
        assert run.info.status == "FINISHED"
    logs = "".join(p.read_text() for p in (tmp / "runs" / study_name / "workers").glob("*.log"))
    assert "database is locked" not in logs


@pytest.mark.slow
@pytest.mark.parametrize("through", ["sqlite", "mlflow_server"])
def test_eight_workers_share_one_study_under_load(workdir, lab, sweep_file, journal, children, free_port, through):
    tmp, env = workdir
    path = sweep_file(tmp / "load.yaml", f"load_{through}", LOAD, extra=TINY)
    args = ["sweep", path, "--workers", "8", "--no-live"]
    if through == "sqlite":
        done = lab(*args, timeout=1200)
        assert done.returncode == 0, done.stdout + done.stderr
        check_load(tmp, env, f"load_{through}", journal, children)
        return
    port = free_port()
    with mlflow_server.running(f"sqlite:///{tmp}/server.db", tmp / "artifacts", port=port, log_path=tmp / "server.log") as url:
        env = {**env, "MLFLOW_TRACKING_URI": url}
        done = lab(*args, env=env, timeout=1200)
        assert done.returncode == 0, done.stdout + done.stderr
        check_load(tmp, env, f"load_{through}", journal, children)
        run = MlflowClient(url).search_runs(
            [MlflowClient(url).get_experiment_by_name(f"load_{through}").experiment_id], max_results=1)[0]
        assert "confusion_matrix.png" in {a.path for a in MlflowClient(url).list_artifacts(run.info.run_id)}
    assert any((tmp / "artifacts").rglob("confusion_matrix.png"))  # stored by the server, not the client


def test_server_refuses_public_host_without_auth(tmp_path):
    from lab.errors import LabError

    with pytest.raises(LabError, match="0.0.0.0"):
        server.server_cmd("sqlite:///x.db", tmp_path, "0.0.0.0", 5000, auth=False)
    assert "basic-auth" in server.server_cmd("sqlite:///x.db", tmp_path, "0.0.0.0", 5000, auth=True)
    assert server.is_loopback("127.0.0.1") and server.is_loopback("::1") and not server.is_loopback("10.0.0.1")
