"""One training run: config -> datamodule + model -> Trainer -> fit, test -> MLflow. The only instantiate() calls.

run() is what `lab train` and every sweep trial execute, so a trial replays as a plain `lab train`.
"""
import logging
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import MLFlowLogger

from lab import tracking
from lab.checkpoints import LastCheckpoint

log = logging.getLogger(__name__)


class EpochMLFlowLogger(MLFlowLogger):
    """Lightning's MLflow logger writing into a run tracking.run owns: step = epoch, and no status changes.

    Lightning's own finalize() would mark the run FINISHED after fit even if testing then crashes.
    """

    def log_metrics(self, metrics, step=None):
        epoch = metrics.pop("epoch", None)
        super().log_metrics(metrics, step=int(epoch) if epoch is not None else step)

    def finalize(self, status: str = "success") -> None:
        pass


def trainer_kwargs(cfg: DictConfig) -> dict:
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if kwargs.get("precision") == "auto":
        # bf16 autocast on GPUs that have it (tensor cores, half the memory traffic); full fp32 on CPUs.
        kwargs["precision"] = "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    return kwargs


def set_threads() -> None:
    """$LAB_TORCH_THREADS: the sweep pool splits the cores among workers instead of oversubscribing them;
    a replay with the same value computes the same sums in the same order."""
    threads = int(os.environ.get("LAB_TORCH_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)


def build(cfg: DictConfig):
    """Data first: the model's input shape, class count and class names come from the data."""
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    model = instantiate(
        cfg.model,
        net={"in_shape": list(datamodule.shape), "num_classes": datamodule.num_classes},
        class_names=datamodule.class_names,
    )
    return datamodule, model


def run(cfg: DictConfig, out_dir: str | Path, callbacks: tuple[Callback, ...] = (), parent_run_id: str | None = None,
        run_name: str | None = None, tags: dict[str, str] | None = None, on_run=None,
        resume_from: str | None = None) -> dict[str, float]:
    """Train and test; returns the last epoch's train/val metrics and the test metrics, as floats.

    on_run(client, run_id) is called once the MLflow run exists (sweeps record the run id on the trial);
    resume_from: a Lightning checkpoint to continue from (epoch, weights, optimizer state).
    """
    set_threads()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, model = build(cfg)
    out_dir = Path(out_dir)
    last = LastCheckpoint(out_dir / "checkpoints", cfg.checkpoint.last_every_s)  # checks its setting before a run exists
    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri)
    run_tags = {"seed": str(cfg.seed), "data": datamodule.name, "model": type(model.net).__name__, **(tags or {})}
    with tracking.run(uri, cfg.mlflow.experiment, run_name, parent_run_id, run_tags) as (client, run_id):
        if on_run is not None:
            on_run(client, run_id)
        tracking.log_config(client, run_id, cfg)
        skipped = getattr(datamodule, "skipped", [])
        if skipped:
            client.log_text(run_id, "\n".join(skipped) + "\n", "skipped_images.txt")
        logger = EpochMLFlowLogger(experiment_name=cfg.mlflow.experiment, tracking_uri=uri, run_id=run_id)
        # The best epoch is only ever tested or loaded for use, never resumed (last.ckpt is): weights only,
        # a third of the bytes with Adam's two moments per parameter left out.
        checkpoint = ModelCheckpoint(dirpath=out_dir / "checkpoints", monitor=cfg.monitor.metric,
                                     mode=cfg.monitor.mode, save_weights_only=True)
        all_callbacks = [checkpoint, last, *callbacks, *(instantiate(c) for c in cfg.get("callbacks", {}).values())]
        if cfg.early_stopping.patience:
            all_callbacks.append(EarlyStopping(cfg.monitor.metric, mode=cfg.monitor.mode,
                                               patience=cfg.early_stopping.patience))
        trainer = pl.Trainer(**trainer_kwargs(cfg), logger=logger, callbacks=all_callbacks,
                             default_root_dir=str(out_dir))
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
        if trainer.interrupted:  # Lightning swallowed a SIGTERM/Ctrl-C and returned normally
            raise KeyboardInterrupt("training was interrupted")
        results = {k: float(v) for k, v in trainer.callback_metrics.items()}
        best = checkpoint.best_model_path or None
        test = trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)[0]
        results.update({k: float(v) for k, v in test.items()})
        tracking.log_test_report(client, run_id, model.test_report, step=trainer.current_epoch)
        if best:
            client.set_tag(run_id, "checkpoint", best)
        results.update({f"test/f1/{k}": v["f1"] for k, v in model.test_report["classes"].items()})
    log.info("run %s: %s", run_id, {k: round(v, 4) for k, v in results.items() if "/f1/" not in k})
    return results

