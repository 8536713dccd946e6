"""A finished (or running) sweep, opened for the commands that read it afterwards: `lab confirm`, `lab report`."""
from pathlib import Path

import optuna

from lab import spec, sweep_tracking, tracking
from lab import study as studies
from lab.errors import LabError
from lab.sweep import absolute_uri, locations


def open_study(args) -> tuple[spec.Sweep, Path, optuna.Study]:
    """The sweep file, its output folder and its study; args has sweep_file, storage, out."""
    sweep = spec.load(args.sweep_file, check=False)
    out_dir, storage = locations(args, sweep)
    missing = LabError(f"no study {sweep.spec.study!r} in {tracking.mask_password(storage)}: run `lab sweep "
                       f"{args.sweep_file}` first, or pass --storage/--out where it ran.")
    if not studies.is_rdb(storage) and not Path(storage).is_file():
        raise missing  # opening a journal that is not there would create an empty one
    try:
        study = optuna.load_study(study_name=sweep.spec.study, storage=studies.open_storage(storage))
    except KeyError as err:
        raise missing from err
    return sweep, out_dir, study


def mlflow_uri() -> str:
    return absolute_uri(tracking.tracking_uri())


def parent_run_id(study: optuna.Study) -> str:
    run_id = study.user_attrs.get(sweep_tracking.PARENT_ATTR)
    if not run_id:
        raise LabError(f"study {study.study_name!r} has no MLflow parent run (it was not started by `lab sweep`).")
    return run_id


def add_study_arguments(parser) -> None:
    parser.add_argument("sweep_file")
    parser.add_argument("--storage", default=None, help="Optuna storage: journal file path or RDB URL")
    parser.add_argument("--out", default=None, help="the sweep's output folder (default: runs/<study>)")
