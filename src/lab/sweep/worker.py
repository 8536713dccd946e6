"""One worker process: pull the next trial as soon as this one ends, until the study's budget is spent.

Trials are asked and told by hand (not study.optimize) so that the budget check and the ask happen
under one lock: n_trials is exact even with many workers. On RDB storage a thread keeps the trial's
heartbeat, since Optuna records heartbeats only inside optimize().
"""
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import optuna
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from lab import private
from lab.errors import Interrupted
from lab.sweep import budget, liveness, patience, reachability, records
from lab.sweep import stop as stop_rules
from lab.sweep import study as studies
from lab.sweep.pool import PARENT_ENV
from lab.sweep.spec import Sweep
from lab.train import tracking
from lab.train.memory import OutOfMemory

log = logging.getLogger(__name__)
IDLE_POLL_S = 2.0  # a worker waiting for the last running trials checks this often
CUDA_FATAL = getattr(torch, "AcceleratorError", ())  # torch >= 2.8 raises it for sticky CUDA errors


@contextlib.contextmanager
def heartbeat(study: optuna.Study, trial: optuna.Trial):
    """Optuna's own heartbeat thread, which optimize() runs around each trial and ask/tell must start itself
    (a no-op thread where the storage keeps no heartbeats, as a journal file)."""
    thread = private.heartbeat_thread(study, trial)
    thread.start()
    try:
        yield
    finally:
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
        budget.retry(study, budget.stored(study, trial), reason)
        records.tag_run(uri, trial, "INTERRUPTED", reason)
        records.end_if_running(uri, trial, "KILLED")
        raise
    except patience.StorageUnreachable as lost:
        storage_lost(uri, trial, lost)
    except torch.cuda.OutOfMemoryError as err:
        reason = f"out of memory: {str(err).splitlines()[0]}"
        free_memory()
    except OutOfMemory as err:  # on the CPU: the sentence says what ran out and what to lower
        reason = str(err)
        log.warning("trial %d failed: %s", trial.number, reason)
        free_memory()
    except Exception as err:  # a failing trial must not end the sweep
        reason = f"{type(err).__name__}: {err}"
        log.warning("trial %d failed: %s", trial.number, reason)
        if isinstance(err, CUDA_FATAL):  # e.g. a device-side assert: the CUDA context is poisoned for good
            # End this worker; the pool starts a fresh process (a fresh context) for the next trial.
            trial.set_user_attr("fail_reason", reason)
            study.tell(trial, state=TrialState.FAIL)
            raise
    try:
        if reason:
            trial.set_user_attr("fail_reason", reason[:2000])
        study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
    except patience.StorageUnreachable as lost:
        storage_lost(uri, trial, lost)
    except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
        # Another process ended it meanwhile: this worker was taken for dead (stopped, hung, its heartbeat
        # late) and the trial was failed and queued again. Its record stands; this result is dropped.
        frozen = budget.stored(study, trial)
        if not frozen.state.is_finished():
            raise
        if frozen.state == state and (state != TrialState.FAIL or budget.fail_reason(frozen) == reason[:2000]):
            # This worker's own tell, applied just before the database went away and tried again (patience.py).
            records.tag_run(uri, trial, state.name, reason)
            return state.name
        log.warning("trial %d was ended by another process while this worker ran it (%s); its result is dropped",
                    trial.number, budget.fail_reason(frozen))
        records.end_failed(uri, frozen, budget.fail_reason(frozen))
        return "REAPED"
    records.tag_run(uri, trial, state.name, reason)
    return state.name


def storage_lost(uri: str, trial: optuna.Trial, lost: "patience.StorageUnreachable") -> None:
    """The storage stayed away longer than LAB_STORAGE_OUTAGE_S: nothing can be told, so the trial stays RUNNING
    there. Its MLflow run ends FAILED with the reason, which the worker that reaps the trial later records on it
    (records.abandoner); the worker stops with the sentence."""
    records.tag_run(uri, trial, "FAIL", patience.reason(lost.why))
    records.end_if_running(uri, trial, "FAILED")
    raise lost


class FailureLimit(Exception):
    """The sweep's last max_failures trials failed: this worker asks for no new trial."""

    def __init__(self, streak: list[optuna.trial.FrozenTrial]):
        self.streak = streak
        super().__init__(f"{len(streak)} trials in a row failed")


@contextlib.contextmanager
def signals_held():
    """SIGINT/SIGTERM wait while a trial is asked for and labelled: a trial is either not created, or
    created with the host and pid that let a reaper find it. A signal that came meanwhile is raised after."""
    held = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


def work(sweep: Sweep, storage: str, out_dir: Path, worker_id: str, deadline: float | None = None,
         threads: int = 0, given: set[str] = frozenset()) -> int:
    """Returns the number of trials this worker ran; raises FailureLimit when the sweep's failure limit stops
    it. The command installs the signal handlers that turn SIGINT/SIGTERM into Interrupted."""
    # Not at the top: Lightning costs ~7 s of imports, paid here before a trial's clock starts.
    from lab.sweep import objective, stacking

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    uri = tracking.tracking_uri()
    reachability.TrackingWatch(uri)  # says in this worker's log when an MLflow server stops answering
    abandon = records.abandoner(uri, sweep.spec.max_retries)
    study = studies.create_or_resume(sweep, storage, worker_id, join=True, given=set(given))
    parent = records.parent_run(study, sweep, uri, storage)
    # Recorded in each trial's overrides (threads=N): a replay on this machine sums in the same order.
    threads = threads or torch.get_num_threads()
    ran = 0
    while True:
        asked = []  # the trial this worker trains next, then the trials that train in one stack with it (`stack: N`)
        liveness.training(False)
        try:
            with signals_held(), budget.budget_lock(storage, sweep.spec.study):
                asked, done = ask_next(sweep, study, storage, out_dir, worker_id, threads, deadline,
                                       lambda t, why: abandon(study, t, why))
            if done:
                break
            if not asked:
                time.sleep(IDLE_POLL_S)
                continue
            trial, mates = asked[0], asked[1:]
            state = (stacking.run_stack(sweep, study, asked, parent, uri, run_one) if mates
                     else run_one(sweep, study, trial, parent, uri, objective.run_trial))
        except Interrupted as stop:
            # Between the ask and the trial's own handling (run_one queues its trial again itself).
            for one in asked:
                frozen = budget.stored(study, one)
                if frozen.state == TrialState.RUNNING:
                    budget.retry(study, frozen, f"interrupted by {describe(stop)}")
            raise
        ran += len(asked)
        log.info("trial %d %s", trial.number, state)
        records.update_best(MlflowClient(uri), parent, study)
    return ran


def ask_next(sweep: Sweep, study: optuna.Study, storage: str, out_dir: Path, worker_id: str, threads: int,
             deadline: float | None, abandon) -> tuple[list[optuna.Trial], bool]:
    """With the budget lock held: the trials of dead workers reaped (abandon(trial, why)), then (this worker's
    next trial and its stack mates, False); ([], True) when it is done (deadline, a stop rule, the budget
    spent and nothing running that could need a retry); ([], False) to wait for the running ones. Raises
    FailureLimit when the last max_failures trials failed."""
    from lab.sweep import stacking

    budget.reap(study, storage, abandon)
    if deadline is not None and time.time() >= deadline:
        log.info("timeout reached: no new trials")
        return [], True
    streak = budget.failure_streak(sweep, study)
    if streak:
        raise FailureLimit(streak)
    why = stop_rules.reason(sweep.spec.stop, sweep.spec.metric, study)
    if why:  # no new trial; running ones (this worker's own is done) finish
        stop_rules.record(study, why)
        log.info("stop rule: %s", why)
        return [], True
    if budget.done(sweep, study, study.sampler) and not budget.queued_retries(study):
        # Stay while others run: a trial whose worker died is retried once it is found stale.
        return [], not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    trial = study.ask(sweep.space)  # a queued retry first: its budget was counted already
    for key, value in owner(trial, out_dir, worker_id, threads).items():
        trial.set_user_attr(key, value)
    return [trial, *stacking.ask_mates(sweep, study, trial, out_dir)], False


def owner(trial: optuna.Trial, out_dir: Path, worker_id: str, threads: int) -> dict:
    """What a trial records of the worker that runs it: where a reaper finds its process (host, pid), and what a
    replay needs to sum in the same order (threads, device)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "worker": worker_id, "threads": threads,
            "device": os.environ.get("CUDA_VISIBLE_DEVICES", "cpu") or "cpu",
            "checkpoint_dir": str(out_dir / f"trial_{trial.number:04d}" / "checkpoints")}


def follow_parent() -> None:
    """A pool worker runs in its own session, so that a Ctrl-C reaches only the parent, which stops workers in
    order. For it not to outlive a parent that was killed (SIGKILL, the OOM killer) the kernel sends it
    SIGTERM when the parent dies (Linux); it then marks its trial interrupted and queues it again."""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return  # started by hand (`lab worker` on a cluster): nothing to follow
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1  # <linux/prctl.h>
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    else:  # no parent-death signal: look every few seconds
        def watch():
            while os.getppid() == int(parent):
                time.sleep(IDLE_POLL_S)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, name="lab-parent", daemon=True).start()
    if os.getppid() != int(parent):  # it died before the signal was set up
        os.kill(os.getpid(), signal.SIGTERM)


def deadline_from(timeout: float | None, started: float) -> float | None:
    return None if timeout is None else started + timeout  # spec.check_spec refused a timeout <= 0
