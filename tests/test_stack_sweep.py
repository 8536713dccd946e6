"""Stacks in real sweeps (sweep/stacking.py): seeds of a trial as one stack, `stack: N` trials as one stack, read
back through Optuna and MLflow."""
import json
import statistics

import pytest

SEEDS = """metric: val/acc
n_trials: 1
seeds: 3
sampler: {name: random, seed: 0}
params:
  model.optimizer.lr: {type: categorical, choices: [0.01]}
"""


@pytest.mark.slow
def test_a_seeded_trial_trains_its_seeds_as_one_stack(lab, workdir, sweep_file, journal, children):
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    tmp, env = workdir
    done = lab("sweep", sweep_file(tmp / "s.yaml", "stacked_seeds", SEEDS), "--workers", "1", "--no-live")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "seeds: 3 of each trial train as one stack" in done.stdout
    assert "one at a time" not in done.stdout + done.stderr
    (trial,) = journal(tmp, "stacked_seeds").trials
    assert trial.state == TrialState.COMPLETE
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    seed_runs = children(client, trial.user_attrs["mlflow_run_id"])
    assert sorted(r.data.tags["seed"] for r in seed_runs) == ["0", "1", "2"]
    assert all(r.data.tags["lab.stacked"] == "true" and r.info.status == "FINISHED" for r in seed_runs)
    values = [r.data.metrics["val/acc"] for r in sorted(seed_runs, key=lambda r: r.data.tags["seed"])]
    assert trial.user_attrs["seed_values"] == pytest.approx(values)
    assert trial.value == pytest.approx(statistics.fmean(values))
    assert len({round(v, 6) for v in values}) > 1 or len(values) == 3  # each seed its own run
    best = lab("best", tmp / "s.yaml")
    assert best.returncode == 0, best.stdout + best.stderr
    assert "over 3 seeds" in best.stdout


TRIALS = """metric: val/acc
n_trials: 4
stack: 3
sampler: {name: random, seed: 0}
params:
  model.optimizer.lr: {type: float, low: 1.0e-3, high: 3.0e-2, log: true}
  model.net.hidden: {type: categorical, choices: [[16], [32]]}
"""


@pytest.mark.slow
def test_stacked_trials_through_best_replay_confirm_and_report(lab, workdir, sweep_file, journal):
    """stack: 3 over 4 trials: one stack of 3 trials sharing the first one's width, then one alone (the budget
    holds). Each is its own trial and run; `lab best`'s replay trains the best alone and gets its value."""
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    tmp, env = workdir
    path = sweep_file(tmp / "t.yaml", "stacked_trials", TRIALS)
    done = lab("sweep", path, "--workers", "1", "--no-live")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "stack: 3: a worker trains up to 3 trials of one structure as one stack" in done.stdout
    study = journal(tmp, "stacked_trials")
    trials = study.trials
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    stacked = [t for t in trials if t.user_attrs.get("lab.stacked_with") == 0]
    assert [t.number for t in stacked] == [0, 1, 2]
    assert len({json.dumps(t.params["model.net.hidden"]) for t in stacked}) == 1  # one structure
    assert len({t.params["model.optimizer.lr"] for t in stacked}) == 3  # its own values
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    for t in trials:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.info.run_name == f"trial-{t.number}"
        assert run.data.metrics["val/acc"] == pytest.approx(t.value)
        assert (run.data.tags.get("lab.stacked") == "true") == (t.number < 3)
        assert "checkpoint" in run.data.tags

    best = lab("best", path, "--trial", "1")  # a member of the stack, not its first
    assert best.returncode == 0, best.stdout + best.stderr
    replay = lab("train", "experiment=stacked_trials_trial1", "mlflow.experiment=replay",
                 "trainer.enable_progress_bar=false")
    assert replay.returncode == 0, replay.stderr
    (run,) = client.search_runs([client.get_experiment_by_name("replay").experiment_id])
    assert "lab.stacked" not in run.data.tags  # trained alone
    assert run.data.metrics["val/acc"] == pytest.approx(trials[1].value, abs=1e-4)

    confirm = lab("confirm", path, "--top", "1", "--seeds", "2")
    assert confirm.returncode == 0, confirm.stdout + confirm.stderr
    report = lab("report", path)
    assert report.returncode == 0, report.stdout + report.stderr


@pytest.mark.slow
def test_a_worker_killed_in_the_middle_of_a_stack_retries_every_unfinished_member(workdir, start_lab, sweep_file,
                                                                                   journal):
    """SIGKILL of the worker after the stack's first epoch: all three members are reaped and queued again, each
    retry resumes from the last.ckpt its member wrote (checkpoint.last_every_s=0: every epoch) as a stack of one
    and logs only the epochs from there on, all complete, and nothing is left RUNNING in Optuna or MLflow."""
    import os
    import re
    import signal
    import time
    from pathlib import Path

    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from conftest import SLOW_TRIALS

    tmp, env = workdir
    body = ("metric: val/acc\nn_trials: 3\nstack: 3\nsampler: {name: random, seed: 0}\nparams:\n"
            "  model.optimizer.lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}\n")
    proc = start_lab("sweep", sweep_file(tmp / "k.yaml", "killed_stack", body, extra=SLOW_TRIALS), "--workers", "1",
                     "--no-live")
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    victims, end = [], time.time() + 300
    while not victims and time.time() < end:  # three members running, the first epoch's last.ckpt written
        assert proc.poll() is None, proc.stdout.read()
        try:
            running = journal(tmp, "killed_stack").get_trials(states=(TrialState.RUNNING,))
        except (KeyError, FileNotFoundError):
            running = []
        if len(running) == 3 and all("mlflow_run_id" in t.user_attrs for t in running) and \
                (Path(running[0].user_attrs["checkpoint_dir"]) / "last.ckpt").is_file():
            victims = running
        time.sleep(0.1)
    assert victims, "the stack never got through an epoch"
    assert len({t.user_attrs["pid"] for t in victims}) == 1  # one worker owns the stack
    os.kill(int(victims[0].user_attrs["pid"]), signal.SIGKILL)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out

    trials = journal(tmp, "killed_stack").trials
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    for victim in victims:
        dead = trials[victim.number]
        assert dead.state == TrialState.FAIL and "died" in dead.user_attrs["fail_reason"]
        (retry,) = [t for t in trials if t.user_attrs.get("lab.retry_of") == victim.number]
        assert retry.state == TrialState.COMPLETE and retry.params == victim.params
        assert client.get_run(victim.user_attrs["mlflow_run_id"]).info.status != "RUNNING"
        last = f"{victim.user_attrs['checkpoint_dir']}/last.ckpt"
        assert retry.user_attrs["lab.resume_from"] == last
        tags = client.get_run(retry.user_attrs["mlflow_run_id"]).data.tags
        resumed = re.fullmatch(rf"resumed after epoch (\d+) from {re.escape(last)}", tags["lab.resume"])
        assert resumed, tags["lab.resume"]
        start = int(resumed.group(1))  # epochs the member had finished (>= 1: one was logged before the kill)
        steps = [m.step for m in client.get_metric_history(retry.user_attrs["mlflow_run_id"], "val/acc")]
        assert 1 <= start and steps == (list(range(start, 4)) or [3])  # 4 epochs; none left: the last one's
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 3  # the budget holds


@pytest.mark.parametrize("extra, says", [
    ("stack: 0", "stack=0 is not valid"),
    ("stack: many", "stack='many' is not valid"),
    ("stack: 4\nseeds: 3", "each trial's seeds already train as one stack"),
    ("stack: 4\nsampler: {name: grid}", "does not work with sampler grid"),
])
def test_a_bad_stack_setting_is_one_sentence(tmp_path, extra, says):
    from lab.errors import LabError
    from lab.sweep import spec

    path = tmp_path / "s.yaml"
    path.write_text(f"study: s\n{extra}\nparams:\n  model.optimizer.lr: {{type: categorical, choices: [0.01]}}\n")
    with pytest.raises(LabError, match=says):
        spec.load(path, check=False)


def test_the_sweep_says_up_front_how_seeds_train(tmp_path):
    from lab.sweep import spec

    def notes(extra):
        path = tmp_path / "s.yaml"
        path.write_text(f"study: s\n{extra}\nparams:\n  model.optimizer.lr: {{type: categorical, choices: [0.01]}}\n")
        return " ".join(spec.load(path, check=False).notes)

    assert "of each trial train as one stack" in notes("seeds: 3")
    assert "one after another, not as one stack: pruner wilcoxon" in notes("seeds: 5\npruner: {name: wilcoxon}")
    assert "one after another (stack_seeds: false)" in notes("seeds: 3\nstack_seeds: false")
