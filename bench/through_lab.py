"""lab's own training path, lab.train.run(cfg, out_dir), timed from inside by a Lightning callback."""
import logging
from pathlib import Path

import pytorch_lightning as pl

from lab import config
from lab.cli import quiet_libraries
from lab.train import job
from plain import clock, since


class EpochTimer(pl.Callback):
    """Per fit epoch, wall and CPU seconds (plain.clock) of: the whole epoch from on_train_epoch_start to
    on_train_epoch_end (total), the validation loop inside it (val), total - val (train), and the gap until the
    next epoch starts (gap: ModelCheckpoint saves and the epoch's metrics go to MLflow after our
    on_train_epoch_end, since Lightning runs checkpoint callbacks last)."""

    def __init__(self):
        self.epochs: list[dict] = []

    def _clock(self, trainer) -> tuple[float, float]:
        return clock(trainer.strategy.root_device)

    @staticmethod
    def _in_fit(trainer) -> bool:  # during fit's validation trainer.training is False; state.fn says "fit"
        return trainer.state.fn == "fit" and not trainer.sanity_checking

    def on_train_epoch_start(self, trainer, pl_module):
        now = self._clock(trainer)
        if self.epochs:
            last = self.epochs[-1]
            last["gap"] = {"wall": now[0] - last["end"][0], "cpu": now[1] - last["end"][1]}
        self.cur = {"images": 0, "start": now, "val": {"wall": 0.0, "cpu": 0.0}}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.cur["images"] += len(batch[1])

    def on_validation_start(self, trainer, pl_module):
        if self._in_fit(trainer):
            self.cur["val_start"] = self._clock(trainer)

    def on_validation_end(self, trainer, pl_module):
        if self._in_fit(trainer):
            took = since(self.cur.pop("val_start"), trainer.strategy.root_device)
            self.cur["val"] = {k: self.cur["val"][k] + took[k] for k in took}

    def on_train_epoch_end(self, trainer, pl_module):
        cur = self.cur
        cur["end"] = self._clock(trainer)
        cur["total"] = {"wall": cur["end"][0] - cur["start"][0], "cpu": cur["end"][1] - cur["start"][1]}
        cur["train"] = {k: cur["total"][k] - cur["val"][k] for k in ("wall", "cpu")}
        self.epochs.append({k: v for k, v in cur.items() if k != "start"})


def quiet() -> None:
    quiet_libraries()
    for name in ("pytorch_lightning", "lightning", "lightning_fabric", "lab"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run(overrides: list[str], tmp: Path, name: str, extra_callbacks: tuple = ()) -> list[dict]:
    """One lab training run into a throwaway MLflow DB; returns EpochTimer's per-epoch records."""
    cfg = config.load([*overrides, f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", "mlflow.experiment=bench",
                       "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"])
    timer = EpochTimer()
    job.run(cfg, tmp / "lab_runs" / name, callbacks=(timer, *extra_callbacks), run_name=name)
    for epoch in timer.epochs:
        epoch.pop("end")
    return timer.epochs
