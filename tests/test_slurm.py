"""`lab sweep --launcher slurm` against a real single-node SLURM (tests/slurm_cluster.py: Debian's slurm-wlm and
munge, started for this module and stopped after it), read back through Optuna's and MLflow's clients; and the
launcher's settings and storage checks, which need no cluster."""
import argparse
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

import slurm_cluster
from lab.errors import LabError
from lab.sweep.slurm import settings
from test_faults import wait_for_running_trial

FAST = ["data=digits", "model=mlp", "model.net.hidden=[16]", "trainer.max_epochs=1", "trainer.enable_progress_bar=false"]
# One core per task: the node has this machine's cores, and two tasks then run at once.
LAUNCH = ["--launcher", "slurm", "--no-live", "launcher.cpus_per_task=1", "launcher.time_min=30"]


@pytest.fixture(scope="module")
def cluster():
    missing = slurm_cluster.missing()
    if missing:
        pytest.skip(f"SLURM is not installed here ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    env = slurm_cluster.start()
    yield env
    slurm_cluster.stop()


@pytest.fixture
def on_slurm(workdir, cluster):
    """(tmp, env): the working directory of `workdir`, its environment reaching the test cluster."""
    tmp, env = workdir
    return tmp, {**env, **cluster}


def write_sweep(tmp: Path, study: str, n: int, overrides=FAST) -> Path:
    path = tmp / f"{study}.yaml"
    path.write_text(f"study: {study}\noverrides: {json.dumps(list(overrides))}\nmetric: val/acc\nn_trials: {n}\n"
                    "sampler: {name: random, seed: 0}\n"
                    "params:\n  model.optimizer.lr: {type: float, low: 1.0e-3, high: 1.0e-1, log: true}\n")
    return path


def listed(env: dict, array_id: str | None = None) -> list[str]:
    """The tasks squeue lists as pending or running (of one array, or all)."""
    cmd = ["squeue", "-h", "-r", "-o", "%i"] + (["-j", array_id] if array_id else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 or "Invalid job id" in done.stderr, done.stderr
    return done.stdout.split()


def array_of(study) -> str:
    worker = next(t.user_attrs["worker"] for t in study.get_trials() if "worker" in t.user_attrs)
    return worker.removeprefix("slurm").split("_")[0]


def nothing_running(client, study) -> None:
    assert not study.get_trials(states=(TrialState.RUNNING,))
    exp = client.get_run(study.user_attrs["mlflow_parent_run_id"]).info.experiment_id
    running = client.search_runs([exp], "attributes.status = 'RUNNING'")
    assert not running, [(r.info.run_name, r.info.status) for r in running]


@pytest.mark.slow
def test_three_array_tasks_spend_the_exact_budget_and_close_the_sweep(on_slurm, lab, journal, children):
    tmp, env = on_slurm
    from mlflow.tracking import MlflowClient

    path = write_sweep(tmp, "three", 4)
    done = lab("sweep", path, "--workers", "3", *LAUNCH, env=env, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SLURM job array" in done.stdout and "pending" in done.stdout, done.stdout
    study = journal(tmp, "three")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4  # exactly the budget
    assert all(t.user_attrs["worker"].startswith("slurm") for t in trials)
    assert listed(env, array_of(study)) == []
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    parent = study.user_attrs["mlflow_parent_run_id"]
    assert client.get_run(parent).info.status == "FINISHED"
    assert sorted(int(r.data.tags["trial.number"]) for r in children(client, parent)) == [0, 1, 2, 3]
    nothing_running(client, study)
    logs = "".join(p.read_text() for p in (tmp / "runs" / "three" / "slurm").glob("*_log.out"))
    assert "Traceback" not in logs and "worker done" in logs
    assert "srun` command is available" not in logs  # Lightning told it is not a SLURM-managed launch


@pytest.mark.slow
def test_detach_returns_at_once_and_the_last_worker_closes_the_sweep(on_slurm, lab, journal):
    tmp, env = on_slurm
    from mlflow.tracking import MlflowClient

    path = write_sweep(tmp, "detached", 2)
    done = lab("sweep", path, "--workers", "2", "--detach", *LAUNCH, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    array_id = done.stdout.split("SLURM job array ")[1].split(",")[0]
    assert f"scancel {array_id}" in done.stdout and f"squeue -j {array_id}" in done.stdout
    assert listed(env, array_id)  # returned while its tasks are still there
    end = time.time() + 600
    while listed(env, array_id) and time.time() < end:
        time.sleep(2)
    study = journal(tmp, "detached")
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 2
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert client.get_run(study.user_attrs["mlflow_parent_run_id"]).info.status == "FINISHED"  # by the last worker
    nothing_running(client, study)


@pytest.mark.slow
def test_scancel_of_one_task_mid_trial_gets_its_trial_retried_to_completion(on_slurm, start_lab, journal,
                                                                           slow_sweep_file):
    tmp, env = on_slurm
    from mlflow.tracking import MlflowClient

    path = slow_sweep_file(tmp / "cut.yaml", "cut", 3)
    proc = start_lab("sweep", path, "--workers", "2", *LAUNCH, env=env)
    victim = wait_for_running_trial(journal, tmp, "cut", proc)
    task = victim.user_attrs["worker"]
    subprocess.run(["scancel", task.removeprefix("slurm")], env=env, check=True, timeout=60)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    assert f"worker {task} ended (CANCELLED)" in out, out
    trials = journal(tmp, "cut").get_trials()
    cut = trials[victim.number]
    assert cut.state == TrialState.FAIL and cut.user_attrs["fail_reason"] == "interrupted by SIGTERM"
    (retry,) = [t for t in trials if t.user_attrs.get("lab.retry_of") == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["lab.resume_from"].endswith("last.ckpt")
    assert retry.user_attrs["worker"] != task  # the other task took it over
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert client.get_run(cut.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    assert client.get_run(journal(tmp, "cut").user_attrs["mlflow_parent_run_id"]).info.status == "FINISHED"
    nothing_running(client, journal(tmp, "cut"))


@pytest.mark.slow
def test_ctrl_c_cancels_the_array_and_the_same_command_finishes_the_budget(on_slurm, lab, start_lab, journal,
                                                                          slow_sweep_file):
    tmp, env = on_slurm
    from mlflow.tracking import MlflowClient

    path = slow_sweep_file(tmp / "ctrlc.yaml", "slurm_ctrlc", 2)
    proc = start_lab("sweep", path, "--workers", "2", *LAUNCH, env=env)
    wait_for_running_trial(journal, tmp, "slurm_ctrlc", proc)
    pressed = time.time()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130, out
    assert time.time() - pressed < 60, f"took {time.time() - pressed:.0f} s to stop"
    assert "cancelling SLURM job" in out and "Traceback" not in out, out
    study = journal(tmp, "slurm_ctrlc")
    assert listed(env, array_of(study)) == []
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    nothing_running(client, study)
    assert client.get_run(study.user_attrs["mlflow_parent_run_id"]).info.status == "KILLED"
    cut = study.get_trials(states=(TrialState.FAIL,))
    assert cut and all(t.user_attrs["fail_reason"].startswith("interrupted by") for t in cut)

    again = lab("sweep", path, "--workers", "2", *LAUNCH, env=env, timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    study = journal(tmp, "slurm_ctrlc")
    assert sum(t.state == TrialState.COMPLETE for t in study.get_trials()) == 2
    assert client.get_run(study.user_attrs["mlflow_parent_run_id"]).info.status == "FINISHED"
    nothing_running(client, study)


@pytest.mark.slow
def test_storage_the_nodes_cannot_share_is_refused_before_anything_is_submitted(on_slurm, lab):
    tmp, env = on_slurm
    path = write_sweep(tmp, "unshared", 2)
    before = listed(env)
    # Partition `wide` has two nodes; the journal would be under this test's /tmp folder, which each node has its own of.
    done = lab("sweep", path, "--workers", "2", *LAUNCH, "launcher.partition=wide", env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "journal" in done.stderr and "2 nodes of partition wide" in done.stderr, done.stderr
    for wrong, said in (("launcher.partition=nosuch", "not a partition of this cluster: choose one of debug, wide"),
                        ("launcher.partiton=debug", "Did you mean partition?")):
        refused = lab("sweep", path, *LAUNCH, wrong, env=env)
        assert refused.returncode == 2 and said in refused.stderr, refused.stderr
    assert listed(env) == before
    assert not (tmp / "runs").exists() and not (tmp / "mlflow.db").exists()


def sweep_args(*argv: str) -> argparse.Namespace:
    from lab import arguments

    return arguments.parse(["sweep", "f.yaml", *argv])


def test_launcher_settings_layer_the_file_and_the_command_line():
    s = settings.load({"partition": "gpu", "time_min": 30, "sbatch_lines": ["--exclusive"]},
                      ["launcher.time_min=10", "launcher.sbatch_lines=[--exclusive,--constraint=a100]",
                       "launcher.signal=sigusr2"], "f.yaml")
    assert (s.partition, s.time_min, s.cpus_per_task, s.signal) == ("gpu", 10, 4, "USR2")
    assert settings.sbatch_options(s) == {"exclusive": True, "constraint": "a100"}
    args = sweep_args("--launcher", "slurm", "--workers", "3", "lr=0.1", "launcher.qos=high")
    assert settings.take_overrides(args) == ["launcher.qos=high"] and args.overrides == ["lr=0.1"]


@pytest.mark.parametrize("block, overrides, said", [
    ({"partion": "gpu"}, [], "f.yaml: launcher.partion is not a launcher setting. Did you mean partition?"),
    ({}, ["launcher.signal=KILL"], "launcher.signal='KILL' is not valid"),
    ({}, ["launcher.time_min=0"], "launcher.time_min=0 is not valid"),
    ({}, ["launcher.cpus_per_task=two"], "launcher.cpus_per_task='two' is not valid"),
    ({}, ["launcher.time_min=1", "launcher.signal_delay_s=60"], "shorter than the time limit"),
    ({}, ["launcher.sbatch_lines=[exclusive]"], "give sbatch options such as --constraint=a100"),
    ({}, ["launcher.partition"], "give launcher.KEY=VALUE"),
])
def test_launcher_settings_refuse_typos_and_bad_values(block, overrides, said):
    with pytest.raises(LabError) as err:
        settings.load(block, overrides, "f.yaml")
    assert said in str(err.value)


@pytest.mark.parametrize("argv, said", [
    (["--detach"], "--detach is an option of --launcher slurm"),
    (["launcher.partition=gpu"], "launcher.partition=gpu is an option of --launcher slurm"),
    (["--launcher", "slurm", "--gpus", "0"], "use launcher.gpus_per_task=N"),
    (["--launcher", "slurm", "--workers", "0"], "--workers=0 is not valid"),
])
def test_options_of_the_other_launcher_are_refused(argv, said):
    with pytest.raises(LabError) as err:
        settings.take_overrides(sweep_args(*argv))
    assert said in str(err.value)


def test_storage_across_nodes_must_be_shared():
    shared, local, two = Path("/home/me/runs/s"), Path("/tmp/runs/s"), ["n1", "n2"]
    http = "http://tracking:5000"
    settings.check_storage(str(local / "study.journal"), local, "sqlite:////tmp/m.db", ["n1"], None)  # one node
    settings.check_storage(str(shared / "study.journal"), shared, http, two, "gpu")
    settings.check_storage("postgresql://lab@db/optuna", shared, http, two, "gpu")
    for storage, out, uri, said in (
            (str(local / "study.journal"), shared, http, "the 2 nodes of partition gpu could not share it"),
            ("sqlite:////home/me/s.db", shared, http, "SQLite, whose file locks do not hold"),
            ("postgresql://lab@db/optuna", local, http, "would not find its checkpoints"),
            (str(shared / "study.journal"), shared, "sqlite:////home/me/mlflow.db", "start `lab server`")):
        with pytest.raises(LabError) as err:
            settings.check_storage(storage, out, uri, two, "gpu")
        assert said in str(err.value)
