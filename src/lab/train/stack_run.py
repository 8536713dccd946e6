"""Members trained as one stack (stack.py), each recorded as its own run: the MLflow run `lab train` would make
(config, dataset, per-epoch metrics, best checkpoint, test report, confusion matrix, misclassified images,
costs, model), so that `lab best`, `lab predict` and a replay treat a member as any one-model run.

run(members) trains them together when the stack can (stack.static_reason, then a probe of vmap on one
batch), else one at a time through job.run, after ONE log line saying why. Each member ends on its own: its
on_epoch hook may raise a StopRun (pruned: it leaves the stack, the others go on), a diverged loss fails it
alone, and on_end(outcome) is called as soon as it is done (its metrics, or the exception it ended with).
An interrupt ends every open member run KILLED and is raised.
"""
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from mlflow.entities import Metric
from omegaconf import DictConfig

from lab import config_schema
from lab.train import job, memory, tracking
from lab.train.stack import CannotStack, Stack, build_members, static_reason

log = logging.getLogger(__name__)


@dataclass
class Member:
    """One run of the stack. on_run(client, run_id) once its run exists; on_epoch(epoch, metrics) after each
    validation (raise a StopRun to take it out); on_end(outcome) once it is done: its metrics dict, or the
    exception that ended it."""
    cfg: DictConfig
    out_dir: Path
    run_name: str | None = None
    parent_run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    on_run: Callable | None = None
    on_epoch: Callable | None = None
    on_end: Callable | None = None
    require: str | None = None
    outcome: Any = None  # set when it ends
    # Filled while it trains:
    client: Any = None
    run_id: str | None = None
    open_cm: Any = None  # its tracking.run context, entered while it trains
    best: tuple[float, str] | None = None  # (monitored value, checkpoint path)
    trained: dict[str, float] = field(default_factory=dict)  # its last epoch's metrics
    wait: int = 0  # epochs without improvement (early stopping)
    epochs: int = 0  # epochs trained (Lightning's current_epoch after fit: the step of its test report)
    pending: list = field(default_factory=list)  # MLflow's RunOperations of its epoch metrics, waited for at its end


class EpochHook(pl.Callback):
    """A member trained alone: its on_epoch hook after each validation, with the epoch's metrics."""

    def __init__(self, on_epoch: Callable):
        self.on_epoch = on_epoch

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.on_epoch(trainer.current_epoch, {k: float(v) for k, v in trainer.callback_metrics.items()})


def alone(members: list[Member], callbacks: tuple = ()) -> None:
    """One member after another, each a plain job.run."""
    for m in members:
        hooks = (EpochHook(m.on_epoch),) if m.on_epoch else ()
        try:
            m.outcome = job.run(m.cfg, m.out_dir, (*hooks, *callbacks), parent_run_id=m.parent_run_id,
                                run_name=m.run_name, tags=m.tags, on_run=m.on_run, require=m.require)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:  # noqa: BLE001 - this member's end; the next one trains
            m.outcome = err
        if m.on_end:
            m.on_end(m.outcome)


def why_not(members: list[Member], datamodule=None) -> tuple[str | None, Any]:
    """(None, (stack, datamodule)) when the members can train as one stack, else (the reason, None)."""
    cfgs = [m.cfg for m in members]
    reason = static_reason(cfgs)
    if reason:
        return reason, None
    for cfg in cfgs:
        config_schema.check_config(cfg)
    job.set_threads(cfgs[0])
    with memory.guard(cfgs[0]):
        if datamodule is None:
            datamodule = instantiate(cfgs[0].data)
            before = torch.get_rng_state()
            datamodule.setup("fit")
            if not torch.equal(before, torch.get_rng_state()):
                return f"{type(datamodule).__name__}.setup draws from the global RNG", None
        models, generators = build_members(cfgs, datamodule)
    device = device_of(cfgs[0])
    try:
        stack = Stack(cfgs, models, generators, datamodule, device)
        stack.probe()
    except CannotStack as err:
        return str(err), None
    return None, (stack, datamodule)


def device_of(cfg: DictConfig) -> torch.device:
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def run(members: list[Member], callbacks: tuple = (), pulse: Callable[[], None] | None = None,
        what: str = "members") -> str | None:
    """Train the members, together when they can; returns None, or the line saying why they trained alone.
    callbacks: Lightning callbacks for the runs trained alone and for testing; pulse(): after every batch."""
    if len(members) == 1:
        alone(members, callbacks)
        return None
    reason, built = why_not(members)
    if reason:
        line = f"{len(members)} {what} train one at a time, not as one stack: {reason}"
        log.warning(line)
        alone(members, callbacks)
        return line
    stack, datamodule = built
    log.info("%d %s train as one stack (vmap over %s)", len(members), what, type(stack.template).__name__)
    train(stack, datamodule, members, callbacks, pulse or (lambda: None))
    return None


def open_run(m: Member, datamodule, model, uri: str) -> None:
    m.open_cm = tracking.run(uri, m.cfg.mlflow.experiment, m.run_name, m.parent_run_id,
                         {"seed": str(m.cfg.seed), "data": datamodule.name, "model": type(model.net).__name__,
                          "lab.stacked": "true", **m.tags},
                         name_prefix=job.run_name_prefix(m.cfg, datamodule, model))
    m.client, m.run_id = m.open_cm.__enter__()
    if m.on_run is not None:
        m.on_run(m.client, m.run_id)
    tracking.log_config(m.client, m.run_id, m.cfg)
    root = getattr(datamodule, "root", None)
    tracking.log_dataset(m.client, m.run_id, datamodule, job.data_name(datamodule),
                         str(Path(root).resolve()) if root is not None and Path(root).exists() else None)
    placed = datamodule.placement
    if placed is not None:
        m.client.set_tag(m.run_id, "lab.data_placement", placed.name)
        m.client.set_tag(m.run_id, "lab.data_placement_reason", placed.why)
    n_params = float(sum(p.numel() for p in model.net.parameters()))
    m.client.log_batch(m.run_id, metrics=[Metric("model/params", n_params, int(time.time() * 1000), 0)],
                       synchronous=True)


def flush(m: Member) -> None:
    """Its epoch metrics written (before it is tested, or its run ends)."""
    pending, m.pending = m.pending, []
    for op in pending:
        op.wait()


def close_run(m: Member, err: BaseException | None) -> None:
    """End the member's run as tracking.run ends one: FINISHED, KILLED on an interrupt, FAILED on an error."""
    if not isinstance(err, (KeyboardInterrupt, SystemExit)):
        flush(m)
    cm, m.open_cm = m.open_cm, None
    if cm is None:
        return
    if err is None:
        cm.__exit__(None, None, None)
        return
    try:
        cm.__exit__(type(err), err, err.__traceback__)
    except BaseException as raised:  # tracking.run re-raises what it was given
        if raised is not err:
            raise


def end(m: Member, outcome) -> None:
    m.outcome = outcome
    close_run(m, outcome if isinstance(outcome, BaseException) else None)
    if m.on_end:
        m.on_end(outcome)


def better(cfg: DictConfig, value: float, best: float | None) -> bool:
    if best is None:
        return value == value  # not NaN
    return value > best if cfg.monitor.mode == "max" else value < best


def save_best(m: Member, model, epoch: int, step: int) -> str:
    """The member's best epoch as a weights-only checkpoint in Lightning's layout and name (epoch=E-step=S.ckpt,
    as ModelCheckpoint writes): trainer.test, `lab predict` and rebuild.rebuild load it as one model's."""
    folder = m.out_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"epoch={epoch}-step={step}.ckpt"
    state = {"epoch": epoch, "global_step": step, "pytorch-lightning_version": pl.__version__,
             "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    partial = path.with_name(f".{path.name}.partial")
    torch.save(state, partial)
    partial.replace(path)
    if m.best is not None and m.best[1] != str(path):
        Path(m.best[1]).unlink(missing_ok=True)
    return str(path)


def epoch_end(stack: Stack, m: Member, i: int, epoch: int, step: int, metrics: dict[str, float]) -> bool:
    """Log member i's epoch, keep its best checkpoint, ask its hook; False when it leaves the stack here."""
    now = int(time.time() * 1000)
    # Not waited for here: 8 members' synchronous writes cost 8 SQLite commits per epoch (~25-70 ms each on this
    # 2-core machine) on the training thread; MLflow's async queue writes them while the stack trains on.
    m.pending.append(m.client.log_batch(m.run_id, metrics=[Metric(k, v, now, epoch) for k, v in metrics.items()],
                                        synchronous=False))
    m.trained, m.epochs = dict(metrics), epoch + 1
    stack.check_finite(i, metrics, epoch)
    monitor = m.cfg.monitor.metric
    value = metrics.get(monitor)
    if value is not None and better(m.cfg, value, m.best[0] if m.best else None):
        m.best = (value, save_best(m, stack.models[i], epoch, step))
        m.wait = 0
    else:
        m.wait += 1
    if m.on_epoch:
        m.on_epoch(epoch, dict(metrics))
    patience = m.cfg.early_stopping.get("patience")
    return not (patience and m.wait >= int(patience))


def train(stack: Stack, datamodule, members: list[Member], callbacks: tuple, pulse: Callable[[], None]) -> None:
    cfg = members[0].cfg
    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri)
    datamodule.decide_placement(stack.device)
    open_ = []
    try:
        for i, m in enumerate(members):
            open_run(m, datamodule, stack.models[i], uri)
            open_.append(m)
        steps = stack.steps_per_epoch()
        epochs = int(cfg.trainer.max_epochs)
        for epoch in range(epochs):
            if not stack.active:
                break
            for x, y in stack.epoch_batches(steps):
                stack.train_step(x, y)
                pulse()
            train_means = stack.train_means()
            stack.sync()
            val = stack.validate(stack.val_batches())
            pulse()
            for i in list(stack.active):
                m = members[i]
                try:
                    goes_on = epoch_end(stack, m, i, epoch, (epoch + 1) * steps, {**val[i], **train_means[i]})
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as err:  # noqa: BLE001 - pruned (a StopRun), diverged: this member only
                    stack.leave(i)
                    end(m, err)
                    continue
                if not goes_on:
                    stack.leave(i)  # stopped early: tested below, as the others
            if stack.scheduler is not None:
                stack.scheduler.step()
        stack.sync()
        shared: dict[str, float] | None = None  # one cost measurement for the stack: same shapes, same costs
        for i, m in enumerate(members):
            if m.open_cm is not None:
                outcome = test_member(stack, datamodule, m, i, callbacks, uri, shared)
                if isinstance(outcome, dict) and shared is None and m.cfg.get("measure", {}).get("enabled", True):
                    shared = {k: v for k, v in outcome.items() if k.startswith("model/")}
                end(m, outcome)
    except BaseException as err:
        for m in members:
            if m.open_cm is not None:
                m.outcome = err
                close_run(m, err)
        raise


def test_member(stack: Stack, datamodule, m: Member, i: int, callbacks: tuple, uri: str,
                costs: dict[str, float] | None = None):
    """The member's best epoch tested by Lightning as a one-model run, and recorded as job.run records it;
    returns its metrics (last epoch's train/val, test, costs) or the exception it failed with."""
    model = stack.models[i]
    try:
        flush(m)
        with memory.guard(m.cfg):
            logger = job.EpochMLFlowLogger(experiment_name=m.cfg.mlflow.experiment, tracking_uri=uri, run_id=m.run_id)
            kwargs = job.trainer_kwargs(m.cfg)
            kwargs["enable_checkpointing"] = False
            trainer = pl.Trainer(**kwargs, logger=logger, callbacks=list(callbacks), default_root_dir=str(m.out_dir))
            best = m.best[1] if m.best else None
            weights = f"best epoch: {best}" if best else "final weights"
            results = job.test_and_record(m.cfg, m.client, m.run_id, uri, trainer, datamodule, model, best,
                                          weights, m.epochs, m.require, m.trained, costs)
        return {**m.trained, **results}
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # noqa: BLE001 - this member failed; the others are tested
        return err
