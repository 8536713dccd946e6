"""Seeds inside a trial (`seeds: K`): which seeds, their aggregate, what a retried trial carries over, and how
a seeded trial reads in `lab best`. objective.run_seeded trains them.

A trial's value is the mean of its K seed values, or `aggregate: lcb`, the mean less one standard error
(sample std / sqrt(K); plus for a minimized metric): a configuration that is good on average but erratic
ranks below one that is as good every time. Seed i of every trial is cfg.seed + i, so that the Wilcoxon
pruner compares trials seed by seed (its step is the seed index).
"""
import math
import statistics

import optuna

VALUES = "seed_values"  # user attr: the sweep metric per finished seed, in seed order
RUNS = "seed_runs"  # user attr: {seed (str): MLflow run id}
MODEL_RUN = "model_run_id"  # user attr: the seed run with the best value (its checkpoint, its model)
PRUNED = "lab.seeds_pruned"  # user attr: the number of seeds after which the Wilcoxon pruner stopped the trial


def std(values: list[float]) -> float:
    """Sample standard deviation (n - 1); 0 for one value."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(values: list[float], how: str, maximize: bool) -> float:
    mean = statistics.fmean(values)
    if how == "mean":
        return mean
    se = std(values) / math.sqrt(len(values))
    return mean - se if maximize else mean + se


def carried(trial: optuna.Trial, retry_of: int | None) -> tuple[list[float], dict[str, str]]:
    """The seeds a trial cut off by its worker's death had finished (its retry runs only the rest)."""
    if retry_of is None:
        return [], {}
    before = next((t for t in trial.study.get_trials(deepcopy=False) if t.number == retry_of), None)
    if before is None:
        return [], {}
    values, runs = list(before.user_attrs.get(VALUES, [])), dict(before.user_attrs.get(RUNS, {}))
    n = min(len(values), len(runs))  # both are written after each seed: a death between them drops that seed
    return values[:n], dict(list(runs.items())[:n])


def model_seed(trial: optuna.trial.FrozenTrial) -> int | None:
    """The seed of the run that holds a seeded trial's model (its best seed); None for a one-seed trial."""
    run = trial.user_attrs.get(MODEL_RUN)
    return next((int(seed) for seed, rid in trial.user_attrs.get(RUNS, {}).items() if rid == run), None)


def describe(trial: optuna.trial.FrozenTrial, seeds: int) -> str | None:
    """`0.9312 +- 0.0071 over 5 seeds (0.925, ...)` for a seeded trial; None for one seed."""
    values = trial.user_attrs.get(VALUES)
    if not values or seeds < 2:
        return None
    pruned = trial.user_attrs.get(PRUNED)
    shown = ", ".join(f"{v:.4g}" for v in values)
    return (f"{statistics.fmean(values):.6g} +- {std(values):.2g} over {len(values)} seeds ({shown})"
            + (f"; stopped by the Wilcoxon pruner after {pruned} of {seeds}" if pruned else ""))
