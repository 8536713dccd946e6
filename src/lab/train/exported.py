"""The trained net as an MLflow model: loads with mlflow.pytorch.load_model, predicts class probabilities.

Predictor takes what the training pipeline feeds the net (float (N, C, H, W), scaled to [0, 1], then
normalised with the metadata's mean and std) and returns (N, K) class probabilities. The metadata
(class_names, input_shape, mean, std, loss, data) says how to prepare an image for it; `lab predict` reads it.
Loading needs lab installed: the pickled model names lab's classes. Pickled, not MLflow 3's default torch.export
(pt2): that fixed the batch size at the example's 1 and fails on nets export cannot trace.
"""
import copy
import importlib.metadata
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from mlflow.tracking import MlflowClient

from lab.errors import LabError
from lab.train.module import Classifier, probabilities

# MLflow warns on every pickled model; lab pickles on purpose (see above) and its users cannot act on it.
logging.getLogger("mlflow.pytorch").addFilter(lambda record: "Pickle or CloudPickle" not in record.getMessage())
NAME = "model"
URI_TAG = "lab.model_uri"


class Predictor(torch.nn.Module):
    def __init__(self, net: torch.nn.Module, loss: str = "cross_entropy"):
        super().__init__()
        self.net, self.loss = net, loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: normalised float (N, C, H, W) -> (N, K) float32 class probabilities."""
        return probabilities(self.net(x), self.loss)


def metadata(datamodule, loss: str = "cross_entropy") -> dict:
    """What a user of the model needs beside it, from a set-up TensorDataModule."""
    return {"class_names": list(datamodule.class_names), "input_shape": [int(d) for d in datamodule.shape],
            "mean": [float(v) for v in datamodule.mean], "std": [float(v) for v in datamodule.std],
            "loss": loss, "data": datamodule.name}


def example_input(datamodule) -> np.ndarray:
    """The first test image as the model takes it: (1, C, H, W) float32, normalised."""
    x = datamodule.splits["test"].x[:1]
    return datamodule.prepare_batch(x.cpu(), training=False).contiguous().numpy()


def requirements() -> list[str]:
    """Pinned torch and cloudpickle (what mlflow.pytorch needs), given up front: MLflow's own inference of
    them loads the model again in a subprocess (seconds per run)."""
    out = []
    for pkg in ("torch", "cloudpickle"):
        try:
            out.append(f"{pkg}=={importlib.metadata.version(pkg).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            out.append(pkg)
    return out


@contextmanager
def _tracking(uri: str):
    """mlflow's global tracking URI set to uri for the duration (log_model takes it from there), then put back
    as it was, $MLFLOW_TRACKING_URI included: MLflow's own _use_tracking_uri deletes that variable on the way
    out, and a sweep worker's next trial would then log to ./mlflow.db."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    if mlflow.get_tracking_uri() == uri:
        yield
        return
    before, env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def log(run_id: str, model: Classifier | torch.nn.Module, data, uri: str, example: np.ndarray | None = None,
        loss: str | None = None, step: int = 0) -> str:
    """Logs the net as the run's MLflow model `model` and tags the run lab.model_uri; returns the model URI.

    model: a Classifier (its net and loss) or a bare net (then loss, default cross_entropy). data: a set-up
    datamodule, or the metadata dict (metadata() of one). example: one normalised input (1, C, H, W); default:
    the datamodule's first test image, or zeros of metadata's input_shape. step: the run's metrics at this step
    are attached to the model (MLflow copies them), e.g. the test step.
    """
    import mlflow.pytorch
    from mlflow.models import infer_signature

    net = model.net if isinstance(model, Classifier) else model
    loss = model.loss if isinstance(model, Classifier) else (loss or "cross_entropy")
    meta = dict(data) if isinstance(data, dict) else metadata(data, loss)
    meta["loss"] = loss
    if example is None:
        example = (example_input(data) if not isinstance(data, dict)
                   else np.zeros([1, *meta["input_shape"]], dtype=np.float32))
    # A CPU float32 copy: loads on any machine; the training net (maybe on a GPU, channels_last) is untouched.
    predictor = Predictor(copy.deepcopy(net).to("cpu", torch.float32).to(memory_format=torch.contiguous_format),
                          loss).eval()
    with torch.no_grad():
        output = predictor(torch.from_numpy(example)).numpy()
    client = MlflowClient(uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    # Created here, not by log_model: without an active fluent run it would put the model in experiment 0.
    logged = client.create_logged_model(experiment_id, name=NAME, source_run_id=run_id, model_type="classifier")
    try:
        with _tracking(uri):
            info = mlflow.pytorch.log_model(predictor, name=NAME, model_id=logged.model_id, run_id=run_id,
                                            input_example=example, signature=infer_signature(example, output),
                                            metadata=meta, pip_requirements=requirements(), step=step,
                                            serialization_format="pickle")
    except BaseException:
        client.finalize_logged_model(logged.model_id, "FAILED")
        raise
    client.finalize_logged_model(logged.model_id, "READY")
    client.set_tag(run_id, URI_TAG, info.model_uri)
    return info.model_uri


def load(model_uri: str, uri: str, map_location: str = "cpu") -> Predictor:
    """mlflow.pytorch.load_model of a models:/ or runs:/ URI from the store at uri (MLflow resolves those URIs
    through its global tracking URI, which Lightning resets to whichever store trained last)."""
    import mlflow.pytorch

    with _tracking(uri):
        return mlflow.pytorch.load_model(model_uri, map_location=map_location)


def info(model_uri: str, uri: str):
    """mlflow.models.get_model_info (metadata, signature) from the store at uri."""
    import mlflow.models

    with _tracking(uri):
        return mlflow.models.get_model_info(model_uri)


def rebuild(client: MlflowClient, run_id: str, uri: str):
    """(Classifier with the run's tested weights, its set-up datamodule), for a run that logged no model (a sweep
    with log_models: best): its config.yaml built again, which reads the data (class names, shape and
    normalisation come from it), and its checkpoint tag loaded. LabError when either is missing."""
    from lab.train import job  # job logs models through this module: imported when used

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
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    from omegaconf import OmegaConf

    try:
        with _tracking(uri):
            text = mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml")
    except (MlflowException, OSError) as err:
        raise LabError(f"run {run_id} has no config.yaml artifact to rebuild its model from ({err})") from err
    return OmegaConf.create(text)
