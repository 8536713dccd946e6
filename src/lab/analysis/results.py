"""A finished (or running) sweep, opened for the commands that read it afterwards: `lab best`, `lab confirm`,
`lab report`, `lab ensemble`."""
import os
from pathlib import Path

import mlflow
import optuna
from mlflow.tracking import MlflowClient

from lab.errors import LabError
from lab.sweep import records, spec
from lab.sweep import study as studies
from lab.train import tracking
from lab.uris import absolute_uri


def open_study(args) -> tuple[spec.Sweep, Path, optuna.Study, str]:
    """The sweep file (with the overrides its study was created with), its output folder, its study and the
    study's storage; args has sweep_file, storage, out, study. Creates nothing when there is no such study."""
    sweep = spec.from_args(args, check=False)
    out_dir, storage = studies.locate(sweep, args.storage, args.out)
    study = studies.load(sweep, storage)
    records.check_store(study, mlflow_uri(), resuming=False)  # its runs are in another store: say which
    return sweep, out_dir, study, storage


def mlflow_uri() -> str:
    return absolute_uri(tracking.tracking_uri())


def client() -> MlflowClient:
    # A progress bar per config.yaml read would drown the table the commands print.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = mlflow_uri()
    mlflow.set_tracking_uri(uri)  # mlflow.pytorch.load_model and models:/ URIs read the global one
    return MlflowClient(uri)


def parent_run_id(study: optuna.Study) -> str:
    run_id = study.user_attrs.get(records.PARENT_ATTR)
    if not run_id:
        raise LabError(f"study {study.study_name!r} has no MLflow parent run (it was not started by `lab sweep`).")
    return run_id
