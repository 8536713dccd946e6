"""What a sweep optimizes and constrains: a sweep file's objectives and constraints, the metrics they may name,
and their checks. spec.py builds on this module (SweepSpec's fields are these dataclasses); `spec` below is a
spec.SweepSpec, left unannotated so that this module imports nothing of spec.py."""
import math
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from lab.errors import LabError

DIRECTIONS = ("maximize", "minimize")
EPOCH_METRICS = ("train/loss", "train/acc", "val/loss", "val/acc", "val/f1_macro")
FINAL_METRICS = ("test/loss", "test/acc", "test/precision_macro", "test/recall_macro", "test/f1_macro")
# Measured once per run (train/measure.py): parameters, forward FLOPs per image, batch-1 latency, images/s.
MODEL_METRICS = ("model/params", "model/flops", "model/latency_ms", "model/throughput")
# Samplers that learn from results but ignore constraints (Optuna's CMA-ES says so on every trial), or that
# cannot take several objectives at all (CMA-ES raises). TPE, NSGA-II and GP read trial.constraints.
IGNORE_CONSTRAINTS = ("cmaes",)
SINGLE_OBJECTIVE = ("cmaes",)


@dataclass
class ObjectiveSpec:
    metric: str = "val/acc"
    direction: str = "maximize"


@dataclass
class BoundSpec:
    """A constraint on a logged metric: feasible when min <= value <= max (either may be left out)."""
    min: float | None = None
    max: float | None = None


def known_metric(name: str) -> bool:
    return name in EPOCH_METRICS + FINAL_METRICS + MODEL_METRICS or name.startswith("test/f1/")


def objectives(spec) -> list[ObjectiveSpec]:
    """What the study optimizes, in order: the file's objectives, or its one metric and direction."""
    return list(spec.objectives) or [ObjectiveSpec(spec.metric, spec.direction)]


def check_objectives(spec, raw, path: Path) -> None:
    """objectives and constraints checked; metric/direction then name the first objective, so that code reading
    one metric (confirm, the live view) reads the first."""
    metrics = [o.metric for o in spec.objectives]
    for i, o in enumerate(spec.objectives):
        if not known_metric(o.metric):
            raise LabError(f"{path}: objectives[{i}].metric={o.metric!r} is not a logged metric: choose one of "
                           f"{list(EPOCH_METRICS + FINAL_METRICS + MODEL_METRICS)} or test/f1/<class>.")
        if o.direction not in DIRECTIONS:
            raise LabError(f"{path}: objectives[{i}].direction={o.direction!r} is not valid: choose one of "
                           f"{list(DIRECTIONS)}.")
        if o.metric in metrics[:i]:
            raise LabError(f"{path}: objectives[{i}].metric={o.metric!r} is listed twice: give each metric once.")
    if spec.objectives:
        first = spec.objectives[0]
        for key in ("metric", "direction"):
            given = raw.get(key) if OmegaConf.is_dict(raw) else None
            if given is not None and given != getattr(first, key):
                raise LabError(f"{path}: {key}={given!r} and objectives are both given: objectives replace metric "
                               f"and direction; drop {key} (objectives[0] says {getattr(first, key)!r}).")
        spec.metric, spec.direction = first.metric, first.direction
    for name, bound in spec.constraints.items():
        if not known_metric(name):
            raise LabError(f"{path}: constraints.{name} is not a logged metric: constrain one of "
                           f"{list(EPOCH_METRICS + FINAL_METRICS + MODEL_METRICS)} or test/f1/<class>.")
        values = [v for v in (bound.min, bound.max) if v is not None]
        if not values:
            raise LabError(f"{path}: constraints.{name} sets neither min nor max: give at least one, e.g. "
                           f"{{max: 1.0e6}}.")
        if not all(math.isfinite(v) for v in values) or (len(values) == 2 and bound.min > bound.max):
            raise LabError(f"{path}: constraints.{name}: min={bound.min}, max={bound.max} is not valid: finite "
                           "numbers with min <= max.")
    sampler, pruner = spec.sampler.get("name"), spec.pruner.get("name", "none")
    if len(objectives(spec)) > 1 and sampler in SINGLE_OBJECTIVE:
        raise LabError(f"{path}: sampler.name={sampler!r} optimizes one objective only: with objectives "
                       f"{metrics} use tpe, nsga2, gp, random, qmc or grid.")
    if spec.constraints and sampler in IGNORE_CONSTRAINTS:
        raise LabError(f"{path}: sampler.name={sampler!r} ignores constraints ({sorted(spec.constraints)}): use "
                       "tpe, nsga2 or gp, which steer away from infeasible trials (random, qmc and grid do not "
                       "learn from results at all).")
    if len(objectives(spec)) > 1 and pruner != "none":
        raise LabError(f"{path}: pruner.name={pruner!r} cannot be used with several objectives: Optuna records no "
                       "intermediate values in a multi-objective study (Trial.report raises), so every trial "
                       "trains to the end. Set pruner: {name: none}, or keep one objective and turn the others "
                       "into constraints.")
