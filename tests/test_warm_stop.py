"""Warm start (`warm_start:`) and the sweep's stop rules (`stop: {target, patience}`), run through the real
`lab sweep` and `lab best`, read back through Optuna and MLflow."""
import textwrap

import optuna
import pytest

from lab.errors import LabError
from lab.sweep import spec
from lab.sweep import study as studies

SOURCE = """metric: val/acc
n_trials: 3
sampler: {name: random, seed: 0}
params:
  model.optimizer.lr: {type: float, low: 1.0e-3, high: 3.0e-2, log: true}
  model.net.dropout: {type: float, low: 0.0, high: 0.4}
  model.net.hidden: {type: categorical, choices: [[16], [32]]}
"""
# The best first: what `lab best` exports, then the next ones a {study:} entry adds.
SOURCE_TRIALS = [({"model.optimizer.lr": 0.02, "model.net.dropout": 0.1, "model.net.hidden": "[32]"}, 0.9),
                 ({"model.optimizer.lr": 0.005, "model.net.dropout": 0.2, "model.net.hidden": "[16]"}, 0.8),
                 ({"model.optimizer.lr": 0.002, "model.net.dropout": 0.3, "model.net.hidden": "[16]"}, 0.7)]
FOLLOW = """metric: val/acc
n_trials: 3
sampler: {{name: random, seed: 1}}
warm_start: [source_best, {{study: source, top: 2}}]
params:
  model.optimizer.lr: {{type: float, low: {low}, high: 3.0e-2, log: true}}
  model.net.hidden: {{type: categorical, choices: [[16], [32]]}}
"""


def study_names(journal_path) -> set[str]:
    if not journal_path.is_file():
        return set()
    return {s.study_name for s in optuna.get_all_study_summaries(studies.open_storage(str(journal_path)))}


def source_study(tmp, path):
    """The source sweep's study with three finished trials, written to its storage through Optuna's own API."""
    sweep = spec.load(path, check=False)
    _, storage = studies.locate(sweep, out=str(tmp / "runs" / "source"))
    study = optuna.create_study(study_name="source", storage=studies.open_storage(storage), direction="maximize")
    for params, value in SOURCE_TRIALS:
        study.add_trial(optuna.trial.create_trial(params=params, distributions=sweep.space, value=value))


@pytest.mark.slow
def test_warm_start_trials_come_first_with_the_given_values(lab, workdir, sweep_file, journal):
    tmp, _ = workdir
    source_study(tmp, sweep_file(tmp / "source.yaml", "source", SOURCE))
    exported = lab("best", tmp / "source.yaml")
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert (tmp / "conf" / "experiment" / "source_best.yaml").is_file()

    # A value outside the new space is refused by name before the study exists (Optuna would only warn).
    narrow = sweep_file(tmp / "narrow.yaml", "narrow", FOLLOW.format(low=1.0e-3).replace("3.0e-2", "1.0e-2"))
    refused = lab("sweep", narrow, "--workers", "1", "--no-live")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "model.optimizer.lr=0.02 lies outside this sweep's space [0.001, 0.01] (log)" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert "narrow" not in study_names(tmp / "runs" / "narrow" / "study.journal")

    follow = sweep_file(tmp / "follow.yaml", "follow", FOLLOW.format(low=1.0e-3))
    done = lab("sweep", follow, "--workers", "1", "--no-live", env_extra={"LAB_TORCH_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "model.net.dropout not searched here: dropped" in done.stdout
    trials = journal(tmp, "follow").trials
    assert len(trials) == 3 and all(t.state.name == "COMPLETE" for t in trials)
    searched = lambda params: {k: v for k, v in params.items() if k != "model.net.dropout"}  # noqa: E731
    # The exported best, then the study's second best (its best is the same configuration: enqueued once).
    assert trials[0].params == searched(SOURCE_TRIALS[0][0])
    assert trials[1].params == searched(SOURCE_TRIALS[1][0])
    assert trials[0].user_attrs["lab.warm_start"].endswith("source_best.yaml")
    assert trials[1].user_attrs["lab.warm_start"] == "study source trial 1"
    assert "lab.warm_start" not in trials[2].user_attrs  # sampled


def test_warm_start_sources_that_do_not_exist_are_refused_before_a_study_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LAB_CONF_DIR", str(tmp_path / "conf"))
    for entry, says in (("missing_best.yaml", "missing_best.yaml does not exist"),
                        ("{study: nowhere}", "no study 'nowhere' in"),
                        ("{study: x, top: 0}", r"warm_start\[0\].top=0 is not valid"),
                        ("{name: x}", "a study entry takes study")):
        path = tmp_path / "s.yaml"
        path.write_text(textwrap.dedent(f"""\
            study: w
            overrides: [data=synthetic, model=mlp]
            warm_start: [{entry}]
            params:
              model.optimizer.lr: {{type: float, low: 1.0e-4, high: 1.0e-1, log: true}}
            """))
        with pytest.raises(LabError, match=says):
            sweep = spec.load(path, check=False)
            studies.create_or_resume(sweep, str(tmp_path / "runs" / "w" / "study.journal"))
    assert not study_names(tmp_path / "runs" / "w" / "study.journal")


# lr 0 trains nothing: every trial has the same value, so patience counts exactly.
STILL = """metric: val/acc
n_trials: {n}
sampler: {{name: random, seed: 0}}
stop: {stop}
params:
  model.optimizer.lr: {{type: categorical, choices: [0.0]}}
"""


@pytest.mark.slow
@pytest.mark.parametrize("rule, n_finished, says", [("{target: 0.0}", 1, "target val/acc >= 0 reached"),
                                                   ("{patience: 2}", 3, "patience 2: no better val/acc")])
def test_a_stop_rule_ends_the_sweep_with_its_reason_and_exit_0(lab, workdir, sweep_file, journal, rule, n_finished,
                                                               says):
    from mlflow.tracking import MlflowClient

    tmp, env = workdir
    path = sweep_file(tmp / "stop.yaml", "stopping", STILL.format(n=6, stop=rule), extra=("trainer.max_epochs=1",))
    done = lab("sweep", path, "--workers", "1", "--no-live", env_extra={"LAB_TORCH_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"stopped: {says}" in done.stdout
    study = journal(tmp, "stopping")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * n_finished
    assert study.user_attrs["lab.stop_reason"].startswith(says)
    parent = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.data.tags["lab.stop_reason"] == study.user_attrs["lab.stop_reason"]
    assert parent.info.status == "FINISHED"

    again = lab("sweep", path, "--workers", "1", "--no-live")  # the rule still holds: nothing to train
    assert again.returncode == 0, again.stdout + again.stderr
    assert "its stop rule already holds" in again.stdout
    assert len(journal(tmp, "stopping").trials) == n_finished


@pytest.mark.parametrize("rule, says", [("{patience: 0}", "stop.patience=0 is not valid"),
                                        ("{target: high}", "stop.target='high' is not valid"),
                                        ("{after: 3}", "stop.after is not a stop rule")])
def test_bad_stop_rules_are_refused(tmp_path, rule, says):
    path = tmp_path / "s.yaml"
    path.write_text(f"study: s\noverrides: [data=synthetic, model=mlp]\nstop: {rule}\nparams:\n"
                    "  model.optimizer.lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}\n")
    with pytest.raises(LabError, match=says):
        spec.load(path, check=False)
