"""`lab sweep`, `lab worker` (`lab best` is analysis/best.py): sweep file -> Optuna study -> workers on GPUs/CPUs -> trials.

The parent process validates everything, creates the MLflow DB and the study before any worker starts
(16 processes migrating a fresh SQLite schema at once can corrupt it), then watches the pool.
"""
import logging
import os
import signal
import sys
import time

import optuna
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from lab import config, interrupts, settings
from lab.errors import DISK_FULL, Interrupted, LabError, says_disk_full
from lab.sweep import budget, live, liveness, outcome, patience, pool, reachability, records, spec, worker
from lab.sweep import stop as stop_rules
from lab.sweep import study as studies
from lab.sweep.slurm import follow as slurm
from lab.sweep.slurm import settings as slurm_settings
from lab.train import tracking
from lab.uris import absolute_uri, mask_password

log = logging.getLogger(__name__)
EXIT_INTERRUPTED = 130
POLL_S = 1.0


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
    return pool.placement(gpus, per_gpu, args.workers or 1, os.cpu_count() or 1)


def reap(study: optuna.Study, sweep: spec.Sweep, uri: str, storage: str,
         dead_pid_reason: str | None = None) -> list[optuna.trial.FrozenTrial]:
    abandon = records.abandoner(uri, sweep.spec.max_retries)
    with budget.budget_lock(storage, sweep.spec.study):
        return budget.reap(study, storage, lambda trial, why: abandon(study, trial, why), dead_pid_reason)


def blamed_trial(study: optuna.Study, pid: int) -> optuna.trial.FrozenTrial | None:
    """The trial a dead worker process was running when it died (reaped by now, by us or another worker)."""
    mine = budget.trials_of_process(study, pid)
    if mine and (mine[-1].state == TrialState.RUNNING or "died" in mine[-1].user_attrs.get("fail_reason", "")):
        return mine[-1]
    return None


class Failures:
    """Prints each new reason for a failed trial once, as soon as it is seen."""

    def __init__(self, study: optuna.Study):
        self.seen = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
        self.reasons: set[str] = set()

    def report(self, study: optuna.Study) -> None:
        trials = study.get_trials(deepcopy=False)
        again = budget.retried(trials)
        for t in trials:
            if t.state != TrialState.FAIL or t.number in self.seen or t.number in again:
                continue
            self.seen.add(t.number)
            reason = budget.fail_reason(t)
            if reason not in self.reasons:
                self.reasons.add(reason)
                print(f"trial {t.number} failed: {reason}", flush=True)


def sweep_command(args) -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # this command says what happened in its own words
    launcher_overrides = slurm_settings.take_overrides(args)  # launcher.KEY=VALUE: not the trials' overrides
    sweep = spec.from_args(args, check=False)  # the file and the options first: a typo is said in ~3 s, not ~6 s
    out_dir, storage = studies.locate(sweep, args.storage, args.out)
    array = slurm.prepare(args, sweep, launcher_overrides, out_dir, storage) if launcher_overrides is not None else None
    slots = choose_slots(args, sweep) if array is None else []
    studies.make_sampler(sweep), studies.make_pruner(sweep)  # their options are checked before a file exists
    spec.check_trials(sweep)
    for note in sweep.notes:
        print(f"note: {note}")
    uri = absolute_uri(tracking.tracking_uri())
    said = len(sweep.notes)
    study = studies.create_or_resume(sweep, storage, repair=True)  # refuses a changed sweep before MLflow is touched
    for note in sweep.notes[said:]:  # what a warm start dropped
        print(f"note: {note}")
    why = stop_rules.reason(sweep.spec.stop, sweep.spec.metric, study)
    if why:
        print(f"study {sweep.spec.study}: its stop rule already holds ({why}); nothing to train. Change or remove "
              f"`stop:` in {sweep.path} to go on.")
        outcome.print_best(sweep, study)
        return
    records.check_store(study, uri)
    tracking.experiment_id(uri, sweep.mlflow_experiment)
    studies.begin_launch(sweep, study)
    reaped = reap(study, sweep, uri, storage)
    parent = records.parent_run(study, sweep, uri, storage)
    records.end_orphaned_runs(MlflowClient(uri), parent, study)
    if args.prepare:  # cluster use: the study and parent run exist before N `lab worker`s join
        print(f"prepared study {sweep.spec.study} in {mask_password(storage)}; MLflow parent run {parent}")
        return
    started = time.time()
    deadline = worker.deadline_from(sweep.spec.timeout, started)

    used = budget.used_budget(study)
    print(f"study {sweep.spec.study}: {used}/{sweep.spec.n_trials} trials already used"
          + (f", {len(reaped)} stale trial(s) re-queued" if reaped else ""))
    if used >= sweep.spec.n_trials and not budget.queued_retries(study):
        print(f"nothing to run: the budget of {sweep.spec.n_trials} trials is spent ({used} used); "
              f"--n-trials N with N > {used} runs N - {used} more.")
    print(f"storage: {mask_password(storage)}   (optuna-dashboard {mask_password(storage)})")
    print(f"mlflow:  {mask_password(uri)}  experiment {sweep.mlflow_experiment!r}, parent run {parent}")

    worker_args = [str(sweep.path), "--storage", storage, "--out", str(out_dir), "--study", sweep.spec.study,
                   "--n-trials", str(sweep.spec.n_trials), "--max-failures", str(sweep.spec.max_failures),
                   "--max-retries", str(sweep.spec.max_retries), *sweep.base_overrides, "--no-check"]
    if deadline is not None:
        worker_args += ["--deadline", str(deadline)]
    if array is not None:  # the workers are SLURM array tasks
        return slurm.launch(args, array, sweep, study, parent, uri, storage, out_dir, worker_args, deadline)
    print(f"workers: {len(slots)} ({', '.join(s.name for s in slots)}); logs in {out_dir / 'workers'}")
    # Workers inherit this process's environment plus their slot's, and write to the same MLflow store.
    workers = pool.Pool(slots, worker_args, out_dir / "workers", env={"MLFLOW_TRACKING_URI": uri})
    view = live.LiveView(live=False if args.no_live else None, notes=reachability.TrackingWatch(uri).notes)
    failures = Failures(study)
    interrupted = None
    interrupts.install((signal.SIGTERM, signal.SIGINT, signal.SIGHUP))  # SIGHUP: the terminal was closed
    grace = liveness.grace_s()
    try:
        workers.start()
        while True:
            hung = workers.kill_hung(grace)
            for name, quiet in hung.items():
                print(f"worker {name} hung (no sign of life for {quiet:.0f} s, e.g. stopped or stuck reading data): "
                      "killed", flush=True)
            running = workers.running  # before poll(): a worker that dies in between is seen by poll()
            for name, (code, pid) in workers.poll().items():
                what = f"hung for {hung[name]:.0f} s, killed" if name in hung else pool.describe_exit(code)
                reap(study, sweep, uri, storage, f"worker {name} died ({what})")
                blamed = blamed_trial(study, pid)
                print(f"worker {name} died ({what})" + (f" running trial {blamed.number}" if blamed else "")
                      + f"; see {out_dir / 'workers' / (name + '.log')}", flush=True)
                # A death while running a trial is the trial's (its retries are limited by max_retries).
                if budget.failure_streak(sweep, study):
                    continue
                if not workers.restart(name, charged=blamed is None):
                    print(f"worker {name} died {pool.MAX_RESTARTS + 1} times without a trial to blame: not restarted")
            failures.report(study)
            if budget.failure_streak(sweep, study) or not (running or workers.running):
                break
            view.show(live.lines(sweep, study, workers, started))
            time.sleep(POLL_S)
    except Interrupted as stop:
        interrupted = stop
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the orderly stop short
        if str(stop) == "SIGHUP":  # no terminal to print to any more: the rest goes to the sweep's log
            sys.stdout = sys.stderr = open(out_dir / "sweep.log", "a", buffering=1)  # noqa: SIM115 - until exit
        print(f"\n{worker.describe(stop)}: stopping workers (each marks its trial and ends its MLflow run KILLED) ...")
        workers.stop(sig=signal.Signals[str(stop)] if str(stop) in ("SIGINT", "SIGTERM") else signal.SIGTERM)
    except patience.StorageUnreachable as lost:  # longer than LAB_STORAGE_OUTAGE_S: said in one sentence
        workers.stop()
        records.end_parent(MlflowClient(uri), parent, patience.reason(lost.why))
        raise
    except BaseException:
        workers.stop()  # the parent owns its workers to the end: none goes on without it
        raise
    streak = budget.failure_streak(sweep, study)
    if streak and not interrupted:
        workers.stop()  # the rest of the pool asks for no new trial either; running ones are cut short
    reap(study, sweep, uri, storage)
    failures.report(study)
    view.show(live.lines(sweep, study, workers, started))
    finish(sweep, study, parent, uri, interrupted, streak, deadline)


def finish(sweep, study, parent: str, uri: str, interrupted, streak, deadline) -> None:
    """The parent run's summary and status, the best trial, and the exit status that says how it ended."""
    client = MlflowClient(uri)
    records.end_orphaned_runs(client, parent, study)
    skipped = records.log_summary(client, parent, study)
    if not interrupted:
        records.log_best_model(client, uri, sweep, study)
    used = budget.used_budget(study)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    why = None if interrupted or streak else stop_rules.reason(sweep.spec.stop, sweep.spec.metric, study)
    ended = budget.done(sweep, study, studies.make_sampler(sweep)) or deadline is not None or why is not None
    outcome.record_stop(client, parent, study, why)
    if interrupted:
        status = "KILLED"
    else:
        status = "FINISHED" if ended and complete and not streak else "FAILED"
    client.set_terminated(parent, status)
    if skipped and complete:
        print(f"plots not drawn yet (need more completed trials): {', '.join(skipped)}")
    outcome.print_best(sweep, study)
    if why:
        print(f"stopped: {why} ({used}/{sweep.spec.n_trials} trials used).")
    if interrupted:
        print(f"interrupted: run the same command again to resume ({used}/{sweep.spec.n_trials} trials used).")
        sys.exit(EXIT_INTERRUPTED)
    launch = study.user_attrs.get(studies.LAUNCH_ATTR, -1)
    if status == "FAILED" and any(says_disk_full(budget.fail_reason(t)) for t in
                                  study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number > launch):
        print(f"lab: error: {DISK_FULL.format(where='')}", file=sys.stderr)
    if streak:
        reasons = sorted({budget.fail_reason(t) for t in streak})
        print(f"stopped: {len(streak)} trials in a row failed (max_failures={sweep.spec.max_failures}), "
              f"{used}/{sweep.spec.n_trials} trials used. Reason(s):", file=sys.stderr)
        for reason in reasons:
            print(f"  - {reason}", file=sys.stderr)
        print("Fix the cause and run the same command again: failed trials do not use up n_trials.",
              file=sys.stderr)
        sys.exit(1)
    if not complete:
        print(f"no trial finished ({used}/{sweep.spec.n_trials} trials used); see the reasons above and the "
              "worker logs.", file=sys.stderr)
        sys.exit(1)
    if status == "FAILED":
        print(f"workers stopped before the budget was spent ({used}/{sweep.spec.n_trials}); see their logs.",
              file=sys.stderr)
        sys.exit(1)


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
        sys.exit(EXIT_INTERRUPTED)
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
