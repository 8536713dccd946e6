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

log = logging.getLogger(__name__)
EXIT_INTERRUPTED = 130
POLL_S = 1.0


def absolute_uri(uri: str) -> str:
    """sqlite:///relative.db -> sqlite:////abs/relative.db, so workers in any cwd write to the same DB."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def locations(args, sweep: spec.Sweep) -> tuple[Path, str]:
    out_dir = Path(args.out or Path("runs") / sweep.spec.study).resolve()
    storage = args.storage or studies.default_storage(out_dir)
    if not studies.is_rdb(storage):
        storage = str(Path(storage).resolve())
    return out_dir, storage


def reap(study: optuna.Study, uri: str, storage: str, out_dir: Path) -> int:
    with worker.budget_lock(None if studies.is_rdb(storage) else out_dir / "budget.lock"):
        return worker.reap(study, uri, storage)


def choose_slots(args, sweep: spec.Sweep) -> list[pool.Slot]:
    visible = torch.cuda.device_count()
    gpus = pool.parse_gpus(args.gpus, visible)
    if args.workers is not None and args.gpus is None:
        gpus = []  # --workers alone means CPU workers, even on a GPU machine
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


def sweep_command(args) -> None:
    sweep = spec.load(args.sweep_file, args.overrides, args.n_trials)
    out_dir, storage = locations(args, sweep)
    uri = absolute_uri(tracking.tracking_uri())
    os.environ["MLFLOW_TRACKING_URI"] = uri  # inherited by every worker
    tracking.experiment_id(uri, sweep.mlflow_experiment)
    study = studies.create_or_resume(sweep, storage, repair=True)
    reaped = reap(study, uri, storage, out_dir)
    parent = sweep_tracking.parent_run(study, sweep, uri, storage)
    if args.prepare:  # cluster use: the study and parent run exist before N `lab worker`s join
        print(f"prepared study {sweep.spec.study} in {tracking.mask_password(storage)}; MLflow parent run {parent}")
        return
    slots = choose_slots(args, sweep)
    started = time.time()
    deadline = worker.deadline_from(sweep.spec.timeout, started)

    done = studies.used_budget(study)
    print(f"study {sweep.spec.study}: {done}/{sweep.spec.n_trials} trials already used"
          + (f", {reaped} stale trial(s) re-queued" if reaped else ""))
    print(f"storage: {tracking.mask_password(storage)}   (optuna-dashboard {tracking.mask_password(storage)})")
    print(f"mlflow:  {tracking.mask_password(uri)}  experiment {sweep.mlflow_experiment!r}, parent run {parent}")
    print(f"workers: {len(slots)} ({', '.join(s.name for s in slots)}); logs in {out_dir / 'workers'}")

    worker_args = [str(sweep.path), "--storage", storage, "--out", str(out_dir), *(
        ["--n-trials", str(sweep.spec.n_trials)] if args.n_trials else []), *args.overrides]
    if deadline is not None:
        os.environ["LAB_DEADLINE"] = str(deadline)
    workers = pool.Pool(slots, worker_args, out_dir / "workers")
    view = live.LiveView(live=False if args.no_live else None)
    interrupted = None
    signal.signal(signal.SIGTERM, raise_interrupted)
    signal.signal(signal.SIGINT, raise_interrupted)
    try:
        workers.start()
        while workers.running:
            for name in workers.poll():
                print(f"worker {name} exited with an error; see {out_dir / 'workers' / (name + '.log')}")
                reap(study, uri, storage, out_dir)
            view.show(live.lines(sweep, study, workers, started))
            time.sleep(POLL_S)
        workers.poll()
    except Interrupted as stop:
        interrupted = stop
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the orderly stop short
        print(f"\n{stop}: stopping workers (each marks its trial and ends its MLflow run KILLED) ...")
        workers.stop()
    reap(study, uri, storage, out_dir)
    view.show(live.lines(sweep, study, workers, started))
    client = MlflowClient(uri)
    skipped = sweep_tracking.log_summary(client, parent, study)
    used = studies.used_budget(study)
    status = "KILLED" if interrupted else ("FINISHED" if used >= sweep.spec.n_trials or deadline else "FAILED")
    client.set_terminated(parent, status)
    if skipped:
        print(f"plots not drawn yet (need more completed trials): {', '.join(skipped)}")
    print_best(sweep, study)
    if interrupted:
        print(f"interrupted: run the same command again to resume ({used}/{sweep.spec.n_trials} trials used).")
        sys.exit(EXIT_INTERRUPTED)
    if status == "FAILED":
        print(f"workers stopped before the budget was spent ({used}/{sweep.spec.n_trials}); see their logs.")
        sys.exit(1)


def worker_command(args) -> None:
    sweep = spec.load(args.sweep_file, args.overrides, args.n_trials, check=not os.environ.get("LAB_SPAWNED"))
    out_dir, storage = locations(args, sweep)
    deadline = float(os.environ["LAB_DEADLINE"]) if os.environ.get("LAB_DEADLINE") else \
        worker.deadline_from(sweep.spec.timeout, time.time())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        ran = worker.work(sweep, storage, out_dir, args.worker_id or f"worker-{os.getpid()}", deadline)
    except Interrupted as stop:
        print(f"worker stopped by {stop}", file=sys.stderr)
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
    print("replay: lab train " + shlex.join([*sweep.base_overrides, *sweep.trial_overrides(best.params)]))
    return best


def experiment_yaml(sweep: spec.Sweep, trial: optuna.trial.FrozenTrial) -> str:
    """An experiment config equal to the trial: the base experiment, group choices, then values."""
    groups, values = [], OmegaConf.create({})
    overrides = [*sweep.spec.overrides, *sweep.extra_overrides, *sweep.trial_overrides(trial.params)]
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if (config.conf_dir() / key).is_dir():  # a config group: choose it in the defaults list
            groups.append({f"override /{key}": override.value()})
        else:
            OmegaConf.update(values, key, override.value(), force_add=True)
    defaults = ([f"/experiment/{sweep.spec.experiment}"] if sweep.spec.experiment else []) + groups + ["_self_"]
    header = (f"# @package _global_\n# Best trial {trial.number} of study {sweep.spec.study}: "
              f"{sweep.spec.metric}={trial.value:.6g}\n# params: {json.dumps(trial.params)}\n")
    return header + OmegaConf.to_yaml(OmegaConf.merge({"defaults": defaults}, values))


def best_command(args) -> None:
    sweep = spec.load(args.sweep_file, check=False)
    _, storage = locations(args, sweep)
    try:
        study = optuna.load_study(study_name=sweep.spec.study, storage=studies.open_storage(storage))
    except KeyError as err:
        raise LabError(f"no study {sweep.spec.study!r} in {tracking.mask_password(storage)}: run `lab sweep "
                       f"{args.sweep_file}` first, or pass --storage where it ran.") from err
    best = print_best(sweep, study)
    if best is None:
        raise LabError(f"study {sweep.spec.study!r} has no completed trial to export.")
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
