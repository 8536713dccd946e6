"""Stop rules for a whole sweep: `stop: {target: 0.95}` and `stop: {patience: 20}`, beside max_failures.

Checked by each worker under the budget lock before it asks for a trial (running trials finish), by the
parent for its view and its exit, and at launch (a study whose rule already holds trains nothing).
On several objectives the rules read the first one.
"""
import math
from pathlib import Path

import optuna
from optuna.study import StudyDirection
from optuna.trial import TrialState

from lab.errors import LabError
from lab.sweep import ranking

RULES = ("target", "patience")
ATTR = "lab.stop_reason"  # study user attr and parent run tag: why the sweep stopped


def check(rules: dict, path: Path) -> None:
    for key in rules:
        if key not in RULES:
            raise LabError(f"{path}: stop.{key} is not a stop rule: use target (stop once the best value reaches "
                           "it) and/or patience (stop after that many finished trials without a better one).")
    target, patience = rules.get("target"), rules.get("patience")
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))
                               or not math.isfinite(target)):
        raise LabError(f"{path}: stop.target={target!r} is not valid: give a value of the sweep's metric, e.g. 0.95.")
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise LabError(f"{path}: stop.patience={patience!r} is not valid: give a number of finished trials, 1 or "
                       "more.")


def reason(rules: dict, metric: str, study: optuna.Study) -> str | None:
    """Why the sweep should stop now, or None. `rules` is the sweep file's stop mapping."""
    if not rules:
        return None
    maximize = study.directions[0] == StudyDirection.MAXIMIZE
    better = (lambda a, b: a > b) if maximize else (lambda a, b: a < b)
    finished = sorted((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))),
                      key=lambda t: (t.datetime_complete.timestamp() if t.datetime_complete else 0.0, t.number))
    best, since = None, 0  # the best trial so far in the order trials finished; finished trials after it
    for t in finished:
        if t.state == TrialState.COMPLETE and ranking.feasible(t) and (best is None or better(t.values[0], best.values[0])):
            best, since = t, 0
        else:
            since += 1
    if best is None:
        return None
    value, target, patience = best.values[0], rules.get("target"), rules.get("patience")
    if target is not None and (value >= target if maximize else value <= target):
        return (f"target {metric} {'>=' if maximize else '<='} {target:g} reached: {value:.6g} by trial "
                f"{best.number}")
    if patience is not None and since >= patience:
        return (f"patience {patience}: no better {metric} than {value:.6g} (trial {best.number}) in the {since} "
                "trials finished since")
    return None


def record(study: optuna.Study, why: str) -> None:
    if study.user_attrs.get(ATTR) != why:
        study.set_user_attr(ATTR, why)
