"""Several objectives and constraints: the sweep file's keys, what Optuna is told, the Pareto front that `lab best`
prints and `lab report` draws; a real two-objective sweep read back through Optuna's and MLflow's clients."""
import json
import math
import re

import optuna
import pytest
from omegaconf import OmegaConf
from optuna.trial import TrialState

from lab.errors import LabError
from lab.sweep import ranking, scores, spec
from lab.sweep import study as studies
from lab.sweep.objectives import objectives

TWO = """
objectives: [{metric: val/acc, direction: maximize}, {metric: model/params, direction: minimize}]
n_trials: 3
params:
  model.optimizer.lr: {type: float, low: 1.0e-3, high: 1.0e-1, log: true}
"""


def load(tmp_path, body: str, study: str = "mo") -> spec.Sweep:
    path = tmp_path / "s.yaml"
    path.write_text(f"study: {study}\n{body}")
    return spec.load(path, check=False)


def test_objectives_replace_metric_and_direction(tmp_path):
    sweep = load(tmp_path, TWO + "constraints: {model/params: {max: 1.0e6}, model/latency_ms: {min: 0, max: 5}}\n")
    assert [(o.metric, o.direction) for o in objectives(sweep.spec)] == [
        ("val/acc", "maximize"), ("model/params", "minimize")]
    assert (sweep.spec.metric, sweep.spec.direction) == ("val/acc", "maximize")  # single-objective code reads these
    assert sweep.spec.constraints["model/latency_ms"].max == 5
    identity = studies.identity(sweep)
    assert identity["lab.objectives"] == '[["val/acc", "maximize"], ["model/params", "minimize"]]'
    assert "model/latency_ms" in identity["lab.constraints"]
    # a file with no objectives is one objective: its metric
    one = load(tmp_path, "metric: val/loss\ndirection: minimize\nparams: {model.optimizer.lr: {type: float, low: 0.001, "
                         "high: 0.1}}\n")
    assert [(o.metric, o.direction) for o in objectives(one.spec)] == [("val/loss", "minimize")]


@pytest.mark.parametrize("extra, named", [
    ("metric: val/loss\n", "metric='val/loss' and objectives are both given"),
    ("direction: minimize\n", "direction='minimize' and objectives are both given"),
    ("pruner: {name: median}\n", "pruner.name='median' cannot be used with several objectives"),
    ("sampler: {name: cmaes}\n", "sampler.name='cmaes' optimizes one objective only"),
    ("constraints: {model/size: {max: 3}}\n", "constraints.model/size is not a logged metric"),
    ("constraints: {model/params: {}}\n", "constraints.model/params sets neither min nor max"),
    ("constraints: {model/params: {min: 5, max: 1}}\n", "min=5.0, max=1.0 is not valid"),
])
def test_bad_objectives_and_constraints_are_refused_by_name(tmp_path, extra, named):
    with pytest.raises(LabError, match=re.escape(named)):
        load(tmp_path, TWO + extra)


def test_objective_lists_are_checked(tmp_path):
    with pytest.raises(LabError, match=re.escape("objectives[1].metric='model/size' is not a logged metric")):
        load(tmp_path, TWO.replace("metric: model/params", "metric: model/size"))
    with pytest.raises(LabError, match=re.escape("objectives[1].metric='val/acc' is listed twice")):
        load(tmp_path, TWO.replace("metric: model/params", "metric: val/acc"))
    with pytest.raises(LabError, match=re.escape("objectives[0].direction='up' is not valid")):
        load(tmp_path, TWO.replace("direction: maximize", "direction: up"))
    # one objective keeps its pruner; constraints refuse the sampler that ignores them
    one = TWO.replace(", {metric: model/params, direction: minimize}", "")
    assert load(tmp_path, one + "pruner: {name: median}\n").spec.pruner["name"] == "median"
    with pytest.raises(LabError, match=re.escape("sampler.name='cmaes' ignores constraints")):
        load(tmp_path, one + "sampler: {name: cmaes}\nconstraints: {model/params: {max: 10}}\n")


def test_a_timed_cost_without_measuring_is_refused_before_any_trial(tmp_path):
    """measure.enabled=false in the base config: no trial would log model/latency_ms, so no trial could be scored."""
    path = tmp_path / "s.yaml"
    path.write_text("study: mo\nexperiment: digits_mlp\noverrides: [measure.enabled=false]\n" + TWO
                    + "constraints: {model/latency_ms: {max: 5}}\n")
    with pytest.raises(LabError, match="model/latency_ms is an objective or constraint, but the base config sets "
                                       "measure.enabled=false"):
        spec.load(path)
    path.write_text("study: mo\nexperiment: digits_mlp\noverrides: [measure.enabled=false]\n" + TWO)
    spec.load(path)  # model/params is counted whether or not anything is timed


def test_score_sets_constraints_and_returns_every_objective(tmp_path):
    sweep = load(tmp_path, TWO + "constraints: {model/params: {max: 1000}, val/acc: {min: 0.5}}\n")
    study = optuna.create_study(directions=["maximize", "minimize"])
    trial = study.ask()
    assert scores.score(sweep.spec, trial, {"val/acc": 0.75, "model/params": 1200.0}) == (0.75, 1200.0)
    study.tell(trial, (0.75, 1200.0))
    frozen = study.trials[0]
    assert frozen.constraints == {"model/params:max": 200.0, "val/acc:min": -0.25}
    assert not ranking.feasible(frozen)
    with pytest.raises(LabError, match="model/params"):
        scores.score(sweep.spec, study.ask(), {"val/acc": 0.75})
    with pytest.raises(Exception, match="model/params is inf"):
        scores.score(sweep.spec, study.ask(), {"val/acc": 0.75, "model/params": math.inf})


def add(study, values, constraint=None):
    trial = study.ask()
    trial.suggest_float("x", 0, 10)
    if constraint is not None:
        trial.set_constraint("model/params:max", constraint)
    study.tell(trial, values)


def test_the_front_leaves_out_infeasible_and_dominated_trials_and_shows_what_the_constraint_cost():
    study = optuna.create_study(directions=["maximize", "minimize"])
    add(study, (0.90, 500.0), -1)     # 0: front
    add(study, (0.80, 900.0), -1)     # 1: dominated by 0
    add(study, (0.95, 2000.0), 1000)  # 2: would be on the front, but too big
    add(study, (0.70, 100.0), -1)     # 3: front
    add(study, (0.60, 3000.0), 2000)  # 4: infeasible and dominated
    # Optuna's own answer respects feasibility (checked for the installed version)
    assert sorted(t.number for t in study.best_trials) == [0, 3]
    assert [t.number for t in ranking.front(study)] == [0, 3]  # by the first objective
    assert [t.number for t in ranking.front_table(study)] == [0, 3, 2]
    assert [t.number for t in ranking.ranked(study)] == [0, 3, 1, 2, 4]  # front, rest, then infeasible
    assert ranking.best(study).number == 0
    # one objective: Optuna's best_trial skips an infeasible better value
    single = optuna.create_study(direction="maximize")
    add(single, 0.5, -1)
    add(single, 0.9, 5)
    assert single.best_trial.number == 0 == ranking.best(single).number
    assert [t.number for t in ranking.front(single)] == [0]


def test_a_study_keeps_its_number_of_objectives(tmp_path):
    storage = str(tmp_path / "j.journal")
    one = TWO.replace(", {metric: model/params, direction: minimize}", "")
    studies.create_or_resume(load(tmp_path, one), storage)
    with pytest.raises(LabError, match=re.escape("was created with direction(s) maximize, the sweep file now says maximize, minimize")):
        studies.create_or_resume(load(tmp_path, TWO), storage)
    study = studies.create_or_resume(load(tmp_path, TWO, study="other"), storage)
    assert len(study.directions) == 2


SWEEP = """
objectives: [{metric: val/acc, direction: maximize}, {metric: model/params, direction: minimize}]
constraints: {model/params: {max: 5000}}
n_trials: 6
sampler: {name: tpe, seed: 0}
enqueue:
  - {data.size: 16, model.optimizer.lr: 0.01}
  - {data.size: 8, model.optimizer.lr: 0.01}
params:
  data.size: {type: categorical, choices: [8, 16]}
  model.optimizer.lr: {type: float, low: 1.0e-3, high: 3.0e-2, log: true}
"""


@pytest.mark.slow
def test_two_objective_sweep_front_best_export_and_report(workdir, lab, sweep_file, journal, children):
    from mlflow.tracking import MlflowClient

    tmp, env = workdir
    # Pruning cannot work here (Optuna keeps no intermediate values): refused before anything is created.
    refused = sweep_file(tmp / "p.yaml", "tradeoff_pruned", SWEEP + "pruner: {name: median}\n")
    done = lab("sweep", refused, "--workers", "1", "--no-live")
    assert done.returncode == 2 and "cannot be used with several objectives" in done.stderr, done.stderr
    assert not (tmp / "runs" / "tradeoff_pruned").exists()

    path = sweep_file(tmp / "s.yaml", "tradeoff", SWEEP)
    done = lab("sweep", path, "--workers", "1", "--no-live", timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr[-5000:]
    study = journal(tmp, "tradeoff")
    trials = study.get_trials()
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    for t in trials:  # what Optuna was told is what the run logged
        metrics = client.get_run(t.user_attrs["mlflow_run_id"]).data.metrics
        assert t.values == [pytest.approx(metrics["val/acc"]), pytest.approx(metrics["model/params"])]
        assert t.constraints == {"model/params:max": pytest.approx(metrics["model/params"] - 5000)}
    big = [t for t in trials if t.params["data.size"] == 16]
    assert big and all(not ranking.feasible(t) for t in big)  # 16x16 inputs: more than 5000 parameters
    front = study.best_trials
    feasible = [t for t in trials if ranking.feasible(t)]
    assert front and all(ranking.feasible(t) for t in front)
    assert not any(ranking.dominates(o, t, study.directions) for t in front for o in feasible)  # none dominated
    assert all(t in front or any(ranking.dominates(f, t, study.directions) for f in front) for t in feasible)

    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.data.tags["pareto_size"] == str(len(front)) and "best_value" not in parent.data.tags
    assert json.loads(parent.data.params["objectives"]) == [["val/acc", "maximize"], ["model/params", "minimize"]]
    assert sorted(json.loads(parent.data.tags["pareto_trials"])) == sorted(t.number for t in front)

    best = lab("best", path)
    assert best.returncode == 0, best.stderr
    assert f"Pareto front: {len(front)} of 6 completed trials; constraints model/params <= 5000" in best.stdout
    rows = {int(line.split()[0]): line.split() for line in best.stdout.splitlines() if re.match(r"\s*\d+\s", line)}
    assert {n for n, r in rows.items() if r[3] == "yes"} == {t.number for t in front}
    for t in front:
        assert float(rows[t.number][1]) == pytest.approx(t.values[0], rel=1e-5)
        assert float(rows[t.number][2]) == pytest.approx(t.values[1], rel=1e-5)
    first = max(front, key=lambda t: (t.values[0], -t.number))
    assert (tmp / "conf" / "experiment" / "tradeoff_best.yaml").is_file()
    assert f"best trial {first.number} in val/acc on the front" in best.stdout

    # any trial exports, an infeasible one too
    other = big[0]
    picked = lab("best", path, "--trial", str(other.number))
    assert picked.returncode == 0, picked.stderr
    exported = OmegaConf.load(tmp / "conf" / "experiment" / f"tradeoff_trial{other.number}.yaml")
    assert exported.data.size == 16 and exported.model.optimizer.lr == pytest.approx(other.params["model.optimizer.lr"])
    missing = lab("best", path, "--trial", "99")
    assert missing.returncode == 2 and "--trial 99 is not a trial of study 'tradeoff'" in missing.stderr

    reported = lab("report", path)
    assert reported.returncode == 0, reported.stderr
    page = (tmp / "runs" / "tradeoff" / "report.html").read_text()
    assert "<h2>Pareto front</h2>" in page and 'id="plot-pareto_front"' in page
    assert page.count("window.PlotlyConfig") == 1  # plotly.js inlined once for every figure
    assert "model/params &lt;= 5000" in page
