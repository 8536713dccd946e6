"""`lab sweep`, `lab worker`, `lab best`: sweep file -> Optuna study -> workers on GPUs/CPUs -> trials.

The parent process validates everything, creates the MLflow DB and the study before any worker starts
(16 processes migrating a fresh SQLite schema at once can corrupt it), then watches the pool.
"""
import json
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import optuna
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.trial import TrialState

from lab import config, live, pool, spec, sweep_tracking, tracking, worker
from lab import study as studies
from lab.errors import Interrupted, LabError, raise_interrupted
from lab.uris import absolute_uri, is_rdb, mask_password

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
        from lab import train  # Lightning's imports (~7 s), only for this measurement

        _, model = train.build(config.load(sweep.base_overrides))
        n_params = sum(p.numel() for p in model.parameters())
        memory = min(torch.cuda.get_device_properties(g).total_memory for g in gpus)
        per_gpu = pool.auto_per_gpu(n_params, memory)
        print(f"--workers-per-gpu auto: {n_params / 1e6:.2f}M parameters -> {per_gpu} per GPU")
    elif gpus:
        try:
            per_gpu = int(args.workers_per_gpu)
        except ValueError as err:
            raise LabError(f"--workers-per-gpu={args.workers_per_gpu!r} is not valid: an integer >= 1 or 'auto'.") from err
    return pool.placement(gpus, per_gpu, args.workers or 1, os.cpu_count() or 1)


def reap(study: optuna.Study, sweep: spec.Sweep, uri: str, storage: str, out_dir: Path,
         reason: str = "worker process died") -> list[optuna.trial.FrozenTrial]:
    abandon = sweep_tracking.abandoner(uri, sweep.spec.max_retries)
    with studies.budget_lock(storage, out_dir, sweep.spec.study):
        return studies.reap(study, storage, lambda trial: abandon(study, trial, reason))


class Failures:
    """Prints each new reason for a failed trial once, as soon as it is seen."""

    def __init__(self, study: optuna.Study):
        self.seen = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
        self.reasons: set[str] = set()

    def report(self, study: optuna.Study) -> None:
        trials = study.get_trials(deepcopy=False)
        again = studies.retried(trials)
        for t in trials:
            if t.state != TrialState.FAIL or t.number in self.seen or t.number in again:
                continue
            self.seen.add(t.number)
            reason = studies.fail_reason(t)
            if reason not in self.reasons:
                self.reasons.add(reason)
                print(f"trial {t.number} failed: {reason}", flush=True)


def sweep_command(args) -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # this command says what happened in its own words
    sweep = spec.from_args(args)
    out_dir, storage = studies.locate(sweep, args.storage, args.out)
    slots = choose_slots(args, sweep)
    for note in sweep.notes:
        print(f"note: {note}")
    uri = absolute_uri(tracking.tracking_uri())
    study = studies.create_or_resume(sweep, storage, repair=True)  # refuses a changed sweep before MLflow is touched
    tracking.experiment_id(uri, sweep.mlflow_experiment)
    studies.begin_launch(study)
    reaped = reap(study, sweep, uri, storage, out_dir)
    parent = sweep_tracking.parent_run(study, sweep, uri, storage)
    if args.prepare:  # cluster use: the study and parent run exist before N `lab worker`s join
        print(f"prepared study {sweep.spec.study} in {mask_password(storage)}; MLflow parent run {parent}")
        return
    started = time.time()
    deadline = worker.deadline_from(sweep.spec.timeout, started)

    print(f"study {sweep.spec.study}: {studies.used_budget(study)}/{sweep.spec.n_trials} trials already used"
          + (f", {len(reaped)} stale trial(s) re-queued" if reaped else ""))
    print(f"storage: {mask_password(storage)}   (optuna-dashboard {mask_password(storage)})")
    print(f"mlflow:  {mask_password(uri)}  experiment {sweep.mlflow_experiment!r}, parent run {parent}")
    print(f"workers: {len(slots)} ({', '.join(s.name for s in slots)}); logs in {out_dir / 'workers'}")

    worker_args = [str(sweep.path), "--storage", storage, "--out", str(out_dir), "--study", sweep.spec.study,
                   "--n-trials", str(sweep.spec.n_trials), "--max-failures", str(sweep.spec.max_failures),
                   "--max-retries", str(sweep.spec.max_retries), *sweep.base_overrides, "--no-check"]
    if deadline is not None:
        worker_args += ["--deadline", str(deadline)]
    # Workers inherit this process's environment plus their slot's, and write to the same MLflow store.
    workers = pool.Pool(slots, worker_args, out_dir / "workers", env={"MLFLOW_TRACKING_URI": uri})
    view = live.LiveView(live=False if args.no_live else None)
    failures = Failures(study)
    interrupted = None
    signal.signal(signal.SIGTERM, raise_interrupted)
    signal.signal(signal.SIGINT, raise_interrupted)
    try:
        workers.start()
        while True:
            running = workers.running  # before poll(): a worker that dies in between is seen by poll()
            for name, code in workers.poll().items():
                what = pool.describe_exit(code)
                lost = reap(study, sweep, uri, storage, out_dir, f"worker {name} died ({what})")
                ours = [t for t in lost if t.user_attrs.get("worker") == name]
                print(f"worker {name} died ({what})" + (f" running trial {ours[0].number}" if ours else "")
                      + f"; see {out_dir / 'workers' / (name + '.log')}", flush=True)
                # A death while running a trial is the trial's (its retries are limited by max_retries).
                if not workers.restart(name, charged=not ours):
                    print(f"worker {name} died {pool.MAX_RESTARTS + 1} times without a trial to blame: not restarted")
            failures.report(study)
            if studies.failure_streak(sweep, study) or not (running or workers.running):
                break
            view.show(live.lines(sweep, study, workers, started))
            time.sleep(POLL_S)
    except Interrupted as stop:
        interrupted = stop
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the orderly stop short
        print(f"\n{worker.describe(stop)}: stopping workers (each marks its trial and ends its MLflow run KILLED) ...")
        workers.stop(sig=signal.Signals[str(stop)] if str(stop) in signal.Signals.__members__ else signal.SIGTERM)
    streak = studies.failure_streak(sweep, study)
    if streak and not interrupted:
        workers.stop()  # the rest of the pool asks for no new trial either; running ones are cut short
    reap(study, sweep, uri, storage, out_dir)
    failures.report(study)
    view.show(live.lines(sweep, study, workers, started))
    finish(sweep, study, parent, uri, interrupted, streak, deadline)


def finish(sweep, study, parent: str, uri: str, interrupted, streak, deadline) -> None:
    """The parent run's summary and status, the best trial, and the exit status that says how it ended."""
    client = MlflowClient(uri)
    skipped = sweep_tracking.log_summary(client, parent, study)
    used = studies.used_budget(study)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    ended = studies.done(sweep, study, studies.make_sampler(sweep)) or deadline is not None
    if interrupted:
        status = "KILLED"
    else:
        status = "FINISHED" if ended and complete and not streak else "FAILED"
    client.set_terminated(parent, status)
    if skipped and complete:
        print(f"plots not drawn yet (need more completed trials): {', '.join(skipped)}")
    print_best(sweep, study)
    if interrupted:
        print(f"interrupted: run the same command again to resume ({used}/{sweep.spec.n_trials} trials used).")
        sys.exit(EXIT_INTERRUPTED)
    if streak:
        reasons = sorted({studies.fail_reason(t) for t in streak})
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
    signal.signal(signal.SIGTERM, raise_interrupted)
    signal.signal(signal.SIGINT, raise_interrupted)
    # The pool gives each worker its share of the cores; a worker started by hand uses torch's default.
    threads = int(os.environ.get("LAB_TORCH_THREADS") or 0)
    try:
        ran = worker.work(sweep, storage, out_dir, args.worker_id or f"worker-{os.getpid()}", deadline, threads,
                          join=not args.overrides)
    except Interrupted as stop:
        print(f"worker stopped by {worker.describe(stop)}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    print(f"worker done: {ran} trial(s)")


def print_best(sweep: spec.Sweep, study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        print("no completed trial yet")
        return None
    best = study.best_trial
    print(f"best trial {best.number}: {sweep.spec.metric}={best.value:.6g}")
    for name, value in best.params.items():
        print(f"  {name} = {value}")
    print("replay: lab train " + shlex.join(sweep.replay_overrides(best)))
    return best


def experiment_yaml(sweep: spec.Sweep, trial: optuna.trial.FrozenTrial) -> str:
    """An experiment config equal to the trial: the base experiment, group choices, then values."""
    experiments, groups, values = [], [], OmegaConf.create({})
    for override in OverridesParser.create().parse_overrides(sweep.replay_overrides(trial)):
        key = override.key_or_group
        if key == "experiment":
            experiments.append(f"/experiment/{override.value()}")
        elif (config.conf_dir() / key).is_dir():  # a config group: choose it in the defaults list
            groups.append({f"override /{key}": override.value()})
        else:
            OmegaConf.update(values, key, override.value(), force_add=True)
    header = (f"# @package _global_\n# Best trial {trial.number} of study {sweep.spec.study}: "
              f"{sweep.spec.metric}={trial.value:.6g}\n# params: {json.dumps(trial.params)}\n"
              f"# trained as: lab train {shlex.join(sweep.replay_overrides(trial))}\n")
    return header + OmegaConf.to_yaml(OmegaConf.merge({"defaults": [*experiments, *groups, "_self_"]}, values))


def best_command(args) -> None:
    sweep = spec.from_args(args, check=False)
    _, storage = studies.locate(sweep, args.storage, args.out)
    study = studies.load(sweep, storage)
    best = print_best(sweep, study)
    if best is None:
        raise LabError(f"study {sweep.spec.study!r} has no completed trial to export yet.")
    path = Path(args.export) if args.export else config.conf_dir() / "experiment" / f"{sweep.spec.study}_best.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(experiment_yaml(sweep, best))
    print(f"exported: {path}")
    if path.resolve().parent == (config.conf_dir() / "experiment").resolve():
        print(f"reproduce: lab train experiment={path.stem}")
    elif path.parent.name == "experiment":
        print(f"reproduce: lab train --config-dir {path.parent.parent} experiment={path.stem}")
    else:
        print(f"reproduce: move it to {config.conf_dir() / 'experiment'}/ and run lab train experiment={path.stem}")
