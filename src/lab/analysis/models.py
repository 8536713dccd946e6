"""A trained model named the ways users name one: run id, models:/ URI, sweep file, checkpoint path, .onnx file.

What every form resolves to is a Model: a torch module taking uint8 (N, C, H, W) images and returning (N, K)
class probabilities (its normalisation inside: lab.data.normalise, as training applied it), the metadata that
says what it was trained on (class names, input shape, mean and std), and the MLflow run it came from. `lab predict` and `lab ensemble` read models through here.
An .onnx file resolves to an OnnxModel (lab.analysis.onnx_model): the same meta, class_names, probabilities().
"""
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from lab.analysis import results
from lab.data.normalise import Normalise
from lab.errors import LabError
from lab.sweep import ranking, spec
from lab.sweep import study as studies
from lab.train import tracking

RUN_ID = re.compile(r"[0-9a-f]{32}")
VALID = ("a run id (32 hex digits), a models:/NAME@ALIAS, models:/NAME/VERSION or models:/m-... URI, "
         "a sweep file (its best trial), a checkpoint path a run recorded, or an .onnx file `lab export` wrote")


@dataclass
class Model:
    net: torch.nn.Sequential  # uint8 (N, C, H, W) -> (N, K) probabilities, in eval mode (exported.portable)
    meta: dict  # class_names, input_shape [C, H, W], mean, std, loss, data
    run_id: str | None
    source: str  # how it was found, for what is printed

    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in self.meta["class_names"]]

    @property
    def device_name(self) -> str:
        return next(self.net.parameters()).device.type

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """uint8 (N, C, H, W) -> (N, K) float probabilities on the CPU, in batches on the model's device."""
        device = next(self.net.parameters()).device
        out = [self.net(chunk.to(device)).float().cpu() for chunk in x.split(batch_size)]
        return torch.cat(out) if out else torch.zeros(0, len(self.class_names))


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def from_uri(uri: str, name: str, run_id: str | None = None) -> Model:
    """A logged MLflow model (models:/..., runs:/...): loaded onto this machine's device."""
    import mlflow.pytorch

    try:
        info = mlflow.models.get_model_info(uri)
        net = mlflow.pytorch.load_model(uri, map_location=device())
    except ModuleNotFoundError as err:  # the net's own code, a file of the folder it was trained in
        raise missing_module(name, err) from err
    # The last three: a pickled model naming a lab class or function this version of lab no longer has.
    except (MlflowException, OSError, AttributeError, ImportError, pickle.UnpicklingError) as err:
        raise LabError(f"MODEL {name} cannot be loaded from MLflow ({str(err).splitlines()[0]}): give {VALID}.") from err
    meta = dict(info.metadata or {})
    if "class_names" not in meta:
        raise LabError(f"MODEL {name} is an MLflow model without lab's metadata (class_names, input_shape, mean, "
                       f"std): it was not logged by lab; give {VALID}.")
    if "input_type" not in meta:  # logged before models carried their normalisation: it takes normalised floats
        net = torch.nn.Sequential(Normalise(meta["mean"], meta["std"]).to(device()), *net)
    return Model(net.eval(), meta, run_id or info.run_id, uri)


def module_not_found(err: BaseException) -> ModuleNotFoundError | None:
    """The ModuleNotFoundError behind err (Hydra's instantiate wraps it twice)."""
    while err is not None and not isinstance(err, ModuleNotFoundError):
        err = err.__cause__ or err.__context__
    return err


def missing_module(name: str, err: ModuleNotFoundError) -> LabError:
    module = err.name or str(err)
    return LabError(f"MODEL {name} needs the module {module!r} (its net's code) and there is none here: run this "
                    f"command in the folder that holds {module.split('.')[0]}.py or {module.split('.')[0]}/ (the one it "
                    "was trained in), or add that folder to PYTHONPATH.")


def checkpointed(mlflow_client: MlflowClient, run_id: str, name: str):
    """(Classifier with the run's tested weights, its set-up datamodule), from its config.yaml and checkpoint."""
    from lab.train import rebuild  # Lightning's imports (~7 s) only when something is built

    try:
        return rebuild.rebuild(mlflow_client, run_id, results.mlflow_uri())
    except Exception as err:
        missing = module_not_found(err)
        if missing is not None:  # its _target_ names a module of the folder it was trained in
            raise missing_module(name, missing) from err
        if not isinstance(err, LabError):
            raise
        raise LabError(f"MODEL {name}: {err}; train it again (its tag lab.command says how), or give "
                       f"{VALID}.") from err


def rebuilt(mlflow_client: MlflowClient, run_id: str, name: str) -> Model:
    """A run without a logged model (a sweep that logs only its best trial's), from its config and checkpoint."""
    from lab.train import exported

    module, datamodule = checkpointed(mlflow_client, run_id, name)
    meta = exported.metadata(datamodule, module.loss)
    net = exported.portable(module.net, module.loss, exported.normaliser(meta)).to(device()).eval()
    return Model(net, meta, run_id, f"{name} (rebuilt from its checkpoint)")


def from_run(mlflow_client: MlflowClient, run_id: str, name: str) -> Model:
    try:
        run = mlflow_client.get_run(run_id)
    except MlflowException as err:
        raise LabError(f"MODEL {name}: there is no run {run_id} in {results.mlflow_uri()}; give {VALID}.") from err
    uri = run.data.tags.get(tracking.MODEL_TAG)
    if uri:
        return from_uri(uri, name, run_id)
    return rebuilt(mlflow_client, run_id, name)


def sweep_best_run(sweep_file: str, storage: str | None, out: str | None, study: str | None) -> str:
    """The run holding the model of the trial `lab best` exports by default (ranking.best)."""
    try:
        sweep = spec.load(sweep_file, check=False)
        if study:
            sweep.spec.study = study
        _, storage = studies.locate(sweep, storage, out)
        best = ranking.best(studies.load(sweep, storage, command="lab sweep"))
    except LabError as err:
        # `lab predict` names the sweep's folder --sweep-out: its --out is the CSV file.
        text = str(err).replace("--storage/--out/--study", "--storage/--sweep-out/--study")
        raise LabError(f"MODEL {sweep_file} is read as a sweep file: {text}") from err
    if best is None:
        raise LabError(f"MODEL {sweep_file}: study {sweep.spec.study!r} has no completed (feasible) trial yet.")
    run_id = ranking.model_run_id(best)
    if not run_id:
        raise LabError(f"MODEL {sweep_file}: trial {best.number} of study {sweep.spec.study!r} has no MLflow run.")
    return run_id


def checkpoint_run(mlflow_client: MlflowClient, path: Path, name: str) -> str:
    """The run whose tag `checkpoint` is this file (runs record the absolute path of their best epoch)."""
    resolved = str(path.resolve())
    experiments = [e.experiment_id for e in mlflow_client.search_experiments()]
    quoted = resolved.replace("'", "\\'")
    runs = mlflow_client.search_runs(experiments, f"tags.checkpoint = '{quoted}'", max_results=1) if experiments else []
    if not runs:
        raise LabError(f"MODEL {name}: no run in {results.mlflow_uri()} recorded the checkpoint {resolved}, so its "
                       f"classes and normalisation are unknown; give {VALID}.")
    return runs[0].info.run_id


def load(name: str, storage: str | None = None, out: str | None = None, study: str | None = None):
    """MODEL as the user typed it -> Model, or an OnnxModel for an .onnx file (run by ONNX Runtime, no torch net).
    storage, out, study: where a sweep file's study is (as `lab best` takes them)."""
    path = Path(name).expanduser()
    if path.suffix == ".onnx" and path.is_file():
        from lab.analysis import onnx_model

        return onnx_model.load(path, name)
    mlflow_client = results.client()
    if name.startswith(("models:/", "runs:/")):
        return from_uri(name, name)
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        return from_run(mlflow_client, sweep_best_run(name, storage, out, study), name)
    if path.is_file():
        return from_run(mlflow_client, checkpoint_run(mlflow_client, path, name), name)
    if RUN_ID.fullmatch(name):
        return from_run(mlflow_client, name, name)
    if path.is_dir():
        raise LabError(f"MODEL {name} is a folder: give {VALID}.")
    try:  # a shipped sweep by name (`quickstart`)
        spec.find(path)
    except LabError:
        raise LabError(f"MODEL {name} is not valid: it is not an existing file; give {VALID}.") from None
    return from_run(mlflow_client, sweep_best_run(name, storage, out, study), name)
