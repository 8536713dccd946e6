"""trainer.precision: what "auto" becomes on this machine, and the autocast dtype a precision means.

torch.cuda.is_bf16_supported() answers True on GPUs that only emulate bf16 (compute capability below 8: a
V100, the T4 of most notebook services), where a bf16 matmul runs far slower than fp16 or even fp32. So "auto"
goes by the capability instead: bf16 autocast where the tensor cores take bf16 (8.0 on: Ampere, Hopper, ...),
fp16 autocast with Lightning's loss scaler where they take only fp16 (7.x: Volta, Turing), fp32 below that
(Pascal and older: no tensor cores, and fp16 often slower than fp32). A precision the user names is kept as named.
"""
import torch

# Lightning's names (and its legacy spellings) -> the dtype its mixed precision autocasts to. The "-true"
# halves cast the whole model instead; what measures their cost approximates them by the same autocast.
AUTOCAST = {"bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16, "bf16-true": torch.bfloat16,
            "16-mixed": torch.float16, "16": torch.float16, "16-true": torch.float16}


def native(capability: tuple[int, int], rocm: bool = False) -> str:
    """The precision a GPU of this compute capability computes fastest in, as Lightning names it."""
    if rocm:  # torch answers bf16 for every AMD architecture it builds for
        return "bf16-mixed"
    major = capability[0]
    return "bf16-mixed" if major >= 8 else "16-mixed" if major == 7 else "32-true"


def on_gpu(accelerator: str) -> bool:
    """Whether Lightning's accelerator setting puts this process's training on the CUDA (or ROCm) GPU."""
    return str(accelerator) in ("gpu", "cuda") or (str(accelerator) == "auto" and torch.cuda.is_available())


def resolve(precision, accelerator: str = "auto") -> str:
    """trainer.precision as Lightning gets it: "auto" is native() of the GPU it trains on, 32-true elsewhere
    (also with trainer.accelerator=cpu on a GPU machine: bf16 autocast on a CPU is slower than fp32)."""
    if str(precision) != "auto":
        return str(precision)
    if not (on_gpu(accelerator) and torch.cuda.is_available()):
        return "32-true"
    return native(torch.cuda.get_device_capability(), rocm=bool(torch.version.hip))


def autocast_dtype(precision, device: torch.device) -> torch.dtype | None:
    """The dtype a run of this precision computes in on device (None: full precision), for the loops that
    apply autocast themselves (a stack of trials, an ensemble's test pass, the cost measurement)."""
    if device.type != "cuda":
        return None
    return AUTOCAST.get(resolve(precision, "cuda"))
