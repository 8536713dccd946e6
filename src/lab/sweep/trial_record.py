"""The record that ties a trial to its MLflow run, and every key of it: Optuna is the source of truth.

The trial's user attr RUN_ID names its run (what every command that reads a study follows); the run's tags
name its trial and how the trial ended, for MLflow's own views and searches and for the runs whose trial never
recorded them (records.end_orphaned_runs). Written only here: run_tags() when the run is created, link() once
it exists, mark() when the trial ends.
"""
import optuna
from mlflow.tracking import MlflowClient

RUN_ID = "mlflow_run_id"  # trial user attr: the id of the trial's MLflow run
NUMBER_TAG = "trial.number"  # run tag: the trial's number in its study
STATE_TAG = "trial.state"  # run tag: how the trial ended (COMPLETE, PRUNED, FAIL, RETRIED, INTERRUPTED)
REASON_TAG = "trial.reason"  # run tag: why it failed, was pruned or was cut off
MAX_REASON_CHARS = 5000  # MLflow's limit on a tag value is 8000 characters (SQL stores)


def run_tags(trial: optuna.Trial) -> dict[str, str]:
    """The tags the trial's run is created with (its side of the record)."""
    return {NUMBER_TAG: str(trial.number)}


def link(trial: optuna.Trial, run_id: str) -> None:
    """The trial's side: set once its run exists, before it trains."""
    trial.set_user_attr(RUN_ID, run_id)


def run_id(trial: optuna.trial.FrozenTrial | optuna.Trial) -> str | None:
    return trial.user_attrs.get(RUN_ID)


def number(tags: dict[str, str]) -> int:
    """The trial number a run's tags name; -1 for a run that names none."""
    return int(tags.get(NUMBER_TAG, -1))


def mark(client: MlflowClient, run: str, state: str, reason: str | None) -> None:
    """How the trial ended, on its run."""
    client.set_tag(run, STATE_TAG, state)
    if reason:
        client.set_tag(run, REASON_TAG, reason[:MAX_REASON_CHARS])


def said(tags: dict[str, str]) -> str:
    """The reason the run's tags give, "" for none."""
    return tags.get(REASON_TAG, "")
