"""Stacks in a sweep (lab/train/stack.py trains them): a seeded trial's seeds as one stack, and (`stack: N`)
up to N trials of one structure as one stack, each member its own Optuna trial and MLflow run.

Seeds: a trial with `seeds: K` trains the seeds it has left as one stack, unless the pruner is wilcoxon,
which decides between seeds and so needs them one after another (stack_spec.stack_notes says which, up front).
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
    stack_run.run(members, callbacks, pulse=liveness.progressed, what=f"seeds of trial {trial.number}",
                  tested=lambda: liveness.training(False))
    if failures:
        raise failures[0]


# -- trials as one stack (`stack: N`) -------------------------------------------------------------------------
# Trials of the same structure (override paths that are not value settings, train/stack.py) whose stack trained
# one member at a time: asked alone from then on, said once.
REFUSED: dict[str, str] = {}
AUTO: dict[str, int] = {}  # the measured size for `stack: auto`, once per worker process
OWNER_ATTRS = ("host", "pid", "worker", "threads", "device")


def structural(sweep, params: dict) -> dict:
    from lab.sweep.spec import override_key
    from lab.train.stack import is_value_key

    return {k: v for k, v in params.items() if not is_value_key(override_key(k))}


def size(sweep, first: optuna.Trial) -> int:
    n = sweep.spec.stack
    if n != "auto":
        return int(n)
    if "n" not in AUTO:
        AUTO["n"] = auto_size(sweep, first)
    return AUTO["n"]


def next_waiting(study: optuna.Study):
    from optuna.trial import TrialState

    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    return min(waiting, key=lambda t: t.number) if waiting else None


def ask_mates(sweep, study: optuna.Study, first: optuna.Trial, out_dir: Path) -> list[optuna.Trial]:
    """Up to stack - 1 more trials with the first one's structural values (PartialFixedSampler around the study's
    sampler), within the budget; call under the budget lock, after the first was asked and labelled. A queued
    trial (a retry, an enqueued configuration) is taken only when it fits; a retry that resumes from a
    last.ckpt trains alone (a lone trial's through Lightning, a member's as a stack of one: resume below)."""
    import json

    from lab.sweep import budget

    if budget.RESUME_FROM in first.user_attrs:
        return []
    n = size(sweep, first)
    fixed = structural(sweep, first.params)
    key = json.dumps(fixed, sort_keys=True, default=str)
    if n <= 1 or key in REFUSED:
        return []
    room = sweep.spec.n_trials - budget.used_budget(study, failures_count=not sweep.spec.max_failures)
    mates: list[optuna.Trial] = []
    base = study.sampler
    for _ in range(min(n - 1, room)):
        queued = next_waiting(study)
        if queued is not None:
            given = queued.system_attrs.get("fixed_params", {})
            if budget.RESUME_FROM in queued.user_attrs or any(given.get(k, v) != v for k, v in fixed.items()):
                break  # the next queued trial has another structure: it starts the next stack
        study.sampler = optuna.samplers.PartialFixedSampler(fixed, base)
        try:
            mate = study.ask(sweep.space)
        finally:
            study.sampler = base
        for attr in OWNER_ATTRS:
            mate.set_user_attr(attr, first.user_attrs[attr])
        mate.set_user_attr("checkpoint_dir", str(out_dir / f"trial_{mate.number:04d}" / "checkpoints"))
        mate.set_user_attr("lab.stacked_with", first.number)
        mates.append(mate)
    if mates:
        first.set_user_attr("lab.stacked_with", first.number)
    return mates


def member(sweep, trial: optuna.Trial, parent: str | None, ended) -> stack_run.Member:
    """The trial as a stack member: its overrides, tags and run as objective.run_trial makes them, its pruning as
    objective.PruningCallback decides it (after each epoch, by its own metric)."""
    import math
    import shlex

    from lab import config
    from lab.sweep import objective
    from lab.train.module import Diverged

    overrides = objective.trial_overrides(sweep, trial)
    cfg = config.load(overrides)
    trial.set_user_attr("overrides", overrides)
    tags = {"trial.number": str(trial.number), "study": sweep.spec.study,
            "lab.command": "lab train " + shlex.join(sweep.replay_overrides(trial))}
    metric = sweep.spec.metric

    def on_run(client, run_id):
        trial.set_user_attr("mlflow_run_id", run_id)

    def on_epoch(epoch: int, metrics: dict[str, float]):
        if metric not in metrics:
            return
        value = metrics[metric]
        if not math.isfinite(value):
            raise Diverged(f"{metric} is {value} in epoch {epoch}")
        if len(trial.study.directions) > 1:
            return
        trial.report(value, step=epoch)
        if trial.should_prune():
            raise objective.Pruned(f"pruned in epoch {epoch} with {metric}={value:.6g}")

    out_dir = Path(trial.user_attrs["checkpoint_dir"]).parent
    m = stack_run.Member(cfg, out_dir, run_name=f"trial-{trial.number}", parent_run_id=parent, tags=tags,
                         on_run=on_run, on_epoch=on_epoch, require=metric, keep_last=True)
    m.on_end = lambda outcome: ended(trial, outcome)
    return m


def resume(sweep, trial: optuna.Trial, parent: str | None, path: str):
    """A retried member (its worker died) continuing from the last.ckpt its earlier attempt wrote
    (stack_resume.py), as a stack of one through the stacked loop; returns its score as objective.run_trial does.
    Its run logs the epochs from there on (tags lab.resume, lab.resumed_from)."""
    from lab.sweep import objective, scores

    outcomes = []
    m = member(sweep, trial, parent, lambda _trial, outcome: outcomes.append(outcome))
    m.resume_from = path
    m.tags["lab.resumed_from"] = path
    liveness.training(True)
    stack_run.run([m], (objective.Progress(),), pulse=liveness.progressed, what=f"trial {trial.number}",
                  tested=lambda: liveness.training(False))
    (outcome,) = outcomes
    if isinstance(outcome, objective.Pruned):
        raise optuna.TrialPruned(str(outcome)) from outcome
    if isinstance(outcome, BaseException):
        raise outcome
    return scores.score(sweep.spec, trial, outcome)


def run_stack(sweep, study: optuna.Study, trials: list[optuna.Trial], parent: str, uri: str, run_one) -> str:
    """Train the trials as one stack and tell each as soon as it ends (worker.run_one, with the outcome the stack
    gave it: a value, TrialPruned, or the failure), so that pruning, failure reasons, MLflow tags and the live
    view's counts are a lone trial's. An interrupt queues every trial not yet told again, as run_one does."""
    import contextlib
    import json

    from lab.errors import Interrupted
    from lab.sweep import budget, objective, records, scores
    from lab.sweep.worker import describe, heartbeat

    told: dict[int, str] = {}

    def ended(trial, outcome):
        def replay(*_):
            if isinstance(outcome, objective.Pruned):
                raise optuna.TrialPruned(str(outcome)) from outcome
            if isinstance(outcome, BaseException):
                raise outcome
            return scores.score(sweep.spec, trial, outcome)

        told[trial.number] = run_one(sweep, study, trial, parent, uri, replay)

    members = []
    try:
        with contextlib.ExitStack() as beats:
            for t in trials:
                beats.enter_context(heartbeat(study, t))  # RDB storage: no member looks stale while others train
            members = [member(sweep, t, parent, ended) for t in trials]
            liveness.training(True)
            line = stack_run.run(members, (objective.Progress(),), pulse=liveness.progressed,
                                 what=f"trials ({', '.join(str(t.number) for t in trials)})",
                                 tested=lambda: liveness.training(False))
            if line:
                REFUSED[json.dumps(structural(sweep, trials[0].params), sort_keys=True, default=str)] = line
    except Interrupted as stop:
        reason = f"interrupted by {describe(stop)}"
        for t in trials:
            frozen = budget.stored(study, t)
            if t.number not in told and frozen.state.name == "RUNNING":
                budget.retry(study, frozen, reason)
                records.tag_run(uri, t, "INTERRUPTED", reason)
                records.end_if_running(uri, t, "KILLED")
        raise
    except Exception as err:  # noqa: BLE001 - the stack as a whole failed (data, memory): each trial fails with it
        for t in trials:
            if t.number not in told:
                ended(t, err)
    return ", ".join(f"{n} {s}" for n, s in sorted(told.items()))


AUTO_CPU_TRY = 8  # stack size the CPU probe times against one member
AUTO_PAYS = 1.5  # per-member speed-up at which stacking counts as paying on a CPU
AUTO_GPU_MAX = 32


def auto_size(sweep, first: optuna.Trial) -> int:
    """`stack: auto`. On a GPU: as many members as half the free memory holds, by one member's measured peak
    (parameters, gradients, optimizer state, activations at the batch size), at most AUTO_GPU_MAX. On a CPU: 1,
    unless timing a few steps of AUTO_CPU_TRY members against one shows stacking pays (>= AUTO_PAYS per member)."""
    import time

    import torch

    from lab import config
    from lab.sweep import objective

    cfg = config.load(objective.trial_overrides(sweep, first))
    k = AUTO_CPU_TRY
    reason, built = stack_run.why_not([stack_run.Member(cfg, Path(".")) for _ in range(k)])
    if reason:
        log.info("stack: auto -> 1 (%s)", reason)
        return 1
    big, datamodule = built
    device = big.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        batch = next(big.epoch_batches(1))
        if device.type == "cuda":
            one = stack_run.why_not([stack_run.Member(cfg, Path("."))], datamodule)[1][0]
            torch.cuda.synchronize()
            start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            one.train_step(batch[0][:1], batch[1][:1])
            torch.cuda.synchronize()
            per = max(1, torch.cuda.max_memory_allocated() - start)
            free, _ = torch.cuda.mem_get_info()
            n = max(1, min(AUTO_GPU_MAX, int(free * 0.5 // per)))
            log.info("stack: auto -> %d (one member's step peaks at %.1f MB; %.1f GB free)", n, per / 2**20, free / 2**30)
            return n
        one = stack_run.why_not([stack_run.Member(cfg, Path("."))], datamodule)[1][0]

        def timed(s, x, y) -> float:
            s.train_step(x, y)  # warm-up
            start = time.perf_counter()
            for _ in range(3):
                s.train_step(x, y)
            return (time.perf_counter() - start) / 3

        t_one = timed(one, batch[0][:1], batch[1][:1])
        t_big = timed(big, *batch)
    gain = t_one * k / t_big
    n = k if gain >= AUTO_PAYS else 1
    log.info("stack: auto -> %d (%d members per step: %.2fx the members per second of one)", n, k, gain)
    return n
