"""One training run: config -> datamodule + model -> Trainer -> fit, test -> MLflow. The only instantiate() calls.

run() is what `lab train` and every sweep trial execute, so a trial replays as a plain `lab train`.
"""
import logging
import math
import re
import typing
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.plugins.environments import LightningEnvironment

from lab import config_schema, settings
from lab.data.folder import ImageFolder
from lab.errors import LabError
from lab.train import checkpoints, exported, measure, memory, misclassified, precision, tracking
from lab.train.checkpoints import LastCheckpoint
from lab.train.module import Diverged

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
    # "auto": what this GPU's tensor cores compute natively (bf16, fp16 with a loss scaler, or fp32); fp32 on CPUs.
    kwargs["precision"] = precision.resolve(kwargs.get("precision", "auto"), kwargs.get("accelerator", "auto"))
    # One process per run: inside a SLURM job (a `lab sweep --launcher slurm` task, an sbatch script) Lightning
    # would otherwise take the job's rank variables for its own and install its SIGUSR1 requeue handler, and on
    # any host with SLURM installed it hints about srun on every run.
    kwargs.setdefault("plugins", [LightningEnvironment()])
    return kwargs


def set_threads(cfg: DictConfig) -> None:
    """cfg.threads, else $LAB_TORCH_THREADS: sweep workers split the cores instead of oversubscribing them
    and record their count in each trial's overrides; a replay with the same count sums in the same order."""
    threads = int(cfg.get("threads") or 0) or settings.get("LAB_TORCH_THREADS")
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


def data_name(datamodule) -> str:
    """digits, fashionmnist; an image folder by its folder's name (flower_photos)."""
    name = datamodule.root.name if isinstance(datamodule, ImageFolder) else datamodule.name
    return re.sub(r"[^\w.]+", "_", name.lower())


def run_name_prefix(cfg: DictConfig, datamodule, model) -> str:
    """`<data>-<model>` for a plain `lab train`'s run name: digits-mlp, flower_photos-efficientnet_b0."""
    net = cfg.model.get("net", {}).get("name") or type(model.net).__name__
    return data_name(datamodule) + "-" + re.sub(r"[^\w.]+", "_", str(net).lower())


def best_epoch(path: str | None) -> int | None:
    """Lightning's epoch (from 0) in a checkpoint name epoch=3-step=120.ckpt."""
    found = re.search(r"epoch=(\d+)", Path(path).name) if path else None
    return int(found.group(1)) if found else None


def costs_of(cfg: DictConfig, datamodule, model, device: torch.device, autocast: torch.dtype | None,
             costs: dict[str, float] | None = None) -> dict[str, float]:
    """The net's cost metrics (flops, latency, throughput) measured where it trained (device, autocast dtype), or costs
    when given: measured already on a net of the same structure (a stack's members share one measurement:
    they depend on the shapes, not the weights). {} when measure.enabled is false."""
    spec = cfg.get("measure") or {}
    if costs is None and spec.get("enabled", True):
        model.net.to(device)
        try:
            costs = measure.cost(model.net, tuple(datamodule.shape), int(spec.get("batch_size") or datamodule.batch_size),
                                 float(spec.get("budget_s", 0.3)), autocast=autocast)
        finally:
            model.net.to("cpu")
    return {k: v for k, v in (costs or {}).items() if k != "model/params"}


def test_and_record(cfg: DictConfig, client, run_id: str, uri: str, trainer: pl.Trainer, datamodule, model,
                    best: str | None, weights: str, epoch: int, require: str | None, trained: dict[str, float],
                    costs: dict[str, float] | None = None) -> dict[str, float]:
    """Test the weights `best` (None: the model's own) by Lightning and record what a run records after
    training (record()); returns the test, per-class and cost metrics. trained: the last epoch's metrics, which
    `require` may name."""
    client.set_tag(run_id, "lab.tested", weights)
    test = trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)[0]
    tested = Tested({k: float(v) for k, v in test.items()}, best, epoch, trainer.strategy.root_device,
                    precision.autocast_dtype(trainer.precision, trainer.strategy.root_device))
    return record(cfg, client, run_id, uri, datamodule, model, tested, require, trained, costs)


class Tested(typing.NamedTuple):
    """A finished test of a model: its test/* scalars, the checkpoint tested (None: the model's own weights),
    the step its report is logged at (epochs trained), the device and precision it ran on."""
    scalars: dict[str, float]
    best: str | None
    epoch: int
    device: torch.device
    autocast: torch.dtype | None  # what it computed in on a GPU (precision.autocast_dtype); None: fp32


def record(cfg: DictConfig, client, run_id: str, uri: str, datamodule, model, tested: Tested, require: str | None,
           trained: dict[str, float], costs: dict[str, float] | None = None, log_scalars: bool = False,
           tags: dict[str, str] | None = None) -> dict[str, float]:
    """What a run records once its model was tested (model.test_report and test_samples filled): the test
    report with the per-class, cost (costs_of) and tags in one MLflow batch, misclassified test images, the
    MLflow model; returns the test, per-class and cost metrics. log_scalars: the test/* scalars in that batch too
    (a test Lightning ran logged them itself). Shared by run() and the stacked runs (stack_run.py), whose members
    are tested by one vectorised pass."""
    results = dict(tested.scalars)
    tags = dict(tags or {})
    if tested.best:
        tags["checkpoint"] = tested.best
    best_at = best_epoch(tested.best)
    if best_at is not None:
        tags["lab.best_epoch"] = str(best_at)  # what `lab train`'s summary prints
        tags["lab.monitor"] = str(cfg.monitor.metric)
    measured, failed = {}, None
    try:
        measured = costs_of(cfg, datamodule, model, tested.device, tested.autocast, costs)
    except Exception as err:  # noqa: BLE001 - raised again below, once what was tested is recorded
        failed = err
    tracking.log_test_report(client, run_id, model.test_report, step=tested.epoch,
                             metrics={**(results if log_scalars else {}), **measured}, tags=tags)
    if failed is not None:
        raise failed
    results.update({f"test/f1/{k}": v["f1"] for k, v in model.test_report["classes"].items()})
    results["model/params"] = float(sum(p.numel() for p in model.net.parameters()))
    results.update(measured)
    test = datamodule.splits["test"]
    misclassified.log(client, run_id, model.test_samples, test, datamodule.class_names, test.paths,
                      int(cfg.mlflow.get("misclassified_per_class", 8)))
    if cfg.mlflow.get("log_model", True):
        try:
            exported.log(run_id, model, datamodule, uri, step=tested.epoch)
        except Exception as err:  # noqa: BLE001 - a net MLflow cannot pickle must not fail a trained, tested run
            log.warning("the model of run %s was not logged: %s", run_id, err)
            client.set_tag(run_id, "lab.model_error", f"{type(err).__name__}: {err}"[:5000])
    every = {**trained, **results}
    if require is not None and require not in every:
        raise LabError(f"metric {require!r} was not logged; logged: {sorted(every)}")
    if require is not None and not math.isfinite(every[require]):  # Optuna would store inf as COMPLETE
        raise Diverged(f"{require} is {every[require]}")
    return results


def run(cfg: DictConfig, out_dir: str | Path, callbacks: tuple[Callback, ...] = (), parent_run_id: str | None = None,
        run_name: str | None = None, tags: dict[str, str] | None = None, on_run=None,
        resume_from: str | None = None, require: str | None = None) -> dict[str, float]:
    """Train and test; returns the last epoch's train/val metrics and the test metrics, as floats.

    on_run(client, run_id) is called once the MLflow run exists (sweeps record the run id on the trial);
    resume_from: a Lightning checkpoint to continue from (epoch, weights, optimizer state); one that cannot be
    read starts the run afresh (tag lab.resume says which happened). require: a metric the run must produce,
    finite, or it ends FAILED (as the sweep's trial does).
    """
    config_schema.check_config(cfg)  # before any MLflow run exists: a bad value is one sentence
    set_threads(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    with memory.guard(cfg):  # before a run exists: said, nothing left FAILED
        datamodule, model = build(cfg)
    out_dir = Path(out_dir)
    last = LastCheckpoint(out_dir / "checkpoints", cfg.checkpoint.last_every_s)  # checks its setting before a run exists
    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri)
    run_tags = {"seed": str(cfg.seed), "data": datamodule.name, "model": type(model.net).__name__, **(tags or {})}
    if resume_from:
        resume_from, run_tags["lab.resume"] = checkpoints.resumable(resume_from)
    with tracking.run(uri, cfg.mlflow.experiment, run_name, parent_run_id, run_tags,
                      name_prefix=run_name_prefix(cfg, datamodule, model)) as (client, run_id), memory.guard(cfg):
        if on_run is not None:
            on_run(client, run_id)
        tracking.log_config(client, run_id, cfg)
        root = getattr(datamodule, "root", None)
        tracking.log_dataset(client, run_id, datamodule, data_name(datamodule),
                             str(Path(root).resolve()) if root is not None and Path(root).exists() else None)
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
        placed = datamodule.decide_placement(trainer.strategy.root_device)
        client.set_tag(run_id, "lab.data_placement", placed.name)  # resident or stream, and the sizes that chose it
        client.set_tag(run_id, "lab.data_placement_reason", placed.why)
        client.set_tag(run_id, "lab.precision", str(trainer.precision))  # what trainer.precision=auto became here
        log.info("data %s: %s", placed.name, placed.why)
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
        if trainer.interrupted:  # Lightning swallowed a SIGTERM/Ctrl-C and returned normally
            raise KeyboardInterrupt("training was interrupted")
        if resume_from and not any(k.startswith("val/") for k in trainer.callback_metrics):
            # The checkpoint was written after the last epoch (the worker died while testing): fit had nothing
            # left to do, so the last epoch's validation is run again from the restored weights.
            trainer.validate(model, datamodule=datamodule, verbose=False)
        results = {k: float(v) for k, v in trainer.callback_metrics.items()}
        best, weights = checkpoints.best_or_last(checkpoint.best_model_path)
        results.update(test_and_record(cfg, client, run_id, uri, trainer, datamodule, model, best, weights,
                                       trainer.current_epoch, require, results))
    log.info("run %s: %s", run_id, {k: round(v, 4) for k, v in results.items() if "/f1/" not in k})
    return results

