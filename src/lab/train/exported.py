"""The trained net as an MLflow model: loads with mlflow.pytorch.load_model, predicts class probabilities.

The logged model takes images as decoded: uint8 (N, C, H, W) pixels 0-255 (or float scaled to [0, 1]), and
returns (N, K) float32 class probabilities. It carries its normalisation (lab.data.normalise.Normalise, the
module training's prepare_batch applies, with the training split's mean and std as buffers), so that serving
cannot drift from training. The metadata (class_names, input_shape, input_type, mean, std, loss, data) says what
it takes and returns; `lab predict` reads it. A model logged before it carried its normalisation has no
input_type in its metadata and takes normalised floats (lab.analysis.models puts a Normalise in front of it).
What is logged is portable(): built of torch's (and torchvision's, timm's) own classes and Normalise, which is
pickled by value (its module imports torch alone), so that an environment MLflow builds from the model's
requirements (`mlflow models serve` without --env-manager local) loads it without lab. Pickled, not MLflow 3's
default torch.export (pt2): that fixed the batch size at the example's 1 and fails on nets export cannot trace.
"""
import copy
import importlib.metadata
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import cloudpickle
import numpy as np
import torch
from mlflow.tracking import MlflowClient

from lab import private
from lab.data import normalise
from lab.data.normalise import Normalise
from lab.train import tracking
from lab.train.module import Classifier

# mlflow.pytorch pickles with cloudpickle: Normalise's code goes into the model file, not a reference to lab.
cloudpickle.register_pickle_by_value(normalise)
BY_VALUE = {normalise.__name__}

# MLflow warns on every pickled model; lab pickles on purpose (see above) and its users cannot act on it.
logging.getLogger("mlflow.pytorch").addFilter(lambda record: "Pickle or CloudPickle" not in record.getMessage())
NAME = "model"
INPUT_TYPE = "uint8"  # what the logged model's signature takes: pixels as decoded


def metadata(datamodule, loss: str = "cross_entropy") -> dict:
    """What a user of the model needs beside it, from a set-up TensorDataModule."""
    return {"class_names": list(datamodule.class_names), "input_shape": [int(d) for d in datamodule.shape],
            "input_type": INPUT_TYPE, "mean": [float(v) for v in datamodule.mean],
            "std": [float(v) for v in datamodule.std], "loss": loss, "data": datamodule.name}


def normaliser(meta: dict) -> Normalise:
    """The metadata's mean and std as the module training applied (float32 -> float -> float32 is exact)."""
    return Normalise(meta["mean"], meta["std"])


def example_input(datamodule) -> np.ndarray:
    """The first test image as the model takes it: (1, C, H, W) uint8."""
    return datamodule.splits["test"].rows(slice(0, 1)).cpu().contiguous().numpy()


# Packages whose module classes a fresh environment installs by name; any other module's source is shipped.
INSTALLED = ("torch", "torchvision", "timm")


def plain_net(net: torch.nn.Module) -> torch.nn.Module:
    """net itself where lab's own net classes only wrap torch's, torchvision's or timm's modules: CNN is
    head(features(x)), a LayerStack is its layers, ResNet and TimmNet are their model. Other nets as they are."""
    from lab.train import nets

    if type(net) is nets.CNN:
        return torch.nn.Sequential(net.features, net.head)
    if isinstance(net, nets.LayerStack) and type(net).forward is nets.LayerStack.forward:
        return net.layers
    if isinstance(net, nets.PretrainedNet) and type(net).__module__ in ("lab.train.nets", "lab.train.timm_net", "lab.train.resnet"):
        return net.model
    return net


def portable(net: torch.nn.Module, loss: str = "cross_entropy", normalise: Normalise | None = None) -> torch.nn.Sequential:
    """normalise (when given: images in), plain_net(net), then softmax, as an nn.Sequential: module.probabilities
    of the net's outputs. For bce's one logit z a fixed Linear(1, 2) first (weights [[0], [1]], bias 0) gives
    class_logits' [0, z] exactly."""
    layers = [plain_net(net)] if normalise is None else [normalise, plain_net(net)]
    if loss == "bce":
        two = torch.nn.Linear(1, 2)
        with torch.no_grad():
            two.weight.copy_(torch.tensor([[0.0], [1.0]]))
            two.bias.zero_()
        layers.append(two.requires_grad_(False))
    return torch.nn.Sequential(*layers, torch.nn.Softmax(dim=1))


def logits_net(predictor: torch.nn.Sequential) -> torch.nn.Module:
    """The net (normalised images -> class logits) inside portable()'s Sequential: first after its Normalise."""
    return predictor[1] if isinstance(predictor[0], Normalise) else predictor[0]


def _pin(pkg: str) -> str:
    try:
        return f"{pkg}=={importlib.metadata.version(pkg).split('+')[0]}"  # 2.14.1+cpu -> the release's number
    except importlib.metadata.PackageNotFoundError:
        return pkg


def requirements(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """(pip requirements, code paths) that loading model needs in a fresh environment: torch and cloudpickle
    (what mlflow.pytorch unpickles with), torchvision and timm pinned when its modules are theirs, and the
    source file or package folder of any other module its classes live in (a user's own net). Given up front:
    MLflow's own inference of them loads the model again in a subprocess (seconds per run)."""
    modules = {type(m).__module__ for m in model.modules()} - BY_VALUE  # pickled by value: nothing to install
    roots = {name.split(".")[0] for name in modules} - {"__main__", "builtins"}
    pins = [_pin(pkg) for pkg in ("torch", "cloudpickle", *sorted(roots & set(INSTALLED[1:])))]
    code = []
    for root in sorted(roots - set(INSTALLED)):
        module = sys.modules[root]
        code.append(str(Path(module.__file__).parent if hasattr(module, "__path__") else module.__file__))
    return pins, code


@contextmanager
def tracking_at(uri: str):
    """mlflow's global tracking URI set to uri for the duration (log_model takes it from there), then put back
    as it was, $MLFLOW_TRACKING_URI included: MLflow's own _use_tracking_uri deletes that variable on the way
    out, and a sweep worker's next trial would then log to ./mlflow.db."""
    import mlflow

    if mlflow.get_tracking_uri() == uri:
        yield
        return
    before, env = private.tracking_uri_set(), os.environ.get("MLFLOW_TRACKING_URI")
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
    datamodule, or the metadata dict (metadata() of one). example: one uint8 image (1, C, H, W); default: the
    datamodule's first test image, or zeros of metadata's input_shape. step: the run's metrics at this step
    are attached to the model (MLflow copies them), e.g. the test step.
    """
    import mlflow.pytorch
    from mlflow.models import infer_signature

    net = model.net if isinstance(model, Classifier) else model
    loss = model.loss if isinstance(model, Classifier) else (loss or "cross_entropy")
    meta = dict(data) if isinstance(data, dict) else metadata(data, loss)
    meta["loss"], meta["input_type"] = loss, INPUT_TYPE
    if example is None:
        example = (example_input(data) if not isinstance(data, dict)
                   else np.zeros([1, *meta["input_shape"]], dtype=np.uint8))
    # A CPU float32 copy: loads on any machine; the training net (maybe on a GPU, channels_last) is untouched.
    predictor = portable(copy.deepcopy(net).to("cpu", torch.float32).to(memory_format=torch.contiguous_format),
                         loss, normaliser(meta)).eval()
    pins, code = requirements(predictor)
    with torch.no_grad():
        output = predictor(torch.from_numpy(example)).numpy()
    client = MlflowClient(uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    # Created here, not by log_model: without an active fluent run it would put the model in experiment 0.
    logged = client.create_logged_model(experiment_id, name=NAME, source_run_id=run_id, model_type="classifier")
    try:
        with tracking_at(uri):
            info = mlflow.pytorch.log_model(predictor, name=NAME, model_id=logged.model_id, run_id=run_id,
                                            input_example=example, signature=infer_signature(example, output),
                                            metadata=meta, pip_requirements=pins, code_paths=code or None, step=step,
                                            serialization_format="pickle")
    except BaseException:
        client.finalize_logged_model(logged.model_id, "FAILED")
        raise
    client.finalize_logged_model(logged.model_id, "READY")
    client.set_tag(run_id, tracking.MODEL_TAG, info.model_uri)
    return info.model_uri
