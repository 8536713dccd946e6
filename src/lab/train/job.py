"""One training run: config -> datamodule + model -> Trainer -> fit, test -> MLflow. The only instantiate() calls.

run() is what `lab train` and every sweep trial execute, so a trial replays as a plain `lab train`.
"""
import importlib
import inspect
import logging
import math
import re
import time
import types
import typing
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from mlflow.entities import Metric
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.plugins.environments import LightningEnvironment

from lab import settings
from lab.data.folder import ImageFolder
from lab.errors import LabError, unknown_key
from lab.train import checkpoints, exported, measure, memory, misclassified, rules, tracking
from lab.train.checkpoints import LastCheckpoint
from lab.train.module import Diverged, call_factory

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
    # One process per run: inside a SLURM job (a `lab sweep --launcher slurm` task, an sbatch script) Lightning
    # would otherwise take the job's rank variables for its own and install its SIGUSR1 requeue handler, and on
    # any host with SLURM installed it hints about srun on every run.
    kwargs.setdefault("plugins", [LightningEnvironment()])
    return kwargs


# -- the config checked before any MLflow run exists ------------------------------------------------------
# A bad value used to surface as a torch or Lightning traceback mid-fit, with a FAILED run left behind.
# rules.RULES holds the values lab knows more about than a signature says; the rest is read from signatures.

TRAINER_SET_BY_LAB = ("logger", "callbacks", "default_root_dir")


def target_params(target) -> dict[str, inspect.Parameter] | None:
    """The keyword arguments a class or function accepts, following **kwargs up a class's bases;
    None when it takes any keyword (or its signature cannot be read)."""
    chain = [c for c in target.__mro__ if "__init__" in vars(c)] if isinstance(target, type) else [target]
    params: dict[str, inspect.Parameter] = {}
    for obj in chain:
        if obj is object:
            return None
        fn = obj.__init__ if isinstance(target, type) else obj
        try:
            sig = inspect.signature(fn, eval_str=True)
        except Exception:  # noqa: BLE001 - an annotation that does not evaluate: keep the names only
            try:
                sig = inspect.signature(fn)
            except (TypeError, ValueError):
                return None
        takes_any = False
        for name, p in sig.parameters.items():
            if p.kind is p.VAR_KEYWORD:
                takes_any = True
            elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name != "self":
                params.setdefault(name, p)
        if not takes_any:
            return params
    return None


def _numbers(p: inspect.Parameter) -> set[type] | None:
    """The types a parameter admits when they are all numbers ({int}, {int, float}, {int, bool}...), else None.
    No annotation: a number default admits any number."""
    ann = p.annotation
    if ann is inspect.Parameter.empty:
        return {int, float} if rules.number(p.default) else None
    members = set(typing.get_args(ann)) if typing.get_origin(ann) in (typing.Union, types.UnionType) else {ann}
    members.discard(type(None))
    return members if members and members <= {int, float, bool} else None


def _check_value(key: str, value, p: inspect.Parameter) -> None:
    kinds = _numbers(p)
    if kinds is None or value is None or type(value) in kinds or (float in kinds and rules.whole(value)):
        return
    what = "a whole number" if kinds == {int} else "a number"
    raise LabError(f"{key}={value!r} is not valid: it must be {what}.")


def accepted_keys(cfg: DictConfig, path: str) -> tuple[dict[str, inspect.Parameter] | None, str]:
    """What the object built from the config node at path accepts, and its name for messages:
    Lightning's Trainer for `trainer`, the _target_ of a node that has one; (None, '') otherwise."""
    if path == "trainer":
        params = {k: v for k, v in target_params(pl.Trainer).items() if k not in TRAINER_SET_BY_LAB}
        return params, "Lightning's Trainer"
    node = OmegaConf.select(cfg, path) if path else cfg
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return None, ""
    target_path = str(node._target_)
    return target_params(locate(f"{path}._target_", target_path)), target_path


def locate(key: str, dotted: str):
    """The class or function a _target_ names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name is not None and not module.startswith(err.name):
                raise  # the module exists but one of its own imports is missing: not the user's typo
            continue
        for j, attr in enumerate(parts[i:], start=i):
            if not hasattr(obj, attr):
                raise LabError(f"{key}={dotted} is not valid: {'.'.join(parts[:j])} has no {attr!r}.")
            obj = getattr(obj, attr)
        return obj
    raise LabError(f"{key}={dotted} is not valid: there is no module {parts[0]!r}.")


def _check_leaf(key: str, value, param: inspect.Parameter | None) -> None:
    """RULES for the keys that have one, else the type the argument it feeds admits."""
    if key in rules.RULES:
        rules.check_leaf(key, value)
    elif param is not None:
        _check_value(key, value, param)


def _check_node(cfg: DictConfig, node: DictConfig, path: str) -> None:
    params, name = accepted_keys(cfg, path)
    if params is not None:  # lab passes the required ones it does not take from the config (params, in_shape...)
        params = {k: p for k, p in params.items() if p.default is not p.empty or k in node}
    for key in node.keys():
        key = str(key)
        full = f"{path}.{key}" if path else key
        if key.startswith("_") and key.endswith("_") or OmegaConf.is_missing(node, key):
            continue
        if path == "trainer" and key in TRAINER_SET_BY_LAB:
            raise LabError(f"{full} is not valid: lab sets the Trainer's {key} itself; remove the override.")
        if params is not None and key not in params:
            raise unknown_key(full, params, name)
        value = node[key]
        _check_leaf(full, value, params[key] if params is not None else None)
        if isinstance(value, DictConfig):
            _check_node(cfg, value, full)


def check_config(cfg: DictConfig) -> None:
    """Every key of trainer and of each _target_ node is an argument of what it builds, numbers are numbers,
    RULES hold, and the optimizer and scheduler accept their settings: all before any MLflow run exists."""
    for key in ("seed", "trainer"):
        if key not in cfg:
            raise LabError(f"{key} is missing from the config: conf/train.yaml sets it.")
    _check_node(cfg, cfg, "")
    optimizer_cfg = cfg.get("model", {}).get("optimizer")
    if optimizer_cfg is not None:  # torch checks the rest (betas, eps, ...) when it builds one
        dummy = [torch.nn.Parameter(torch.zeros(1))]
        optimizer = call_factory(instantiate(optimizer_cfg), dummy, "model.optimizer")
        if cfg.model.get("scheduler") is not None:
            call_factory(instantiate(cfg.model.scheduler), optimizer, "model.scheduler")


def check_values(cfg: DictConfig, key: str, values) -> None:
    """Each key=value checked as check_config would check it inside cfg, without composing cfg again for each:
    a sweep's categorical may list thousands of values."""
    parent, _, leaf = key.rpartition(".")
    params, _ = accepted_keys(cfg, parent)
    current = OmegaConf.select(cfg, key, default=None)
    for value in values:
        _check_leaf(key, value, (params or {}).get(leaf))
        if rules.number(current) and not rules.number(value) and value is not None:
            raise LabError(f"{key}={value!r} is not valid: it is a number in the config ({current!r}).")


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


def after_test(cfg: DictConfig, client, run_id: str, uri: str, trainer: pl.Trainer, datamodule, model,
               step: int, costs: dict[str, float] | None = None) -> dict[str, float]:
    """What a run records once its tested weights are in the model: misclassified test images, cost metrics
    (returned), the MLflow model. costs: measured already on a net of the same structure (a stack's members
    share one measurement: flops, latency and throughput depend on the shapes, not the weights)."""
    test = datamodule.splits["test"]
    misclassified.log(client, run_id, model.test_samples, test, datamodule.class_names, test.paths,
                      int(cfg.mlflow.get("misclassified_per_class", 8)))
    spec = cfg.get("measure") or {}
    if costs is None and spec.get("enabled", True):
        device = trainer.strategy.root_device  # the trial's device, where Lightning's teardown took it from
        model.net.to(device)
        try:
            costs = measure.cost(model.net, tuple(datamodule.shape), int(spec.get("batch_size") or datamodule.batch_size),
                                 float(spec.get("budget_s", 0.3)), bf16="bf16" in str(trainer.precision))
        finally:
            model.net.to("cpu")
    costs = costs or {}
    if costs:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in costs.items() if k != "model/params"],
                         synchronous=True)
    if cfg.mlflow.get("log_model", True):
        try:
            exported.log(run_id, model, datamodule, uri, step=step)
        except Exception as err:  # noqa: BLE001 - a net MLflow cannot pickle must not fail a trained, tested run
            log.warning("the model of run %s was not logged: %s", run_id, err)
            client.set_tag(run_id, "lab.model_error", f"{type(err).__name__}: {err}"[:5000])
    return costs


def test_and_record(cfg: DictConfig, client, run_id: str, uri: str, trainer: pl.Trainer, datamodule, model,
                    best: str | None, weights: str, epoch: int, require: str | None, trained: dict[str, float],
                    costs: dict[str, float] | None = None) -> dict[str, float]:
    """Test the weights `best` (None: the model's own) and record what a run records after training; returns
    the test, per-class and cost metrics. trained: the last epoch's metrics, which `require` may name. Shared by
    run() and the stacked runs (stack_run.py), whose members are tested as one-model runs."""
    client.set_tag(run_id, "lab.tested", weights)
    test = trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)[0]
    results = {k: float(v) for k, v in test.items()}
    tracking.log_test_report(client, run_id, model.test_report, step=epoch)
    if best:
        client.set_tag(run_id, "checkpoint", best)
    results.update({f"test/f1/{k}": v["f1"] for k, v in model.test_report["classes"].items()})
    best_at = best_epoch(best)
    if best_at is not None:
        client.set_tag(run_id, "lab.best_epoch", str(best_at))  # what `lab train`'s summary prints
        client.set_tag(run_id, "lab.monitor", str(cfg.monitor.metric))
    results["model/params"] = float(sum(p.numel() for p in model.net.parameters()))
    results.update(after_test(cfg, client, run_id, uri, trainer, datamodule, model, epoch, costs))
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
    check_config(cfg)
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

