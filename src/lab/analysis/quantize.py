"""int8 ONNX files by ONNX Runtime's quantization tools, as its quantization guide recommends for CPUs.

Conv nets: static quantization in QDQ format, weights int8 per output channel, activations uint8 with ranges
calibrated on training images (MinMax). Nets without a convolution (Linear layers): dynamic quantization,
weights int8 ahead of time and each activation's scale computed per batch at run time, no calibration.
Both start from quant_pre_process (shape inference and graph optimisation), as the guide asks.
"""
from pathlib import Path

import numpy as np
import torch

from lab.analysis import onnx_model
from lab.errors import LabError

CALIBRATION_BATCH = 32  # images per calibration call


def has_conv(path: Path) -> bool:
    import onnx

    return any(node.op_type == "Conv" for node in onnx.load(str(path)).graph.node)


def method(path: Path) -> str:
    """static for a graph with a convolution, else dynamic."""
    return "static" if has_conv(path) else "dynamic"


def _reader(images: np.ndarray):
    from onnxruntime.quantization import CalibrationDataReader

    class Images(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(np.array_split(images, max(1, -(-len(images) // CALIBRATION_BATCH))))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {onnx_model.INPUT: batch}

    return Images()


def int8(src: Path, dst: Path, calibration: torch.Tensor | None, input_type: str, work: Path) -> str:
    """src quantized into dst; returns the method (static, dynamic). calibration: uint8 (N, C, H, W) training
    images, needed for a conv net (static); LabError when there are none. dst keeps src's metadata."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    how = method(src)
    if how == "static" and (calibration is None or not len(calibration)):
        raise LabError("static int8 quantization of a conv net needs calibration images, and none were given: "
                       "give --calibration FOLDER of training images or a --calibration-size of 1 or more.")
    prepared = work / f"{src.stem}.pre.onnx"
    quant_pre_process(str(src), str(prepared))
    if how == "static":
        quantize_static(str(prepared), str(dst), _reader(onnx_model.as_input(calibration, input_type)),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
    else:
        quantize_dynamic(str(prepared), str(dst), weight_type=QuantType.QInt8)
    onnx_model.set_metadata(dst, onnx_model.metadata(onnx_model.session(src)))
    return how
