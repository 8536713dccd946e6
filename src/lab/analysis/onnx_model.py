"""ONNX files `lab export` writes and `lab predict` reads: the net with the input scaling and normalisation inside.

The graph's input `image` is (N, C, H, W), N dynamic, C, H, W the training data's (metadata input_shape):
uint8 pixels 0-255, or float32 0-1 (metadata input_type). Its output `probabilities` is (N, K) float32, rows
summing to 1, in the order of the metadata's class_names. Every metadata value is JSON.
"""
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lab.data.normalise import Normalise
from lab.errors import LabError

INPUT, OUTPUT = "image", "probabilities"
INPUT_TYPES = {"uint8": torch.uint8, "float": torch.float32}  # --input: what the graph's image input holds
OPSET = 20


class Deployed(torch.nn.Module):
    """Raw images -> probabilities: lab.data.normalise.Normalise (/255 for uint8, then (x - mean) / std, as
    training applies it), then predictor (normalised float -> probabilities, exported.portable).
    input_type: what the graph's image input holds; Normalise branches on the traced input's dtype."""

    def __init__(self, predictor: torch.nn.Module, mean: list[float], std: list[float], input_type: str):
        super().__init__()
        self.predictor, self.input_type = predictor, input_type
        self.normalise = Normalise(mean, std)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.normalise(image))


def as_input(x: torch.Tensor, input_type: str) -> np.ndarray:
    """uint8 (N, C, H, W) images as a graph of input_type takes them."""
    return (x if input_type == "uint8" else x.float() / 255).contiguous().numpy()


def set_metadata(path: Path, meta: dict) -> None:
    """meta's values, as JSON, in the file's metadata_props (onnxruntime: custom_metadata_map)."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=json.dumps(value))
    onnx.save(model, str(path))


def root_cause(err: BaseException) -> str:
    """The innermost exception's type and first line: torch.onnx's own says only which of its steps failed."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__


def write(deployed: Deployed, meta: dict, path: Path) -> None:
    """deployed as an ONNX file at path (one file, weights inside), the batch dimension dynamic."""
    shape, dtype = meta["input_shape"], INPUT_TYPES[meta["input_type"]]
    example = torch.zeros(2, *shape, dtype=dtype)  # 2, not 1: torch.export fixes a dimension of size 1
    try:
        program = torch.onnx.export(deployed.eval(), (example,), input_names=[INPUT], output_names=[OUTPUT],
                                    dynamic_shapes={"image": {0: torch.export.Dim("batch")}}, opset_version=OPSET,
                                    external_data=False, verbose=False)
    except Exception as err:  # torch.export and the ONNX translation each raise their own kinds
        raise LabError(f"the net {meta.get('net', '')} cannot be exported to ONNX ({root_cause(err)}): this "
                       "architecture is not supported by --format onnx.") from err
    program.save(str(path), external_data=False)
    set_metadata(path, meta)


def session(path: Path, threads: int | None = None):
    """An ONNX Runtime CPU session; threads: its intra- and inter-op thread counts (None: ONNX Runtime's)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = options.inter_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def probabilities(sess, x: torch.Tensor, input_type: str, batch_size: int = 256) -> np.ndarray:
    """uint8 (N, C, H, W) -> (N, K) float32 probabilities from an ONNX Runtime session, in batches."""
    out = [sess.run([OUTPUT], {INPUT: as_input(chunk, input_type)})[0] for chunk in x.split(batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def metadata(sess) -> dict:
    raw = sess.get_modelmeta().custom_metadata_map
    try:
        return {key: json.loads(value) for key, value in raw.items()}
    except json.JSONDecodeError:
        return {}


@dataclass
class OnnxModel:
    """What `lab predict` needs of a model, from an ONNX file `lab export` wrote, run by ONNX Runtime."""
    session: object
    meta: dict  # class_names, input_shape, input_type, mean, std, loss, data, run_id, variant
    run_id: str | None
    source: str
    device_name = "cpu (onnxruntime)"

    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in self.meta["class_names"]]

    def probabilities(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """uint8 (N, C, H, W) -> (N, K) float probabilities."""
        if not len(x):
            return torch.zeros(0, len(self.class_names))
        return torch.from_numpy(probabilities(self.session, x, self.meta["input_type"], batch_size))


def load(path: Path, name: str) -> OnnxModel:
    """An ONNX file lab exported; LabError for a file ONNX Runtime cannot read or one without lab's metadata."""
    try:
        sess = session(path)
    except Exception as err:  # onnxruntime raises its own exception classes for a bad file
        raise LabError(f"MODEL {name} cannot be read as an ONNX model ({str(err).splitlines()[0]}): give a file "
                       "`lab export` wrote.") from err
    meta = metadata(sess)
    missing = [k for k in ("class_names", "input_shape", "input_type") if k not in meta]
    if missing:
        raise LabError(f"MODEL {name} is an ONNX model without lab's metadata ({', '.join(missing)} missing): give "
                       "a file `lab export` wrote.")
    return OnnxModel(sess, meta, meta.get("run_id"), str(path))
