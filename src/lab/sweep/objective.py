"""One trial: Optuna's sampled params -> Hydra overrides -> train.run with a pruning callback -> value."""
import math
import shlex
import statistics
from pathlib import Path

import optuna
import pytorch_lightning as pl

from lab import config
from lab.data import decode
from lab.errors import StopRun
from lab.sweep import liveness, scores, seeds, trial_record
from lab.sweep.budget import RESUME_FROM, RETRY_OF
from lab.sweep.spec import Sweep
from lab.train import job, stack_resume, tracking
from lab.train.module import Diverged


class Pruned(StopRun):
    pass


class PruningCallback(pl.Callback):
    """Reports the sweep metric after every validation; a non-finite value fails the trial as diverged."""

    def __init__(self, trial: optuna.Trial, metric: str):
        self.trial, self.metric = trial, metric

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.metric not in trainer.callback_metrics:
            return  # test/* metrics exist only at the end
        value, epoch = float(trainer.callback_metrics[self.metric]), trainer.current_epoch
        if not math.isfinite(value):
            raise Diverged(f"{self.metric} is {value} in epoch {epoch}")
        if len(self.trial.study.directions) > 1:
            return  # Optuna keeps no intermediate values with several objectives: objectives.py refuses pruners there
        self.trial.report(value, step=epoch)
        if self.trial.should_prune():
            raise Pruned(f"pruned in epoch {epoch} with {self.metric}={value:.6g}")


class Progress(pl.Callback):
    """Tells the worker's pulse (liveness.py) that batches go through: a trial that gets through none for the
    grace period is hung, and the sweep's parent kills its worker."""

    def _progressed(self, *_):
        liveness.progressed()

    def on_fit_start(self, trainer, pl_module):
        liveness.training(True)

    def on_test_end(self, trainer, pl_module):
        liveness.training(False)

    def on_exception(self, trainer, pl_module, exception):
        liveness.training(False)

    on_train_batch_end = on_validation_batch_end = on_test_batch_end = _progressed
    on_train_epoch_start = on_validation_epoch_start = on_test_epoch_start = _progressed


def _decoding(event: str) -> None:
    """A folder being decoded must get through files, as training must get through batches."""
    if event == "start":
        liveness.training(True)
    elif event == "image":
        liveness.progressed()
    else:
        liveness.training(False)


decode.listeners.append(_decoding)


def trial_overrides(sweep: Sweep, trial: optuna.Trial) -> list[str]:
    # Workers are quiet: no progress bar or model summary per trial; the sweep's live view reports.
    # log_models: best: no trial logs its model (minutes and gigabytes for big nets); `lab best` logs the winner's.
    quiet = ["mlflow.log_model=false"] if sweep.spec.log_models == "best" else []
    return [*sweep.replay_overrides(trial), f"mlflow.experiment={sweep.mlflow_experiment}",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", *quiet]


def run_trial(sweep: Sweep, trial: optuna.Trial, parent_run_id: str | None) -> float:
    overrides = trial_overrides(sweep, trial)
    cfg = config.load(overrides)
    trial.set_user_attr("overrides", overrides)
    tags = {**trial_record.run_tags(trial), "study": sweep.spec.study,
            "lab.command": "lab train " + shlex.join(sweep.replay_overrides(trial))}

    def record_run(client, run_id):
        trial_record.link(trial, run_id)

    resume_from = trial.user_attrs.get(RESUME_FROM)  # set when this trial repeats one that was cut off
    if sweep.spec.seeds > 1:
        return run_seeded(sweep, trial, parent_run_id, cfg, tags, resume_from)
    if resume_from and stack_resume.read(resume_from) is not None:  # a stacked member's last.ckpt
        from lab.sweep import stacking

        return stacking.resume(sweep, trial, parent_run_id, resume_from)
    if resume_from:
        tags["lab.resumed_from"] = resume_from
    try:
        metrics = job.run(cfg, Path(trial.user_attrs["checkpoint_dir"]).parent,
                            (PruningCallback(trial, sweep.spec.metric), Progress()), parent_run_id=parent_run_id,
                            run_name=f"trial-{trial.number}", tags=tags, on_run=record_run, resume_from=resume_from,
                            require=sweep.spec.metric)  # missing or non-finite: the run ends FAILED, as the trial
    except Pruned as pruned:
        raise optuna.TrialPruned(str(pruned)) from pruned
    return scores.score(sweep.spec, trial, metrics)  # a tuple with several objectives; constraints set on the trial


def run_seeded(sweep: Sweep, trial: optuna.Trial, parent_run_id: str | None, cfg, tags: dict[str, str],
               resume_from: str | None) -> float:
    """seeds: K. The trial's run (`trial-N`, under the sweep's) trains nothing: its K child runs
    `trial-N-seed-S` do, one after the other, each in trial_NNNN/seed_S. It logs the aggregate as the sweep
    metric, with <metric>/mean, <metric>/std and the seeds' mean test/acc and test/f1_macro.

    Pruner wilcoxon: each seed's value is reported with step = its index, and after each seed but the last
    the pruner may stop the trial. Optuna's advice for this pruner is followed: the trial then returns the
    aggregate of the seeds it ran (COMPLETE), not TrialPruned, so that every sampler learns from the value
    (TPE ranks a PRUNED trial by its last step alone, here one seed; CMA-ES and GP skip PRUNED trials)."""
    metric, k = sweep.spec.metric, sweep.spec.seeds
    maximize = sweep.spec.direction == "maximize"
    trial_dir = Path(trial.user_attrs["checkpoint_dir"]).parent
    values, runs = seeds.carried(trial, trial.user_attrs.get(RETRY_OF))
    for i, value in enumerate(values):  # the retried trial's finished seeds, for the pruner's comparison
        trial.report(value, step=i)
    wilcoxon = sweep.spec.pruner.get("name") == "wilcoxon"
    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri)
    run_tags = {**tags, "lab.seeds": str(k)}
    if values:
        run_tags["lab.seeds_carried"] = str(len(values))
    with tracking.run(uri, cfg.mlflow.experiment, f"trial-{trial.number}", parent_run_id, run_tags) as (client, run_id):
        trial_record.link(trial, run_id)
        tracking.log_config(client, run_id, cfg)  # the trial's params, comparable across trials in MLflow's table
        per_seed = [client.get_run(rid).data.metrics for rid in runs.values()]  # carried seeds, as logged
        from lab.sweep import stacking  # the seeds left, as one stack

        if stacking.stacks_seeds(sweep.spec) and k - len(values) > 1:
            stacking.seeds_together(trial, cfg, tags, run_id, trial_dir, len(values), k, metric, per_seed, runs,
                                    values, (Progress(),))
        for i in range(len(values), k):
            seed = int(cfg.seed) + i
            seed_cfg = cfg.copy()
            seed_cfg.seed = seed
            seed_dir = trial_dir / f"seed_{seed}"
            # A retry (worker died) resumes this seed from its own last.ckpt, found through checkpoint_dir.
            trial.set_user_attr("checkpoint_dir", str(seed_dir / "checkpoints"))
            resume = resume_from if resume_from and Path(resume_from).parent.parent.name == seed_dir.name else None
            seed_tags = {**tags, "lab.seed_index": str(i), "lab.command": f"{tags['lab.command']} seed={seed}"}
            if resume:
                seed_tags["lab.resumed_from"] = resume
            seed_run: list[str] = []
            metrics = job.run(seed_cfg, seed_dir, (Progress(),), parent_run_id=run_id,
                              run_name=f"trial-{trial.number}-seed-{seed}", tags=seed_tags,
                              on_run=lambda _client, rid, seed_run=seed_run: seed_run.append(rid), resume_from=resume,
                              require=metric)
            per_seed.append(metrics)
            runs[str(seed)] = seed_run[0]
            values.append(metrics[metric])
            trial.set_user_attr(seeds.RUNS, runs)  # runs first: a retry carries a seed once both are written
            trial.set_user_attr(seeds.VALUES, values)
            trial.report(metrics[metric], step=i)
            if wilcoxon and i < k - 1 and trial.should_prune():
                trial.set_user_attr(seeds.PRUNED, i + 1)
                client.set_tag(run_id, "lab.seeds_pruned", f"after {i + 1} of {k} seeds: clearly worse than the best "
                               "trial (Wilcoxon signed-rank test)")
                # Visible in MLflow's runs table, as a pruned trial's "(pruned)" is.
                client.update_run(run_id, name=f"trial-{trial.number} (stopped after {i + 1} seeds)")
                break
        value = seeds.aggregate(values, sweep.spec.aggregate, maximize)
        best_seed = (max if maximize else min)(range(len(values)), key=lambda j: values[j])
        trial.set_user_attr(seeds.MODEL_RUN, list(runs.values())[best_seed])
        # Every other metric as its mean over the seeds (constraints read them too), the sweep metric aggregated.
        means = {key: statistics.fmean(m[key] for m in per_seed) for key in per_seed[0]
                 if all(key in m for m in per_seed)}
        logged = {metric: value, f"{metric}/mean": statistics.fmean(values), f"{metric}/std": seeds.std(values),
                  **{key: means[key] for key in ("test/acc", "test/f1_macro", *sweep.spec.constraints)
                     if key in means and key != metric}}
        for key, v in logged.items():
            client.log_metric(run_id, key, v, step=len(values))
        return scores.score(sweep.spec, trial, {**means, metric: value})
