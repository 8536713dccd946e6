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
from lab.train import checkpoints, job, memory, precision, stack_resume, tracking
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
    keep_last: bool = False  # write its last.ckpt (stack_resume.py) for a retry to resume from
    resume_from: str | None = None  # a last.ckpt stack_resume.write wrote: it continues from there, in a stack of one
    outcome: Any = None  # set when it ends
    resume: dict | None = None  # the state read from resume_from
    # Filled while it trains:
    client: Any = None
    run_id: str | None = None
    open_cm: Any = None  # its tracking.run context, entered while it trains
    best: tuple[float, str] | None = None  # (monitored value, checkpoint path)
    trained: dict[str, float] = field(default_factory=dict)  # its last epoch's metrics
    wait: int = 0  # epochs without improvement (early stopping)
    epochs: int = 0  # epochs trained (Lightning's current_epoch after fit: the step of its test report)
    pending: list = field(default_factory=list)  # MLflow's RunOperations of its epoch metrics, waited for at its end
    unwritten: list = field(default_factory=list)  # its Metrics not yet handed to MLflow (written every WRITE_EVERY_S)


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
    if precision.on_gpu(cfg.trainer.get("accelerator", "auto")):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def run(members: list[Member], callbacks: tuple = (), pulse: Callable[[], None] | None = None,
        what: str = "members", tested: Callable[[], None] | None = None) -> str | None:
    """Train the members, together when they can; returns None, or the line saying why they trained alone.
    callbacks: Lightning callbacks for the runs trained alone; pulse(): after every batch; tested(): once a
    stack's test pass is done (from there on it records, and gets through no more batches)."""
    resumed = [m for m in members if m.resume_from]
    if resumed and len(members) > 1:
        raise ValueError("a member that resumes from its last.ckpt trains in a stack of its own")
    for m in resumed:
        m.resume = stack_resume.read(m.resume_from)
        m.tags["lab.resume"] = (f"resumed after epoch {m.resume['epoch']} from {m.resume_from}" if m.resume else
                                f"started afresh: {m.resume_from} cannot be read as a stacked member's state")
    if len(members) == 1 and not (resumed and resumed[0].resume):
        alone(members, callbacks)
        return None
    reason, built = why_not(members)
    if reason:
        line = f"{len(members)} {what} train one at a time, not as one stack: {reason}"
        if resumed:
            line += " (so it starts afresh)"
            resumed[0].tags["lab.resume"] = f"started afresh: it cannot train through the stacked loop ({reason})"
        log.warning(line)
        alone(members, callbacks)
        return line
    stack, datamodule = built
    log.info("%d %s train as one stack (vmap over %s)", len(members), what, type(stack.template).__name__)
    train(stack, datamodule, members, pulse or (lambda: None), tested or (lambda: None))
    return None


def open_run(m: Member, datamodule, model, uri: str) -> None:
    placed = datamodule.placement
    placement = {"lab.data_placement": placed.name, "lab.data_placement_reason": placed.why} if placed else {}
    m.open_cm = tracking.run(uri, m.cfg.mlflow.experiment, m.run_name, m.parent_run_id,
                             {"seed": str(m.cfg.seed), "data": datamodule.name, "model": type(model.net).__name__,
                              "lab.stacked": "true", **placement, **m.tags,
                              "lab.precision": precision.resolve(m.cfg.trainer.get("precision", "auto"),
                                                                 m.cfg.trainer.get("accelerator", "auto"))},
                             name_prefix=job.run_name_prefix(m.cfg, datamodule, model))
    m.client, m.run_id = m.open_cm.__enter__()
    if m.on_run is not None:
        m.on_run(m.client, m.run_id)
    tracking.log_config(m.client, m.run_id, m.cfg)
    root = getattr(datamodule, "root", None)
    tracking.log_dataset(m.client, m.run_id, datamodule, job.data_name(datamodule),
                         str(Path(root).resolve()) if root is not None and Path(root).exists() else None)
    n_params = float(sum(p.numel() for p in model.net.parameters()))
    m.unwritten.append(Metric("model/params", n_params, int(time.time() * 1000), 0))  # with its first epoch's


# A member's epoch metrics go to MLflow every WRITE_EVERY_S of training (and when it ends), one log_batch per
# member: one store commit per member per epoch (25-70 ms each on SQLite under this 2-core machine's load, 160
# for a stack of 8 digits MLPs over 20 epochs) cost more than their 400 stacked steps. A stack that trains for
# minutes still shows its curves as it goes. The periodic writes go through MLflow's async queue (not waited
# for on the training thread); the last one is synchronous, so that a stack shorter than WRITE_EVERY_S never
# starts the queue's threads (ending each run shuts them down again: ~0.1 s a run).
WRITE_EVERY_S = 10.0


def write(members: list[Member], synchronous: bool = False) -> None:
    """Each member's unwritten metrics handed to MLflow, one batch per run."""
    for m in members:
        if m.unwritten and m.client is not None:
            op = m.client.log_batch(m.run_id, metrics=m.unwritten, synchronous=synchronous)
            if not synchronous:
                m.pending.append(op)
            m.unwritten = []


def flush(m: Member) -> None:
    """Its epoch metrics written (before it is tested, or its run ends)."""
    pending, m.pending = m.pending, []
    for op in pending:
        op.wait()
    write([m], synchronous=True)


def close_run(m: Member, err: BaseException | None) -> None:
    """End the member's run as tracking.run ends one: FINISHED, KILLED on an interrupt, FAILED on an error."""
    if not isinstance(err, (KeyboardInterrupt, SystemExit)):
        flush(m)
    else:  # a raw Ctrl-C: the epochs not yet handed to MLflow written, without waiting on the queued ones
        write([m], synchronous=True)
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
    if m.best is not None and m.best[1] and m.best[1] != str(path):
        Path(m.best[1]).unlink(missing_ok=True)
    return str(path)


def epoch_end(stack: Stack, m: Member, i: int, epoch: int, step: int, metrics: dict[str, float]) -> bool:
    """Log member i's epoch, keep its best checkpoint, ask its hook; False when it leaves the stack here."""
    now = int(time.time() * 1000)
    m.unwritten += [Metric(k, v, now, epoch) for k, v in metrics.items()]  # written by write(), WRITE_EVERY_S
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


def train(stack: Stack, datamodule, members: list[Member], pulse: Callable[[], None],
          tested: Callable[[], None]) -> None:
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
        start = stack_resume.restore(stack, members)
        for i, m in enumerate(members):
            if m.resume and (stack_resume.stopped(m) or start >= epochs):
                stack.leave(i)  # it had stopped early, or trained all its epochs: tested below
                # Its last epoch's metrics, as a lone run resumed after its last epoch validates again (job.run):
                # the values of the weights restored, at that epoch's step.
                now = int(time.time() * 1000)
                m.unwritten += [Metric(k, v, now, start - 1) for k, v in m.trained.items()]
        every_s = checkpoints.interval(cfg.checkpoint.last_every_s)
        written = saved = time.monotonic()
        for epoch in range(start, epochs):
            if not stack.active:
                break
            for x, y in stack.epoch_batches(steps):
                stack.train_step(x, y)
                pulse()
            train_means = stack.train_means()
            stack.sync()
            val = stack.validate(stack.val_batches())
            pulse()
            went_on = []  # the members through this epoch (stopped early or not): their last.ckpt may be due
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
                went_on.append(i)
                if not goes_on:
                    stack.leave(i)  # stopped early: tested below, as the others
            if time.monotonic() - written >= WRITE_EVERY_S:
                write(members)
                written = time.monotonic()
            if stack.scheduler is not None:
                stack.scheduler.step()
            keep = [i for i in went_on if members[i].keep_last]
            if keep and time.monotonic() - saved >= every_s:  # LastCheckpoint's rule, for the stack as a whole
                for i in keep:
                    stack_resume.write(stack, members[i], i, epoch + 1)
                saved = time.monotonic()
        stack.sync()
        outcomes = test(stack, members, pulse)
        tested()
        shared: dict[str, float] | None = None  # one cost measurement for the stack: same shapes, same costs
        for i, m in enumerate(members):
            if m.open_cm is not None:
                outcome = outcomes[i]
                if not isinstance(outcome, BaseException):
                    outcome = record(stack, datamodule, m, i, uri, outcome, shared)
                if isinstance(outcome, dict) and shared is None and m.cfg.get("measure", {}).get("enabled", True):
                    shared = {k: v for k, v in outcome.items() if k.startswith("model/")}
                end(m, outcome)
    except BaseException as err:
        for m in members:
            if m.open_cm is not None:
                m.outcome = err
                close_run(m, err)
        raise


def test(stack: Stack, members: list[Member], pulse: Callable[[], None]) -> dict[int, Any]:
    """{member: its test/* scalars, or the exception its test failed with} for every member whose run is still
    open: each one's best epoch (its checkpoint, loaded as Lightning's trainer.test loads one; none: its final
    weights), all of them tested by one vectorised pass over the test split (Stack.test)."""
    open_ = [i for i, m in enumerate(members) if m.open_cm is not None]
    outcomes: dict[int, Any] = {}
    for i in open_:
        m = members[i]
        try:
            flush(m)
            if m.best and m.best[1]:
                state = torch.load(m.best[1], map_location=stack.device, weights_only=True)["state_dict"]
                stack.models[i].load_state_dict(state)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:  # noqa: BLE001 - this member failed; the others are tested
            outcomes[i] = err
    tested = [i for i in open_ if i not in outcomes]
    if not tested:
        return outcomes
    try:
        with memory.guard(members[tested[0]].cfg):
            outcomes.update(stack.test(tested, pulse))
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # noqa: BLE001 - the shared pass failed: every member it tested fails with it
        outcomes.update({i: err for i in tested})
    for i in tested:
        stack.models[i].to("cpu")  # where Lightning's test leaves a model: what is logged is read from there
    return outcomes


def record(stack: Stack, datamodule, m: Member, i: int, uri: str, scalars: dict[str, float],
           costs: dict[str, float] | None = None):
    """The member's test recorded as job.run records a run's (job.record: report, tags, misclassified images,
    costs, the model); returns its metrics (last epoch's train/val, test, costs) or the exception it failed with."""
    try:
        with memory.guard(m.cfg):
            best = (m.best[1] or None) if m.best else None
            tested = job.Tested(scalars, best, m.epochs, stack.device, stack.autocast_dtype)
            results = job.record(m.cfg, m.client, m.run_id, uri, datamodule, stack.models[i], tested, m.require,
                                 m.trained, costs, log_scalars=True,
                                 tags={"lab.tested": f"best epoch: {best}" if best else "final weights"})
        return {**m.trained, **results}
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # noqa: BLE001 - this member failed; the others are recorded
        return err
