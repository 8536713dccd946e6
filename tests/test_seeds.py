"""Seeds inside the search (`seeds: K`, `aggregate`, pruner wilcoxon): a real sweep read back through Optuna and
MLflow, and the checks that refuse bad combinations before anything runs."""
import math
import statistics
import textwrap

import pytest

from lab.errors import LabError
from lab.sweep import seeds, spec

# Trial 0 learns (lr 0.01, its seeds differ); trial 1 has lr 0: it trains nothing and stays near chance (4 classes).
SEEDED = """metric: val/acc
direction: maximize
n_trials: 2
seeds: 3
log_models: best
sampler: {name: random, seed: 0}
pruner: {name: wilcoxon, p_threshold: 0.3}
enqueue: [{model.optimizer.lr: 0.01}, {model.optimizer.lr: 0.0}]
params:
  model.optimizer.lr: {type: categorical, choices: [0.01, 0.0]}
"""


@pytest.mark.slow
def test_seeded_trials_average_their_seed_runs_and_wilcoxon_stops_a_worse_one(lab, workdir, sweep_file, journal,
                                                                             children):
    from mlflow.tracking import MlflowClient

    tmp, env = workdir
    # After 2 of 3 seeds that both lose, Wilcoxon's one-sided p is 2**-2 = 0.25 < 0.3: trial 1 stops there.
    path = sweep_file(tmp / "seeds.yaml", "seeded", SEEDED, extra=("trainer.max_epochs=1",))
    done = lab("sweep", path, "--workers", "1", "--no-live", env_extra={"LAB_TORCH_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    study = journal(tmp, "seeded")
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    good, worse = study.trials
    assert good.params == {"model.optimizer.lr": 0.01} and worse.params == {"model.optimizer.lr": 0.0}

    trial_runs = {r.info.run_name: r for r in children(client, study.user_attrs["mlflow_parent_run_id"])}
    # The sweep's children are trials, seeds nest below them; the stopped one says so in its name.
    assert set(trial_runs) == {"trial-0", "trial-1 (stopped after 2 seeds)"}
    for trial, n_seeds in ((good, 3), (worse, 2)):
        run = next(r for name, r in trial_runs.items() if name.startswith(f"trial-{trial.number}"))
        assert run.info.run_id == trial.user_attrs["mlflow_run_id"]
        seed_runs = {r.data.tags["seed"]: r for r in children(client, run.info.run_id)}
        assert sorted(seed_runs) == [str(s) for s in range(n_seeds)]
        assert {r.info.run_name for r in seed_runs.values()} == {f"trial-{trial.number}-seed-{s}" for s in range(n_seeds)}
        assert all(r.info.status == "FINISHED" for r in seed_runs.values())
        logged = [seed_runs[str(s)].data.metrics["val/acc"] for s in range(n_seeds)]
        assert trial.user_attrs["seed_values"] == pytest.approx(logged)
        assert trial.user_attrs["seed_runs"] == {s: r.info.run_id for s, r in seed_runs.items()}
        assert trial.value == pytest.approx(statistics.fmean(logged))  # aggregate: mean
        assert run.data.metrics["val/acc"] == pytest.approx(trial.value)
        assert run.data.metrics["val/acc/std"] == pytest.approx(statistics.stdev(logged))
        assert run.data.metrics["test/acc"] == pytest.approx(
            statistics.fmean(r.data.metrics["test/acc"] for r in seed_runs.values()))
        best_seed = max(seed_runs.values(), key=lambda r: r.data.metrics["val/acc"])
        assert seed_runs[str(logged.index(max(logged)))].info.run_id == trial.user_attrs["model_run_id"]
        assert best_seed.data.metrics["val/acc"] == max(logged)
        # log_models: best: no trial logged a model (`lab best` logs the winner's).
        assert all(r.data.params["mlflow.log_model"] == "False" for r in seed_runs.values())
    # ...but the sweep logged the winner's as it ended: the best seed run of the best trial, and no other.
    with_model = {r.info.run_id for t in (good, worse) for r in children(client, t.user_attrs["mlflow_run_id"])
                  if "lab.model_uri" in r.data.tags}
    assert with_model == {good.user_attrs["model_run_id"]}, done.stdout
    assert f"logged the best trial's model (trial {good.number})" in done.stdout
    assert min(good.user_attrs["seed_values"]) > max(worse.user_attrs["seed_values"])
    assert worse.user_attrs["lab.seeds_pruned"] == 2 and "lab.seeds_pruned" not in good.user_attrs
    assert "stopped after fewer seeds 1" in done.stdout

    best = lab("best", path)
    assert best.returncode == 0, best.stdout + best.stderr
    mean, sd = statistics.fmean(good.user_attrs["seed_values"]), statistics.stdev(good.user_attrs["seed_values"])
    assert f"val/acc = {mean:.6g} +- {sd:.2g} over 3 seeds" in best.stdout
    # The export and the replay line carry the seed of the run holding the model, so the replay retrains it.
    model_run = client.get_run(good.user_attrs["model_run_id"])
    assert f"seed={model_run.data.tags['seed']}" in best.stdout
    replay = lab("train", "experiment=seeded_best", "mlflow.experiment=replay", "trainer.enable_progress_bar=false")
    assert replay.returncode == 0, replay.stderr
    (run,) = client.search_runs([client.get_experiment_by_name("replay").experiment_id])
    assert run.data.metrics["test/loss"] == model_run.data.metrics["test/loss"]  # exactly: the same model
    report = lab("report", path)
    assert report.returncode == 0, report.stdout + report.stderr
    page = (tmp / "runs" / "seeded" / "report.html").read_text()
    trial_run = client.get_run(good.user_attrs["mlflow_run_id"])
    assert f"<tr><td>test/acc (mean over 3 seeds)</td><td>{trial_run.data.metrics['test/acc']:.6g}</td></tr>" in page


def test_aggregate_lcb_is_the_cautious_side_of_the_mean():
    values = [0.8, 0.9, 1.0]
    se = statistics.stdev(values) / math.sqrt(3)
    assert seeds.aggregate(values, "mean", maximize=True) == pytest.approx(0.9)
    assert seeds.aggregate(values, "lcb", maximize=True) == pytest.approx(0.9 - se)
    assert seeds.aggregate(values, "lcb", maximize=False) == pytest.approx(0.9 + se)  # a loss: the higher side
    assert seeds.aggregate([0.7], "lcb", maximize=True) == 0.7


BASE = """study: t
overrides: [data=synthetic, model=mlp]
metric: val/acc
n_trials: 4
params:
  model.optimizer.lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}
"""


def load(tmp_path, extra: str):
    path = tmp_path / "s.yaml"
    path.write_text(BASE + textwrap.dedent(extra))
    return spec.load(path, check=False)


@pytest.mark.parametrize("extra, says", [
    ("seeds: 0", "seeds=0 is not valid"),
    ("seeds: 3\naggregate: median", "aggregate='median' is not valid"),
    ("log_models: some", "log_models='some' is not valid"),
    ("pruner: {name: wilcoxon}", "set seeds: 3 or more"),
    ("seeds: 3\npruner: {name: median}", "use pruner wilcoxon"),
    ("seeds: 3\npruner: {name: hyperband}", "use pruner wilcoxon"),
])
def test_bad_seed_settings_are_refused(tmp_path, extra, says):
    with pytest.raises(LabError, match=says.replace("(", r"\(")):
        load(tmp_path, extra)


def test_a_wilcoxon_threshold_that_can_never_prune_is_noted(tmp_path):
    # 3 seeds: pruning could only save the third, after 2 seeds, where the smallest p is 2**-2 = 0.25.
    sweep = load(tmp_path, "seeds: 3\npruner: {name: wilcoxon, p_threshold: 0.1}")
    assert any("never stop a trial" in n and "use seeds: 5" in n for n in sweep.notes)
    for body in ("seeds: 5\npruner: {name: wilcoxon, p_threshold: 0.1}", "seeds: 3\npruner: {name: wilcoxon, p_threshold: 0.3}"):
        assert not [n for n in load(tmp_path, body).notes if "never stop" in n]


@pytest.mark.slow
def test_a_bad_seed_setting_stops_lab_sweep_before_anything_runs(lab, workdir, sweep_file):
    tmp, _ = workdir
    path = sweep_file(tmp / "bad.yaml", "bad", SEEDED.replace("pruner: {name: wilcoxon, p_threshold: 0.3}",
                                                              "pruner: {name: median}"))
    done = lab("sweep", path, "--workers", "1", "--no-live")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "use pruner wilcoxon" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp / "runs" / "bad").exists()


@pytest.mark.slow
def test_a_retried_seeded_trial_keeps_the_seeds_its_dead_worker_finished(workdir, start_lab, sweep_file, journal):
    import os
    import signal
    import time
    from pathlib import Path

    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from conftest import SLOW_TRIALS

    tmp, env = workdir
    body = "metric: val/acc\nn_trials: 1\nseeds: 2\nstack_seeds: false\nparams:\n  model.optimizer.lr: {type: categorical, choices: [0.003]}\n"
    proc = start_lab("sweep", sweep_file(tmp / "k.yaml", "killed_seeds", body, extra=SLOW_TRIALS), "--workers", "1",
                     "--no-live")
    victim, end = None, time.time() + 300
    while victim is None and time.time() < end:  # the second seed has written a last.ckpt
        assert proc.poll() is None, proc.stdout.read()
        try:
            running = journal(tmp, "killed_seeds").get_trials(states=(TrialState.RUNNING,))
        except (KeyError, FileNotFoundError):
            running = []
        victim = next((t for t in running if len(t.user_attrs.get("seed_values", [])) == 1
                       and (Path(t.user_attrs["checkpoint_dir"]) / "last.ckpt").exists()), None)
        time.sleep(0.3)
    assert victim is not None, "the second seed never started"
    os.kill(int(victim.user_attrs["pid"]), signal.SIGKILL)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out

    (retry,) = [t for t in journal(tmp, "killed_seeds").trials if t.user_attrs.get("lab.retry_of") == victim.number]
    assert retry.state == TrialState.COMPLETE
    assert retry.user_attrs["seed_runs"]["0"] == victim.user_attrs["seed_runs"]["0"]  # carried, not trained again
    assert retry.user_attrs["seed_values"][0] == victim.user_attrs["seed_values"][0]
    assert retry.value == pytest.approx(sum(retry.user_attrs["seed_values"]) / 2)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    trained = client.search_runs([client.get_run(retry.user_attrs["mlflow_run_id"]).info.experiment_id],
                                 f"tags.mlflow.parentRunId = '{retry.user_attrs['mlflow_run_id']}'")
    assert [r.data.tags["seed"] for r in trained] == ["1"]  # only the seed that was cut off
    assert trained[0].data.tags["lab.resumed_from"].endswith("seed_1/checkpoints/last.ckpt")
    dead = client.search_runs([trained[0].info.experiment_id],
                              f"tags.mlflow.parentRunId = '{victim.user_attrs['mlflow_run_id']}'")
    assert {r.data.tags["seed"]: r.info.status for r in dead} == {"0": "FINISHED", "1": "FAILED"}
