"""A run's model built again from what it recorded: its resolved config.yaml and its checkpoint tag.

For runs that logged no MLflow model (a sweep with log_models: best): `lab best` logs one from here, `lab
predict`/`lab ensemble` load them through here, `lab export` reads the config to score on the run's data.
"""
from pathlib import Path

import mlflow.artifacts
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from lab.errors import LabError
from lab.train import job
from lab.train.exported import tracking_at

# Classes a run's config.yaml may name from an earlier lab: where they are now. lab's own ResNet became timm's
# under the same keys on 2026-12-03 (its old head's state_dict keys are mapped by resnet.old_head).
MOVED = {"lab.train.nets.ResNet": "lab.train.resnet.ResNet"}


def rebuild(client: MlflowClient, run_id: str, uri: str):
    """(Classifier with the run's tested weights, its set-up datamodule), for a run that logged no model (a sweep
    with log_models: best): its config.yaml built again, which reads the data (class names, shape and
    normalisation come from it), and its checkpoint tag loaded. LabError when either is missing."""
    checkpoint = client.get_run(run_id).data.tags.get("checkpoint")
    if not checkpoint or not Path(checkpoint).is_file():
        where = f"its checkpoint {checkpoint} is not on this machine" if checkpoint else "it recorded no checkpoint"
        raise LabError(f"run {run_id} has no logged model and {where}")
    datamodule, module = job.build(run_config(run_id, uri))
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    module.load_state_dict(state["state_dict"])
    return module, datamodule


def run_config(run_id: str, uri: str):
    """The resolved config.yaml a run logged (what rebuilds it)."""
    try:
        with tracking_at(uri):
            text = mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml")
    except (MlflowException, OSError) as err:
        raise LabError(f"run {run_id} has no config.yaml artifact to rebuild its model from ({err})") from err
    cfg = OmegaConf.create(text)
    net = OmegaConf.select(cfg, "model.net")
    if net is not None and net.get("_target_") in MOVED:
        net._target_ = MOVED[net._target_]
    return cfg
