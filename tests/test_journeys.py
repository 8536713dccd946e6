"""User journeys: the real `lab` commands chained the way people chain them (sweep with an override, best,
replay; a sweep that fails, a fix, the rerun; typos and wrong options), read back through Optuna and MLflow."""
import json
import signal
import time

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

pytestmark = pytest.mark.slow

TINY = ["data=synthetic", "model=mlp", "data.n_train=128", "data.n_test=32", "data.size=8",
        "model.net.hidden=[16]", "trainer.max_epochs=1"]
LR = "  model.optimizer.lr: {type: float, low: 1.0e-3, high: 3.0e-2, log: true}\n"


def write_sweep(tmp, name, params=LR, overrides=TINY, extra=""):
    path = tmp / f"{name}.yaml"
    path.write_text(f"study: {name}\noverrides: {json.dumps(overrides)}\nmetric: val/acc\n{extra}params:\n{params}")
    return path


def no_traceback(done):
    assert "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr


def parent_runs(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.`lab.sweep` = 'true'") if exp else []


def test_override_best_replay_is_exact_and_a_changed_resume_is_refused(lab, workdir, journal):
    tmp, env = workdir
    path = write_sweep(tmp, "ovr", extra="n_trials: 2\nsampler: {name: random, seed: 1}\n")
    first = lab("sweep", path, "--workers", "2", "--no-live", "trainer.max_epochs=2")
    assert first.returncode == 0, first.stdout + first.stderr
    study = journal(tmp, "ovr")
    assert study.user_attrs["lab.base_overrides"].count("trainer.max_epochs=2") == 1
    assert "trainer.max_epochs=1" not in study.user_attrs["lab.base_overrides"]  # replaced, not duplicated

    best = lab("best", path)
    assert best.returncode == 0, best.stderr
    exported = tmp / "conf" / "experiment" / "ovr_best.yaml"
    cfg = yaml.safe_load(exported.read_text())
    assert cfg["trainer"]["max_epochs"] == 2 and cfg["threads"] == 1  # the sweep's override and the worker's threads
    replay_line = next(line for line in best.stdout.splitlines() if line.startswith("replay: lab train "))
    assert replay_line.count("trainer.max_epochs=") == 1 and "trainer.max_epochs=2" in replay_line

    replay = lab("train", "experiment=ovr_best", "mlflow.experiment=replay", "trainer.enable_progress_bar=false")
    assert replay.returncode == 0, replay.stderr
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("replay").experiment_id])
    assert run.data.metrics["val/acc"] == study.best_value  # exactly, not approximately
    trial_run = client.get_run(study.best_trial.user_attrs["mlflow_run_id"])
    assert run.data.metrics["test/loss"] == trial_run.data.metrics["test/loss"]

    changed = lab("sweep", path, "--workers", "2", "--no-live", "--n-trials", "3")  # the override forgotten
    assert changed.returncode == 2
    no_traceback(changed)
    assert "trainer.max_epochs=2" in changed.stderr and "trainer.max_epochs=1" in changed.stderr
    assert "--study" in changed.stderr
    assert len(journal(tmp, "ovr").get_trials()) == 2  # nothing ran, nothing was mixed in

    other = lab("sweep", path, "--workers", "1", "--no-live", "--study", "ovr_e1", "--n-trials", "1")
    assert other.returncode == 0, other.stdout + other.stderr
    assert len(journal(tmp, "ovr_e1").get_trials()) == 1 and len(journal(tmp, "ovr").get_trials()) == 2
    assert lab("best", path, "--study", "ovr_e1", "--export", tmp / "e1.yaml").returncode == 0
    assert len(parent_runs(client, "ovr")) == 1  # the refused launch made no parent run
    # --export onto a file that is not an export of this study (here a shipped experiment): refused, kept.
    mine = tmp / "conf" / "experiment" / "digits_mlp.yaml"
    before = mine.read_text()
    over = lab("best", path, "--study", "ovr_e1", "--export", mine)
    assert over.returncode == 2 and "is not an earlier export of study 'ovr_e1'" in over.stderr, over.stderr
    assert mine.read_text() == before and "best trial" not in over.stdout
    assert lab("best", path, "--study", "ovr_e1", "--export", tmp / "e1.yaml").returncode == 0  # its own: replaced


def test_failing_sweep_stops_with_the_reason_and_reruns_after_the_fix(lab, workdir, image_folder, journal):
    tmp, env = workdir
    root = tmp / "flowers"
    grid = ("  data.batch_size: {type: categorical, choices: [4, 8]}\n"
            "  model.optimizer.lr: {type: categorical, choices: [0.001, 0.01]}\n")
    overrides = ["data=image_folder", f"data.root={root}", "data.image_size=8", f"data.cache_dir={tmp / 'cache'}",
                 "model=mlp", "model.net.hidden=[16]", "trainer.max_epochs=1"]
    path = write_sweep(tmp, "flowers", grid, overrides, extra="n_trials: 20\nsampler: {name: grid}\n")

    missing = lab("sweep", path, "--workers", "2", "--no-live")  # every trial would fail: refused before one runs
    assert missing.returncode == 2 and f"data.root={root} does not exist" in missing.stderr, missing.stderr
    assert not (tmp / "runs" / "flowers").exists()

    root.mkdir()  # there, but without class folders: what only a trial finds out
    failed = lab("sweep", path, "--workers", "2", "--no-live")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    no_traceback(failed)
    assert "n_trials=20 is more than the grid's 4 combinations" in failed.stdout
    assert f"data.root={root} holds no class sub-folders" in failed.stdout  # said when the first trial failed
    study = journal(tmp, "flowers")
    assert {t.state for t in study.get_trials()} == {TrialState.FAIL}
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert client.get_run(study.user_attrs["mlflow_parent_run_id"]).info.status == "FAILED"

    image_folder(root, per_class=12, side=8)
    fixed = lab("sweep", path, "--workers", "2", "--no-live")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    study = journal(tmp, "flowers")
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert sorted(tuple(sorted(t.params.items())) for t in complete) == sorted(
        (("data.batch_size", b), ("model.optimizer.lr", lr)) for b in (4, 8) for lr in (0.001, 0.01))
    (parent,) = parent_runs(client, "flowers")  # the rerun reused the sweep's parent run
    assert parent.info.status == "FINISHED"
    logs = "".join(p.read_text() for p in (tmp / "runs" / "flowers" / "workers").glob("*.log"))
    assert "Traceback" not in logs  # no worker crashed at the end of the grid


def test_consecutive_failures_stop_a_sweep_early_and_keep_its_budget(lab, workdir, journal):
    tmp, _ = workdir
    path = write_sweep(tmp, "broken", overrides=[*TINY, "data.batch_size=100000"],
                       extra="n_trials: 30\nsampler: {name: random, seed: 0}\n")
    done = lab("sweep", path, "--workers", "1", "--no-live", "--max-failures", "2")
    assert done.returncode == 1
    no_traceback(done)
    assert "2 trials in a row failed (max_failures=2)" in done.stderr
    assert "data.batch_size=100000" in done.stderr  # the distinct reason, once
    trials = journal(tmp, "broken").get_trials()
    assert len(trials) == 2 and all(t.state == TrialState.FAIL for t in trials)
    assert "0/30 trials used" in done.stderr


def test_a_trial_that_kills_its_worker_is_retried_then_failed_and_the_slot_lives_on(lab, workdir, journal):
    tmp, _ = workdir
    # os.abort as a "callback" takes the worker process down with SIGABRT when the trial builds its callbacks.
    params = "  +callbacks.crash._target_: {type: categorical, choices: [os.abort, pytorch_lightning.Callback]}\n"
    path = write_sweep(tmp, "crash", params, extra="n_trials: 2\nsampler: {name: grid}\nmax_retries: 3\n")
    done = lab("sweep", path, "--workers", "1", "--no-live", timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    trials = journal(tmp, "crash").get_trials()
    crashed = [t for t in trials if t.params["+callbacks.crash._target_"] == "os.abort"]
    assert len(crashed) == 4 and all(t.state == TrialState.FAIL for t in crashed)  # the first run + 3 retries
    assert "killed by SIGABRT" in crashed[-1].user_attrs["fail_reason"]
    assert "gave up after 4 attempts" in crashed[-1].user_attrs["fail_reason"]
    (fine,) = [t for t in trials if t.params["+callbacks.crash._target_"] != "os.abort"]
    assert fine.state == TrialState.COMPLETE  # 4 deaths, more than the slot's 3 restarts, and it still ran


def test_options_are_checked_before_anything_is_created(lab, workdir):
    tmp, env = workdir
    path = write_sweep(tmp, "opts", extra="n_trials: 1\n")
    for args, named in [(["--gpus", "0"], "--gpus"), (["--workers", "0"], "--workers=0"),
                        (["--workers-per-gpu", "4"], "--workers-per-gpu=4"), (["--n-trials", "0"], "n_trials=0"),
                        (["--max-failures", "-1"], "max_failures=-1"), (["--study", "a/b"], "--study")]:
        done = lab("sweep", path, *args)
        assert done.returncode == 2, (args, done.stderr)
        assert named in done.stderr and done.stderr.startswith("lab: error:")
        no_traceback(done)
    for command in (["best"], ["report"], ["confirm"]):
        done = lab(*command, path)
        assert done.returncode == 2 and "no study 'opts'" in done.stderr, done.stderr
    assert not (tmp / "runs").exists() and not (tmp / "mlflow.db").exists()


def test_ctrl_c_names_itself_and_counts_add_up_after_the_resume(workdir, lab, start_lab, journal):
    tmp, env = workdir
    slow = [*TINY[:2], "data.n_train=6000", "data.size=24", "model.net.hidden=[256,256]", "trainer.max_epochs=3",
            "checkpoint.last_every_s=0"]
    path = write_sweep(tmp, "ctrlc", overrides=slow, extra="n_trials: 2\nsampler: {name: random, seed: 0}\n")
    proc = start_lab("sweep", path, "--workers", "1", "--no-live")
    end = time.time() + 300
    while time.time() < end:
        assert proc.poll() is None, proc.stdout.read()
        try:
            running = journal(tmp, "ctrlc").get_trials(states=(TrialState.RUNNING,))
        except (KeyError, FileNotFoundError):
            running = []
        if running and running[0].intermediate_values:
            break
        time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    (cut,) = journal(tmp, "ctrlc").get_trials(states=(TrialState.FAIL,))
    assert cut.user_attrs["fail_reason"] == "interrupted by Ctrl-C (SIGINT)"

    again = lab("sweep", path, "--workers", "1", "--no-live", timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    last = [line for line in again.stdout.splitlines() if line.startswith("ctrlc  complete")][-1]
    assert "complete 2  running 0  pruned 0  failed 0  queued again 1  of 2" in last


def test_budget_is_exact_when_workers_race_on_postgres(workdir, lab, start_lab, postgres):
    tmp, env = workdir
    path = write_sweep(tmp, "race", extra="n_trials: 3\nsampler: {name: random, seed: 0}\n")
    prepared = lab("sweep", path, "--storage", postgres, "--prepare")
    assert prepared.returncode == 0, prepared.stderr
    workers = []
    for host in range(4):  # four "hosts" asking for the last trials at the same moment
        (tmp / f"h{host}").mkdir()
        workers.append(start_lab("worker", path, "--storage", postgres, cwd=tmp / f"h{host}",
                                 env_extra={"LAB_TORCH_THREADS": "1"}))
    outputs = []
    for proc in workers:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
        outputs.append(out)
    trials = optuna.load_study(study_name="race", storage=postgres).get_trials()
    # Exact: three trials use the budget, not four, and racing fails none of them. (A failure seen once in CI was
    # only warned about and its reason lost; the reason and the workers' logs are what this message shows.)
    failed = [(t.number, t.user_attrs.get("fail_reason")) for t in trials if t.state != TrialState.COMPLETE]
    assert len(trials) == 3 and not failed, f"{failed}\n" + "\n".join(out[-3000:] for out in outputs)
