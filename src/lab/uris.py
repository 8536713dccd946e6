"""Storage and tracking addresses as users type them: made absolute for workers, masked for printing."""
import re
from pathlib import Path


def mask_password(text: str) -> str:
    """scheme://user:secret@host -> scheme://user:***@host, for anything printed, logged or tagged."""
    return re.sub(r"(://[^:/@\s]+:)[^@/\s]+@", r"\1***@", str(text))


def absolute_uri(uri: str) -> str:
    """sqlite:///relative.db -> sqlite:////abs/relative.db, so workers in any cwd write to the same DB."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The file of a sqlite:/// URI (relative or absolute); None for any other kind of store."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def is_rdb(storage: str) -> bool:
    return "://" in storage


# MLflow 3.x's UI shows an experiment in its GenAI or its model-training view by a switch kept in the browser
# (the URL's workflowType, then local storage); the experiment tag mlflow.experimentKind alone does not turn it.
TRAINING_VIEW = "workflowType=machine_learning"


def experiment_url(server: str, experiment_id: str) -> str:
    return f"{mask_password(server).rstrip('/')}/#/experiments/{experiment_id}?{TRAINING_VIEW}"


def run_url(server: str, experiment_id: str, run_id: str) -> str:
    return f"{mask_password(server).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{TRAINING_VIEW}"
