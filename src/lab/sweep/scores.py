"""A trial's result as Optuna takes it: its value(s) from the run's metrics, and its constraint values.

Constraints go through Trial.set_constraint (Optuna 5's way; the samplers' constraints_func is deprecated
since 5.0): TPE, NSGA-II and GP read them from trial.constraints, and study.best_trial / best_trials leave
infeasible trials out. A value <= 0 is feasible: value - max for a maximum, min - value for a minimum.
"""
import math

import optuna

from lab.errors import LabError
from lab.sweep.objectives import objectives
from lab.sweep.spec import SweepSpec
from lab.train.module import Diverged


def constraint_values(spec: SweepSpec, metrics: dict[str, float]) -> dict[str, float]:
    """{"model/params:max": value - max, ...}: one entry per bound, <= 0 when it holds."""
    out = {}
    for name, bound in spec.constraints.items():
        value = metrics[name]
        if bound.max is not None:
            out[f"{name}:max"] = value - bound.max
        if bound.min is not None:
            out[f"{name}:min"] = bound.min - value
    return out


def score(spec: SweepSpec, trial: optuna.Trial, metrics: dict[str, float]) -> float | tuple[float, ...]:
    """The value Optuna is told (a tuple with several objectives), the constraints set on the trial first.
    A missing or non-finite objective fails the trial (Optuna would store inf as COMPLETE)."""
    wanted = [o.metric for o in objectives(spec)] + list(spec.constraints)
    missing = [m for m in wanted if m not in metrics]
    if missing:
        raise LabError(f"metric(s) {missing} were not logged; logged: {sorted(metrics)}")
    bad = [f"{m} is {metrics[m]}" for m in wanted if not math.isfinite(metrics[m])]
    if bad:
        raise Diverged(", ".join(bad))
    for key, value in constraint_values(spec, metrics).items():
        trial.set_constraint(key, value)
    values = tuple(metrics[o.metric] for o in objectives(spec))
    return values if len(values) > 1 else values[0]
