"""The sweep's winner in MLflow's model registry: `lab best` registers it under the study's name, alias champion.

A registered model is what other code loads by name (models:/<study>@champion) without knowing run ids; the
alias moves to whichever winner `lab best` last found, and one run is registered as one version however
often `lab best` runs.
"""
import optuna
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from lab.analysis import results
from lab.sweep import ranking
from lab.train import tracking

ALIAS = "champion"


def logged_model_uri(client: MlflowClient, run_id: str) -> str:
    """The run's logged model; a run of a sweep that logged only its best trial's gets one now, from its
    checkpoint and config."""
    uri = client.get_run(run_id).data.tags.get(tracking.MODEL_TAG)
    if uri:
        return uri
    from lab.analysis import models  # torch's and Lightning's imports, only when a model must be logged
    from lab.train import exported

    module, datamodule = models.checkpointed(client, run_id, f"run {run_id}")
    return exported.log(run_id, module, datamodule, results.mlflow_uri())


def version_of(client: MlflowClient, name: str, run_id: str, uri: str, trial: int) -> str:
    """The version of `name` holding this run's model: the existing one, else a new one."""
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        return str(max(int(v.version) for v in existing))
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=f"The best trial of the lab sweep study {name!r}; "
                                                         f"alias {ALIAS} names the winner `lab best` found last.")
    # models:/m-<id>, a logged model (MLflow 3): the version links to it, and shows in the UI's Models column.
    model_id = uri.removeprefix("models:/") if uri.startswith("models:/m-") else None
    version = client.create_model_version(name, uri, run_id=run_id, model_id=model_id, tags={"trial": str(trial)})
    return str(version.version)


def register(study_name: str, trial: optuna.trial.FrozenTrial) -> str | None:
    """Registers the trial's model as study_name@champion and prints how to load it; a registry that cannot
    (a store without one, a server refusing) is a warning, and None is returned."""
    run_id = ranking.model_run_id(trial)
    if not run_id:
        print(f"warning: trial {trial.number} has no MLflow run, so no model was registered")
        return None
    client = results.client()
    try:
        uri = logged_model_uri(client, run_id)
        version = version_of(client, study_name, run_id, uri, trial.number)
        client.set_registered_model_alias(study_name, ALIAS, version)
    except Exception as err:  # noqa: BLE001 - after the export: a model not registered is said, not fatal
        print(f"warning: the model of trial {trial.number} (run {run_id}) was not registered in the model registry "
              f"of {results.mlflow_uri()}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
        return None
    target = f"models:/{study_name}@{ALIAS}"
    print(f"registered: {target} (version {version}, trial {trial.number}, run {run_id})")
    print(f"  load it:  mlflow.pytorch.load_model(\"{target}\")  (with MLFLOW_TRACKING_URI={results.mlflow_uri()})")
    print(f"  predict:  lab predict {target} IMAGES...")
    return version
