"""The one rule that turns images into what a net takes: /255 for uint8 pixels, then (x - mean) / std per channel.

Training (TensorDataModule.prepare_batch), the logged MLflow model, `lab predict`/`lab ensemble` and the ONNX
files all apply this module, so that what a model is served cannot drift from what it was trained on.
A logged model pickles this class by value (cloudpickle.register_pickle_by_value in lab.train.exported): an
environment without lab loads it. So it imports torch alone.
"""
import torch


class Normalise(torch.nn.Module):
    """uint8 (N, C, H, W) pixels 0-255, or float (N, C, H, W) scaled to [0, 1] -> float32 (x - mean) / std.

    mean, std: C floats, the training split's channel statistics; buffers of shape (1, C, 1, 1), so they travel
    with the module's device and its state_dict."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1).clone())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1).clone())

    def normalise_(self, x: torch.Tensor) -> torch.Tensor:
        """x: float32 in [0, 1] that the caller owns, normalised in place (training: no extra copy per batch)."""
        return x.sub_(self.mean).div_(self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:  # a new float copy of the pixels: normalised in place
            return self.normalise_(x.float().div_(255))
        return (x.float() - self.mean) / self.std  # the caller's tensor, left untouched
