"""Stacks in a sweep (lab/train/stack.py trains them): a seeded trial's seeds as one stack, and (`stack: N`)
up to N trials of one structure as one stack, each member its own Optuna trial and MLflow run.

Seeds: a trial with `seeds: K` trains the seeds it has left as one stack, unless the pruner is wilcoxon,
which decides between seeds and so needs them one after another (spec.stack_notes says which, up front).
"""
import logging
from pathlib import Path

import optuna

from lab.sweep import liveness, seeds
from lab.train import stack_run

log = logging.getLogger(__name__)


def stacks_seeds(spec) -> bool:
    """Whether a seeded trial trains its seeds as one stack: every pruner but wilcoxon leaves them independent."""
    return spec.seeds > 1 and spec.stack_seeds and spec.pruner.get("name", "none") != "wilcoxon"


def seeds_together(trial: optuna.Trial, cfg, tags: dict[str, str], run_id: str, trial_dir: Path, first: int,
                   k: int, metric: str, per_seed: list[dict], runs: dict[str, str], values: list[float],
                   callbacks: tuple) -> None:
    """Seeds first..k-1 of the trial as one stack, children of its run `run_id`; appends each one's metrics,
    run id and value in seed order as objective.run_seeded does, and records them on the trial as each ends.
    Raises the first seed's failure (the trial fails, as it does when one seed run fails alone)."""
    members = []
    for i in range(first, k):
        seed = int(cfg.seed) + i
        seed_cfg = cfg.copy()
        seed_cfg.seed = seed
        seed_tags = {**tags, "lab.seed_index": str(i), "lab.command": f"{tags['lab.command']} seed={seed}"}
        members.append(stack_run.Member(seed_cfg, trial_dir / f"seed_{seed}", run_name=f"trial-{trial.number}-seed-{seed}",
                                        parent_run_id=run_id, tags=seed_tags, require=metric))
    failures: list[BaseException] = []

    def ended(m: stack_run.Member):
        def on_end(outcome):
            if isinstance(outcome, BaseException):
                failures.append(outcome)
                return
            if failures:
                return  # the trial fails with the first failure; later seeds are not carried into a retry
            per_seed.append(outcome)
            runs[str(m.cfg.seed)] = m.run_id
            values.append(outcome[metric])
            trial.set_user_attr(seeds.RUNS, runs)  # runs first: a retry carries a seed once both are written
            trial.set_user_attr(seeds.VALUES, values)
            trial.report(outcome[metric], step=len(values) - 1)
        return on_end

    for m in members:
        m.on_end = ended(m)
    liveness.training(True)
    stack_run.run(members, callbacks, pulse=liveness.progressed, what=f"seeds of trial {trial.number}")
    if failures:
        raise failures[0]
