"""One trial: Optuna's sampled params -> Hydra overrides -> train.run with a pruning callback -> value."""
import math
import shlex
from pathlib import Path

import optuna
import pytorch_lightning as pl

from lab import config
from lab.errors import StopRun
from lab.sweep import liveness
from lab.sweep.spec import Sweep
from lab.sweep.study import RESUME_FROM
from lab.train import job
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


def trial_overrides(sweep: Sweep, trial: optuna.Trial) -> list[str]:
    # Workers are quiet: no progress bar or model summary per trial; the sweep's live view reports.
    return [*sweep.replay_overrides(trial), f"mlflow.experiment={sweep.mlflow_experiment}",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def run_trial(sweep: Sweep, trial: optuna.Trial, parent_run_id: str | None) -> float:
    overrides = trial_overrides(sweep, trial)
    cfg = config.load(overrides)
    trial.set_user_attr("overrides", overrides)
    tags = {"trial.number": str(trial.number), "study": sweep.spec.study,
            "lab.command": "lab train " + shlex.join(sweep.replay_overrides(trial))}

    def record_run(client, run_id):
        trial.set_user_attr("mlflow_run_id", run_id)

    resume_from = trial.user_attrs.get(RESUME_FROM)  # set when this trial repeats one that was cut off
    if resume_from:
        tags["lab.resumed_from"] = resume_from
    try:
        metrics = job.run(cfg, Path(trial.user_attrs["checkpoint_dir"]).parent,
                            (PruningCallback(trial, sweep.spec.metric), Progress()), parent_run_id=parent_run_id,
                            run_name=f"trial-{trial.number}", tags=tags, on_run=record_run, resume_from=resume_from,
                            require=sweep.spec.metric)  # missing or non-finite: the run ends FAILED, as the trial
    except Pruned as pruned:
        raise optuna.TrialPruned(str(pruned)) from pruned
    return metrics[sweep.spec.metric]
