"""The parent of a SLURM sweep. In the foreground it does what the local sweep's parent does (sweep/parent.py),
with array tasks for worker processes: the live view with the tasks' states, the trials of tasks that ended or
hung reaped, Ctrl-C/SIGTERM/SIGHUP turned into an scancel of the array, the sweep closed with the same exit
codes. With --detach it submits and returns; the last worker closes the sweep."""
import signal
import sys
import time
from contextlib import suppress
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from lab import interrupts
from lab.errors import Interrupted, LabError
from lab.sweep import budget, live, liveness, pool, records, worker
from lab.sweep import parent as sweep_parent
from lab.sweep import stop as stop_rules
from lab.sweep import study as studies
from lab.sweep.slurm import settings
from lab.sweep.slurm.array import ENDED, PENDING, RUNNING, Array, Task
from lab.sweep.spec import Sweep
from lab.train import tracking
from lab.uris import absolute_uri, mask_password

CANCEL_WAIT_S = 90  # scancel: SIGTERM, then SIGKILL after the cluster's KillWait (30 s by default)
MAX_SUBMITS = pool.MAX_RESTARTS  # arrays submitted again after every task ended with work left


def prepare(args, sweep: Sweep, overrides: list[str], out_dir: Path, storage: str) -> Array:
    """Everything checked before a study, a run or a job exists: the settings, the partition, the storage."""
    s = settings.load(sweep.spec.launcher, overrides, str(sweep.path))
    hosts = settings.nodes(s.partition)
    settings.check_storage(storage, out_dir, absolute_uri(tracking.tracking_uri()), hosts, s.partition)
    return Array(s, hosts, out_dir / "slurm", out_dir / "workers")


def reap_task(study: optuna.Study, sweep: Sweep, uri: str, storage: str, name: str,
              why: str) -> list[optuna.trial.FrozenTrial]:
    """The trials a task was running when it ended: failed and queued again within max_retries. (A worker that
    was signalled has queued its own already; this is for one that had no time, or was killed, or its node.)"""
    abandon = records.abandoner(uri, sweep.spec.max_retries)
    with budget.budget_lock(storage, sweep.spec.study):
        mine = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if t.user_attrs.get("worker") == name]
        for trial in mine:
            abandon(study, trial, why)
    return mine


def work_left(sweep: Sweep, study: optuna.Study, deadline: float | None) -> bool:
    if deadline is not None and time.time() >= deadline or stop_rules.reason(sweep.spec.stop, sweep.spec.metric, study):
        return False
    return bool(budget.queued_retries(study)) or not budget.done(sweep, study, studies.make_sampler(sweep))


def lines(sweep: Sweep, study: optuna.Study, array: Array, started: float) -> list[str]:
    """The local sweep's view, the tasks' states beside the trial counts."""
    out = live.lines(sweep, study, array, started)
    head, _, clock = out[0].rpartition("  [")
    out[0] = f"{head}  |  {array.counts()}  [{clock}"
    return out


def wait_gone(array: Array, timeout: float = CANCEL_WAIT_S) -> None:
    end = time.time() + timeout
    while array.active() and time.time() < end:
        time.sleep(1)
        array.poll()
    if array.active():
        print(f"still listed by squeue after {timeout:.0f} s: {', '.join(array.active())}", flush=True)


def log_of(array: Array, name: str) -> Path:
    """submitit's log of a task (stdout and stderr): <array id>_<index>_0_log.out."""
    return array.folder / f"{name.removeprefix('slurm')}_0_log.out"


def launch(args, array: Array, sweep: Sweep, study: optuna.Study, parent: str, uri: str, storage: str, out_dir: Path,
           worker_args: list[str], deadline: float | None) -> None:
    n = args.workers or 1
    s = array.settings
    array.beat_dir.mkdir(parents=True, exist_ok=True)
    # Without GPUs asked for, none is used: a node whose GPUs SLURM does not fence would show its workers all of them.
    env = {"MLFLOW_TRACKING_URI": uri, **({} if s.gpus_per_task else {"CUDA_VISIBLE_DEVICES": ""})}
    task = Task(worker_args, env, str(array.beat_dir), s.signal, follow=not args.detach)
    where = (f"partition {s.partition or '(default)'} ({len(array.hosts)} node(s)), {s.cpus_per_task} CPU(s)"
             f"{f' {s.gpus_per_task} GPU(s)' if s.gpus_per_task else ''} and {s.time_min} min per task")
    if not work_left(sweep, study, deadline) and not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        sweep_parent.finish(sweep, study, parent, uri, None, [], deadline)  # nothing to submit
        return
    if not args.detach:  # from here a Ctrl-C cancels what was submitted
        interrupts.install((signal.SIGTERM, signal.SIGINT, signal.SIGHUP))  # SIGHUP: the terminal was closed
    try:
        array_id = array.submit(task, n, f"lab-{sweep.spec.study}")
    except LabError:
        MlflowClient(uri).set_terminated(parent, "FAILED")  # nothing will run: the parent run is not left RUNNING
        raise
    except Interrupted:
        with suppress(LabError):
            array.cancel()
        raise
    print(f"workers: SLURM job array {array_id}, {n} task(s) on {where}; logs in {array.folder}", flush=True)
    if args.detach:
        print(f"follow: squeue -j {array_id}; optuna-dashboard {mask_password(storage)}; the MLflow UI "
              f"(parent run {parent})")
        print(f"stop:   scancel {array_id} (each worker marks its trial and ends its MLflow run KILLED); the same "
              "command resumes the sweep")
        print(f"close:  the last worker to finish closes the sweep's parent run; then `lab best "
              f"{sweep.typed or sweep.path}` prints the best trial")
        return

    started = time.time()
    view = live.LiveView(live=False if args.no_live else None)
    failures = sweep_parent.Failures(study)
    interrupted, submits, hung, said = None, 0, {}, None
    trials_then = len(study.get_trials(deepcopy=False))  # at the last submission
    grace = liveness.grace_s()
    active = PENDING | RUNNING
    try:
        while True:
            before = dict(array.states)
            try:
                states = array.poll()
            except LabError as err:  # slurmctld busy or restarting: the tasks may well be running on
                if str(err) != said:
                    print(f"{err}; retrying", flush=True)
                said = str(err)
                time.sleep(sweep_parent.POLL_S)
                continue
            said = None
            for name, (state, _node) in states.items():
                was = before.get(name, ("PENDING", ""))[0]
                if state in RUNNING and was not in RUNNING:
                    array.beat_file(name).unlink(missing_ok=True)  # a requeued task's old beat is not its own
                quiet = liveness.quiet_for(array.beat_file(name))
                if state in RUNNING and quiet > grace and name not in hung:
                    hung[name] = quiet
                    print(f"worker {name} hung (no sign of life for {quiet:.0f} s): cancelled", flush=True)
                    array.cancel(name, "KILL")
                ended, requeued = was in active and state not in active, was in RUNNING and state in PENDING
                if ended or requeued:  # requeued: preempted, or its node failed
                    what = f"hung for {hung[name]:.0f} s, cancelled" if name in hung else state
                    reaped = reap_task(study, sweep, uri, storage, name, f"SLURM task {name} ended ({what})")
                    sweep_parent.reap(study, sweep, uri, storage)
                    if state != "COMPLETED" or reaped:
                        print(f"worker {name} {'requeued' if requeued else 'ended'} ({what})"
                              + (f" running trial {reaped[-1].number}" if reaped else "")
                              + f"; see {log_of(array, name)}", flush=True)
            failures.report(study)
            if budget.failure_streak(sweep, study):
                break
            if not array.active():
                ran = len(study.get_trials(deepcopy=False)) > trials_then
                if submits < MAX_SUBMITS and ran and work_left(sweep, study, deadline):
                    submits += 1
                    trials_then = len(study.get_trials(deepcopy=False))
                    again = array.submit(task, n, f"lab-{sweep.spec.study}")
                    print(f"every task ended with trials left: submitted array {again} ({submits}/{MAX_SUBMITS})",
                          flush=True)
                    continue
                if not ran:
                    print(f"every task ended without running a trial: see the task logs in {array.folder}",
                          file=sys.stderr, flush=True)
                break
            view.show(lines(sweep, study, array, started))
            time.sleep(sweep_parent.POLL_S)
    except Interrupted as stop:
        interrupted = stop
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the orderly stop short
        if str(stop) == "SIGHUP":  # no terminal to print to any more: the rest goes to the sweep's log
            sys.stdout = sys.stderr = open(out_dir / "sweep.log", "a", buffering=1)  # noqa: SIM115 - until exit
        print(f"\n{worker.describe(stop)}: cancelling SLURM job(s) {', '.join(array.ids)} (each worker marks its "
              "trial and ends its MLflow run KILLED) ...", flush=True)
        array.cancel()
        wait_gone(array)
    except BaseException:
        with suppress(LabError):  # the error that got here is the one to say
            array.cancel()  # the parent owns its tasks to the end: none goes on without it
        raise
    streak = budget.failure_streak(sweep, study)
    if streak and not interrupted:
        array.cancel()  # the other tasks ask for no new trial either; running ones are cut short
        wait_gone(array)
    for name, (state, _) in array.poll().items():
        if state not in PENDING | RUNNING:
            reap_task(study, sweep, uri, storage, name, f"SLURM task {name} ended ({state if state != ENDED else 'gone'})")
    sweep_parent.reap(study, sweep, uri, storage)
    failures.report(study)
    view.show(lines(sweep, study, array, started))
    sweep_parent.finish(sweep, study, parent, uri, interrupted, streak, deadline)
