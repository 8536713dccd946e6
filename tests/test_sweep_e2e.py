"""The real `lab sweep`, `lab best` and `lab train` commands, read back through Optuna's and MLflow's clients."""
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

pytestmark = pytest.mark.slow  # every test runs the real `lab` command


def test_two_workers_six_trials_nested_in_mlflow_and_best_replays(workdir, lab, sweep_file, journal, children):
    tmp, env = workdir
    path = sweep_file(tmp / "s.yaml", "two_by_six", """
metric: val/acc
direction: maximize
n_trials: 6
sampler: {name: random, seed: 3}
params:
  model.optimizer.lr: {type: float, low: 1.0e-3, high: 3.0e-2, log: true}
  data.batch_size: {type: categorical, choices: [16, 32]}
  model.net.dropout: {type: float, low: 0.0, high: 0.4}
""")
    done = lab("sweep", path, "--workers", "2", "--no-live")
    assert done.returncode == 0, done.stdout + done.stderr

    study = journal(tmp, "two_by_six")
    trials = study.get_trials()
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)
    assert {t.user_attrs["worker"] for t in trials} == {"cpu0", "cpu1"}  # both workers pulled trials
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6  # workers do not repeat samples

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["n_trials"] == "6" and parent.data.params["sampler"].startswith('{"name": "random"')
    assert float(parent.data.tags["best_value"]) == pytest.approx(study.best_value, rel=1e-5)
    artifacts = {a.path for a in client.list_artifacts(parent_id)} | {
        a.path for a in client.list_artifacts(parent_id, "plots")}
    assert {"trials.csv", "sweep.yaml", "plots/optimization_history.png", "plots/slice.png",
            "plots/parallel_coordinate.png", "plots/param_importances.png"} <= artifacts

    runs = {int(r.data.tags["trial.number"]): r for r in children(client, parent_id)}
    assert sorted(runs) == [t.number for t in trials]
    for t in trials:
        run = runs[t.number]
        assert run.info.status == "FINISHED" and run.data.tags["trial.state"] == "COMPLETE"
        assert run.info.run_id == t.user_attrs["mlflow_run_id"]
        assert float(run.data.params["model.optimizer.lr"]) == t.params["model.optimizer.lr"]
        assert float(run.data.params["model.net.dropout"]) == t.params["model.net.dropout"]
        assert int(run.data.params["data.batch_size"]) == t.params["data.batch_size"]
        assert run.data.metrics["val/acc"] == pytest.approx(t.value)
        assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 2  # one per epoch
        assert "confusion_matrix.csv" in {a.path for a in client.list_artifacts(run.info.run_id)}

    # lab best exports an experiment; lab train of it reproduces the best trial's metric.
    best = lab("best", path)
    assert best.returncode == 0, best.stderr
    exported = tmp / "conf" / "experiment" / "two_by_six_best.yaml"
    assert exported.is_file() and "lab train experiment=two_by_six_best" in best.stdout
    # the pool gave each of 2 workers 1 thread on 2 cores
    replay = lab("train", "experiment=two_by_six_best", "trainer.enable_progress_bar=false",
                 env_extra={"LAB_TORCH_THREADS": "1"})
    assert replay.returncode == 0, replay.stderr[-3000:]
    exp = client.get_experiment_by_name("lab")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.metrics["val/acc"] == pytest.approx(study.best_value, abs=1e-6)

    # Relaunched with a budget below what is used: one sentence says so, nothing runs.
    again = lab("sweep", path, "--workers", "2", "--no-live", "--n-trials", "4")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing to run: the budget of 4 trials is spent (6 used); --n-trials N with N > 6" in again.stdout
    assert len(journal(tmp, "two_by_six").get_trials()) == 6


def test_median_pruner_prunes_a_hopeless_trial(workdir, lab, sweep_file, journal):
    tmp, env = workdir
    # Two good learning rates first, then one far too small to learn anything in 3 epochs: its val/acc
    # stays near chance (0.25 for 4 classes) below the median of the first two, so it must be pruned.
    path = sweep_file(tmp / "p.yaml", "prune_me", """
metric: val/acc
n_trials: 3
sampler: {name: random, seed: 0}
pruner: {name: median, n_startup_trials: 2, n_warmup_steps: 0}
enqueue:
  - {model.optimizer.lr: 0.03}
  - {model.optimizer.lr: 0.02}
  - {model.optimizer.lr: 1.0e-7}
params:
  model.optimizer.lr: {type: float, low: 1.0e-7, high: 0.1, log: true}
""").read_text()
    (tmp / "p.yaml").write_text(path.replace("trainer.max_epochs=2", "trainer.max_epochs=3"))
    done = lab("sweep", tmp / "p.yaml", "--workers", "1", "--no-live")
    assert done.returncode == 0, done.stdout + done.stderr
    study = journal(tmp, "prune_me")
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    pruned = study.get_trials()[2]
    assert list(pruned.intermediate_values) == [0]  # stopped after its first epoch
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run = client.get_run(pruned.user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["trial.state"] == "PRUNED"


def test_diverging_trial_fails_and_the_sweep_goes_on(workdir, lab, sweep_file, journal):
    tmp, env = workdir
    # The sampled third trial must learn: worker cpu0's seeded random draw is lr 0.016 (TPE's seed 0 drew 1.8e5,
    # which diverges too and made a fourth trial).
    path = sweep_file(tmp / "d.yaml", "diverge", """
metric: val/acc
n_trials: 2
sampler: {name: random, seed: 5}
enqueue:
  - {model.optimizer.lr: 1.0e+6}
  - {model.optimizer.lr: 0.01}
params:
  model.optimizer.lr: {type: float, low: 1.0e-4, high: 1.0e+6, log: true}
""", extra=("optimizer=sgd",))  # plain SGD at lr 1e6 overflows to inf/nan in the first epoch
    done = lab("sweep", path, "--workers", "1", "--no-live")
    study = journal(tmp, "diverge")
    trials = study.get_trials()
    # A diverged trial is final (not retried) and uses none of the budget: two more trials finish.
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE], done.stdout
    assert trials[0].user_attrs["fail_reason"].startswith("Diverged")
    assert done.returncode == 0
    run = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(trials[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["trial.state"] == "FAIL"


@pytest.mark.parametrize("param, named", [
    ("model.nope: {type: float, low: 0.1, high: 0.2}", "model.nope"),
    ("model.optimizer.lr: {type: float, low: 0.5, high: 0.1}", "model.optimizer.lr"),
    ("model.optimizer.lr: {type: float, low: 0.0, high: 0.1, log: true}", "model.optimizer.lr"),
    ("data.batch_size: {type: categorical, choices: []}", "data.batch_size"),
])
def test_invalid_sweep_fails_before_any_worker(workdir, lab, sweep_file, param, named):
    tmp, _ = workdir
    path = sweep_file(tmp / "bad.yaml", "bad", f"n_trials: 2\nparams:\n  {param}\n")
    done = lab("sweep", path, "--workers", "2", timeout=120)
    assert done.returncode == 2
    assert named in done.stderr and "Traceback" not in done.stderr
    assert not (tmp / "runs").exists()  # no study, no worker logs


def test_unknown_sampler_exit_code(workdir, lab, sweep_file):
    tmp, _ = workdir
    path = sweep_file(tmp / "bad.yaml", "bad", "sampler: {name: annealing}\nparams:\n"
                      "  model.optimizer.lr: {type: float, low: 0.001, high: 0.1}\n")
    done = lab("sweep", path, timeout=120)
    assert done.returncode == 2 and "annealing" in done.stderr
