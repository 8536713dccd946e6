"""Stacks in real sweeps (sweep/stacking.py): seeds of a trial as one stack, `stack: N` trials as one stack, read
back through Optuna and MLflow."""
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
