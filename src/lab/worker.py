"""One worker process: pull the next trial as soon as this one ends, until the study's budget is spent.

Trials are asked and told by hand (not study.optimize) so that the budget check and the ask happen
under one lock: n_trials is exact even with many workers. On RDB storage a thread keeps the trial's
heartbeat, since Optuna records heartbeats only inside optimize().
"""
import contextlib
import gc
import logging
import math
import os
import socket
import threading
import time
from pathlib import Path

import optuna
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from lab import study as studies
from lab import sweep_tracking, tracking
from lab.errors import Interrupted, LabError
from lab.spec import Sweep

log = logging.getLogger(__name__)
IDLE_POLL_S = 2.0  # a worker waiting for the last running trials checks this often


@contextlib.contextmanager
def heartbeat(study: optuna.Study, trial: optuna.Trial):
    """Optuna records heartbeats only inside optimize(); under ask/tell this thread does it."""
    storage = study._storage  # noqa: SLF001 - the heartbeat API lives on the (cache-wrapped) storage
    interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat():
        while not stop.wait(interval):
            storage.record_heartbeat(trial._trial_id)  # noqa: SLF001

    storage.record_heartbeat(trial._trial_id)  # noqa: SLF001
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def describe(stop: Interrupted) -> str:
    return "Ctrl-C (SIGINT)" if str(stop) == "SIGINT" else str(stop)


def run_one(sweep: Sweep, study: optuna.Study, trial: optuna.Trial, parent: str, uri: str, run_trial) -> str:
    """Runs the trial with run_trial (objective.run_trial) and tells Optuna how it ended; returns the state name."""
    state, value, reason = TrialState.FAIL, None, None
    try:
        with heartbeat(study, trial):
            value = run_trial(sweep, trial, parent)
        state = TrialState.COMPLETE
    except optuna.TrialPruned as pruned:
        state, reason = TrialState.PRUNED, str(pruned)
    except Interrupted as stop:
        reason = f"interrupted by {describe(stop)}"
        studies.retry(study, study._storage.get_trial(trial._trial_id), reason)  # noqa: SLF001
        sweep_tracking.tag_run(uri, trial, "INTERRUPTED", reason)
        raise
    except torch.cuda.OutOfMemoryError as err:
        reason = f"out of memory: {str(err).splitlines()[0]}"
        free_memory()
    except Exception as err:  # noqa: BLE001 - a failing trial must not end the sweep
        reason = f"{type(err).__name__}: {err}"
        log.warning("trial %d failed: %s", trial.number, reason)
        if "device-side assert" in str(err):  # the CUDA context is poisoned: end this worker, let it restart
            trial.set_user_attr("fail_reason", reason)
            study.tell(trial, state=TrialState.FAIL)
            raise
    if reason:
        trial.set_user_attr("fail_reason", reason[:2000])
    study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
    sweep_tracking.tag_run(uri, trial, state.name, reason)
    return state.name


def work(sweep: Sweep, storage: str, out_dir: Path, worker_id: str, deadline: float | None = None,
         threads: int = 0, join: bool = False) -> int:
    """Returns the number of trials this worker ran. The command installs the signal handlers that turn
    SIGINT/SIGTERM into Interrupted."""
    # Not at the top: Lightning costs ~7 s of imports, paid here before a trial's clock starts.
    from lab import objective

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    uri = tracking.tracking_uri()
    abandon = sweep_tracking.abandoner(uri, sweep.spec.max_retries)
    study = studies.create_or_resume(sweep, storage, worker_id, on_stale=abandon, join=join)
    parent = sweep_tracking.parent_run(study, sweep, uri, storage)
    # Recorded in each trial's overrides (threads=N): a replay on this machine sums in the same order.
    threads = threads or torch.get_num_threads()
    host, ran = socket.gethostname(), 0
    while True:
        with studies.budget_lock(storage, out_dir, sweep.spec.study):
            studies.reap(study, storage, lambda t: abandon(study, t, "worker process died"))
            if deadline is not None and time.time() >= deadline:
                log.info("timeout reached: no new trials")
                break
            streak = studies.failure_streak(sweep, study)
            if streak:
                log.warning("%d consecutive trials failed: no new trials", len(streak))
                break
            if studies.done(sweep, study, study.sampler) and not studies.queued_retries(study):
                # Stay while others run: a trial whose worker died is retried once it is found stale.
                if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                    break
                trial = None
            else:
                trial = study.ask(sweep.space)  # a queued retry first: its budget was counted already
                for key, value in {"worker": worker_id, "host": host, "pid": os.getpid(), "threads": threads,
                                   "device": os.environ.get("CUDA_VISIBLE_DEVICES", "cpu") or "cpu",
                                   "checkpoint_dir": str(out_dir / f"trial_{trial.number:04d}" / "checkpoints"),
                                   }.items():
                    trial.set_user_attr(key, value)
        if trial is None:
            time.sleep(IDLE_POLL_S)
            continue
        state = run_one(sweep, study, trial, parent, uri, objective.run_trial)
        ran += 1
        log.info("trial %d %s", trial.number, state)
        sweep_tracking.update_best(MlflowClient(uri), parent, study)
    return ran


def deadline_from(timeout: float | None, started: float) -> float | None:
    if timeout is None:
        return None
    if not math.isfinite(timeout) or timeout <= 0:
        raise LabError(f"timeout={timeout} is not valid: give a positive number of seconds or leave it out.")
    return started + timeout
