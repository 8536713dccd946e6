"""`lab sweep`, `lab worker` (`lab best` is analysis/best.py): sweep file -> Optuna study -> workers on GPUs/CPUs -> trials.

The parent process validates everything, creates the MLflow DB and the study before any worker starts
(16 processes migrating a fresh SQLite schema at once can corrupt it), then watches the pool.
"""
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from mlflow.tracking import MlflowClient

from lab import config, interrupts, settings
from lab.errors import Interrupted, LabError
from lab.sweep import budget, live, liveness, outcome, parent, patience, pool, reachability, records, spec, worker
from lab.sweep import stop as stop_rules
from lab.sweep import study as studies
from lab.sweep.slurm import follow as slurm
from lab.sweep.slurm import settings as slurm_settings
from lab.train import tracking
from lab.uris import absolute_uri, mask_password

log = logging.getLogger(__name__)


def choose_slots(args, sweep: spec.Sweep) -> list[pool.Slot]:
    """Every option checked here, before a study or an MLflow run exists."""
    visible = torch.cuda.device_count()
    if args.workers is not None and args.workers < 1:
        raise LabError(f"--workers={args.workers} is not valid: give the number of CPU worker processes, 1 or more.")
    gpus = pool.parse_gpus(args.gpus, visible)
    if args.workers is not None and args.gpus is None:
        gpus = []  # --workers alone means CPU workers, even on a GPU machine
    if args.workers_per_gpu != "1" and not gpus:
        raise LabError(f"--workers-per-gpu={args.workers_per_gpu} needs GPUs, and this sweep runs on the CPU "
                       f"({visible} GPU(s) visible{', --workers given' if visible else ''}): use --workers N for "
                       "CPU workers.")
    per_gpu = 1
    if gpus and args.workers_per_gpu == "auto":
        from lab.train import job  # Lightning's imports (~7 s), only for this measurement

        datamodule, model = job.build(config.load(sweep.base_overrides))
        n_params = sum(p.numel() for p in model.parameters())
        memory = min(torch.cuda.get_device_properties(g).total_memory for g in gpus)
        per_gpu = pool.auto_per_gpu(n_params, memory, datamodule.nbytes)
        print(f"--workers-per-gpu auto: {n_params / 1e6:.2f}M parameters, {datamodule.nbytes / 1e9:.2f} GB of data "
              f"per worker -> {per_gpu} per GPU")
    elif gpus:
        try:
            per_gpu = int(args.workers_per_gpu)
        except ValueError as err:
            raise LabError(f"--workers-per-gpu={args.workers_per_gpu!r} is not valid: an integer >= 1 or 'auto'.") from err
    return pool.placement(gpus, per_gpu, args.workers or 1, os.cpu_count() or 1, settings.get("LAB_TORCH_THREADS"))


@dataclass
class Launch:
    """One `lab sweep` launch once its study and MLflow parent run exist: what the steps below share."""
    sweep: spec.Sweep
    study: optuna.Study
    storage: str
    uri: str  # MLflow's
    out_dir: Path
    parent: str  # the MLflow parent run's id


def sweep_command(args) -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # this command says what happened in its own words
    sweep, out_dir, storage, array, slots = checked(args)
    uri = absolute_uri(tracking.tracking_uri())
    study = opened_study(sweep, storage)
    if study is None:
        return
    launch, reaped = begun(sweep, study, storage, uri, out_dir)
    if args.prepare:  # cluster use: the study and parent run exist before N `lab worker`s join
        print(f"prepared study {sweep.spec.study} in {mask_password(storage)}; MLflow parent run {launch.parent}")
        return
    started = time.time()
    deadline = worker.deadline_from(sweep.spec.timeout, started)
    say_where(launch, reaped)
    arguments = worker_arguments(launch, deadline)
    if array is not None:  # the workers are SLURM array tasks
        return slurm.launch(args, array, sweep, study, launch.parent, uri, storage, out_dir, arguments, deadline)
    run_pool(launch, slots, arguments, args.no_live, started, deadline)


def checked(args) -> tuple[spec.Sweep, Path, str, object, list[pool.Slot]]:
    """(sweep, out folder, storage, SLURM array or None, local worker slots): the file and every option
    checked, the sampler's and pruner's included, before a study or an MLflow run exists."""
    launcher_overrides = slurm_settings.take_overrides(args)  # launcher.KEY=VALUE: not the trials' overrides
    sweep = spec.from_args(args, check=False)  # the file and the options first: a typo is said in ~3 s, not ~6 s
    out_dir, storage = studies.locate(sweep, args.storage, args.out)
    array = slurm.prepare(args, sweep, launcher_overrides, out_dir, storage) if launcher_overrides is not None else None
    slots = choose_slots(args, sweep) if array is None else []
    studies.make_sampler(sweep), studies.make_pruner(sweep)  # their options are checked before a file exists
    spec.check_trials(sweep)
    for note in sweep.notes:
        print(f"note: {note}")
    return sweep, out_dir, storage, array, slots


def opened_study(sweep: spec.Sweep, storage: str) -> optuna.Study | None:
    """The study created or resumed; None when its stop rule holds already (said, with the best trial)."""
    said = len(sweep.notes)
    study = studies.create_or_resume(sweep, storage, repair=True)  # refuses a changed sweep before MLflow is touched
    for note in sweep.notes[said:]:  # what a warm start dropped
        print(f"note: {note}")
    why = stop_rules.reason(sweep.spec.stop, sweep.spec.metric, study)
    if why:
        print(f"study {sweep.spec.study}: its stop rule already holds ({why}); nothing to train. Change or remove "
              f"`stop:` in {sweep.path} to go on.")
        outcome.print_best(sweep, study)
        return None
    return study


def begun(sweep: spec.Sweep, study: optuna.Study, storage: str, uri: str, out_dir: Path):
    """(the Launch, the stale trials queued again): the MLflow store checked, this launch marked on the study,
    the trials of workers that died reaped, the parent run found or created and its orphaned runs ended."""
    records.check_store(study, uri)
    tracking.experiment_id(uri, sweep.mlflow_experiment)
    studies.begin_launch(sweep, study)
    reaped = parent.reap(study, sweep, uri, storage)
    parent_run = records.parent_run(study, sweep, uri, storage)
    records.end_orphaned_runs(MlflowClient(uri), parent_run, study)
    return Launch(sweep, study, storage, uri, out_dir, parent_run), reaped


def say_where(launch: Launch, reaped: list) -> None:
    """The budget used so far, and where the study and the runs are."""
    sweep, storage, uri = launch.sweep, launch.storage, launch.uri
    used = budget.used_budget(launch.study)
    print(f"study {sweep.spec.study}: {used}/{sweep.spec.n_trials} trials already used"
          + (f", {len(reaped)} stale trial(s) re-queued" if reaped else ""))
    if used >= sweep.spec.n_trials and not budget.queued_retries(launch.study):
        print(f"nothing to run: the budget of {sweep.spec.n_trials} trials is spent ({used} used); "
              f"--n-trials N with N > {used} runs N - {used} more.")
    print(f"storage: {mask_password(storage)}   (optuna-dashboard {mask_password(storage)})")
    print(f"mlflow:  {mask_password(uri)}  experiment {sweep.mlflow_experiment!r}, parent run {launch.parent}")


def worker_arguments(launch: Launch, deadline: float | None) -> list[str]:
    """`lab worker`'s arguments: this launch's file, study, budget and overrides, the checks already made."""
    sweep = launch.sweep
    arguments = [str(sweep.path), "--storage", launch.storage, "--out", str(launch.out_dir), "--study",
                 sweep.spec.study, "--n-trials", str(sweep.spec.n_trials), "--max-failures",
                 str(sweep.spec.max_failures), "--max-retries", str(sweep.spec.max_retries), *sweep.base_overrides,
                 "--no-check"]
    return arguments + (["--deadline", str(deadline)] if deadline is not None else [])


def run_pool(launch: Launch, slots: list[pool.Slot], arguments: list[str], no_live: bool, started: float,
             deadline: float | None) -> None:
    """The local workers started, watched until they are done (or stopped by a signal, a lost storage or
    max_failures), then the sweep finished (parent.finish: the summary and the exit status)."""
    sweep, study, out_dir = launch.sweep, launch.study, launch.out_dir
    print(f"workers: {len(slots)} ({', '.join(s.name for s in slots)}); logs in {out_dir / 'workers'}")
    # Workers inherit this process's environment plus their slot's, and write to the same MLflow store.
    workers = pool.Pool(slots, arguments, out_dir / "workers", env={"MLFLOW_TRACKING_URI": launch.uri})
    view = live.LiveView(live=False if no_live else None, notes=reachability.TrackingWatch(launch.uri).notes)
    failures = parent.Failures(study)
    interrupted = None
    interrupts.install((signal.SIGTERM, signal.SIGINT, signal.SIGHUP))  # SIGHUP: the terminal was closed
    try:
        workers.start()
        watch(launch, workers, view, failures, started)
    except Interrupted as stop:
        interrupted = stop
        stop_workers(workers, stop, out_dir)
    except patience.StorageUnreachable as lost:  # longer than LAB_STORAGE_OUTAGE_S: said in one sentence
        workers.stop()
        records.end_parent(MlflowClient(launch.uri), launch.parent, patience.reason(lost.why))
        raise
    except BaseException:
        workers.stop()  # the parent owns its workers to the end: none goes on without it
        raise
    streak = budget.failure_streak(sweep, study)
    if streak and not interrupted:
        workers.stop()  # the rest of the pool asks for no new trial either; running ones are cut short
    parent.reap(study, sweep, launch.uri, launch.storage)
    failures.report(study)
    view.show(live.lines(sweep, study, workers, started))
    parent.finish(sweep, study, launch.parent, launch.uri, interrupted, streak, deadline)


def watch(launch: Launch, workers: pool.Pool, view: live.LiveView, failures: parent.Failures, started: float) -> None:
    """Until no worker runs or max_failures trials in a row failed: hung workers killed, dead ones reaped and
    restarted, each new failure said once, the live view drawn every parent.POLL_S."""
    grace = liveness.grace_s()
    while True:
        hung = workers.kill_hung(grace)
        for name, quiet in hung.items():
            print(f"worker {name} hung (no sign of life for {quiet:.0f} s, e.g. stopped or stuck reading data): "
                  "killed", flush=True)
        running = workers.running  # before poll(): a worker that dies in between is seen by poll()
        for name, (code, pid) in workers.poll().items():
            worker_died(launch, workers, name, code, pid, hung)
        failures.report(launch.study)
        if budget.failure_streak(launch.sweep, launch.study) or not (running or workers.running):
            return
        view.show(live.lines(launch.sweep, launch.study, workers, started))
        time.sleep(parent.POLL_S)


def worker_died(launch: Launch, workers: pool.Pool, name: str, code: int, pid: int, hung: dict[str, float]) -> None:
    """Its trial reaped (queued again within max_retries), the death said, the worker started again unless
    max_failures stops the sweep or it keeps dying without a trial to blame."""
    sweep, study = launch.sweep, launch.study
    what = f"hung for {hung[name]:.0f} s, killed" if name in hung else pool.describe_exit(code)
    parent.reap(study, sweep, launch.uri, launch.storage, f"worker {name} died ({what})")
    blamed = parent.blamed_trial(study, pid)
    print(f"worker {name} died ({what})" + (f" running trial {blamed.number}" if blamed else "")
          + f"; see {launch.out_dir / 'workers' / (name + '.log')}", flush=True)
    # A death while running a trial is the trial's (its retries are limited by max_retries).
    if budget.failure_streak(sweep, study):
        return
    if not workers.restart(name, charged=blamed is None):
        print(f"worker {name} died {pool.MAX_RESTARTS + 1} times without a trial to blame: not restarted")


def stop_workers(workers: pool.Pool, stop: Interrupted, out_dir: Path) -> None:
    """An orderly stop on SIGINT/SIGTERM/SIGHUP: each worker marks its trial and ends its MLflow run KILLED."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the orderly stop short
    if str(stop) == "SIGHUP":  # no terminal to print to any more: the rest goes to the sweep's log
        sys.stdout = sys.stderr = open(out_dir / "sweep.log", "a", buffering=1)  # noqa: SIM115 - until exit
    print(f"\n{worker.describe(stop)}: stopping workers (each marks its trial and ends its MLflow run KILLED) ...")
    workers.stop(sig=signal.Signals[str(stop)] if str(stop) in ("SIGINT", "SIGTERM") else signal.SIGTERM)


def worker_command(args) -> None:
    sweep = spec.from_args(args, check=not args.no_check)
    out_dir, storage = studies.locate(sweep, args.storage, args.out)
    deadline = args.deadline if args.deadline is not None else worker.deadline_from(sweep.spec.timeout, time.time())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    interrupts.install()
    worker.follow_parent()
    liveness.start()
    # The pool gives each worker its share of the cores; a worker started by hand uses torch's default.
    threads = settings.get("LAB_TORCH_THREADS")
    given = {key for key in studies.BUDGET_KEYS if getattr(args, key, None) is not None}
    try:
        ran = worker.work(sweep, storage, out_dir, args.worker_id or f"worker-{os.getpid()}", deadline, threads,
                          given=given)
    except Interrupted as stop:
        print(f"worker stopped by {worker.describe(stop)}", file=sys.stderr)
        sys.exit(parent.EXIT_INTERRUPTED)
    except worker.FailureLimit as limit:
        print(f"worker stopped: {limit} (max_failures={sweep.spec.max_failures}). Reason(s):", file=sys.stderr)
        for reason in sorted({budget.fail_reason(t) for t in limit.streak}):
            print(f"  - {reason}", file=sys.stderr)
        print(f"Fix the cause, then start a new launch with `lab sweep {args.sweep_file} ...` (or --prepare).",
              file=sys.stderr)
        sys.exit(pool.EXIT_HALTED)
    print(f"worker done: {ran} trial(s)")
    if not os.environ.get(pool.PARENT_ENV):  # started by hand: maybe the last one of a cluster sweep
        closed = outcome.close_if_done(sweep, studies.load(sweep, storage, "lab worker"), tracking.tracking_uri(),
                                       storage)
        if closed:
            print(f"the sweep is done: closed its MLflow parent run {closed} with the summary")
