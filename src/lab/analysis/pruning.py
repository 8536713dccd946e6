"""Magnitude pruning of a trained net, then a short fine-tune with the run's own training config.

Unstructured: the given fraction of all Conv2d and Linear weights together, those of smallest |w| (torch's
global L1 pruning), set to zero and kept at zero through the fine-tune. The tensors keep their shapes: the
non-zero count falls, a dense file's size and latency do not. Structured (conv nets): that fraction of each
conv layer's output channels, those whose filters have the smallest L2 norm, removed together with what reads
them (batch norm, the next conv's input channels, the first Linear's inputs after Flatten): a smaller net.
"""
import copy
import logging
import tempfile
import warnings

import torch
from torch import nn
from torch.nn.utils import prune

from lab.errors import LabError

PRUNABLE = (nn.Conv2d, nn.Linear)
# Layers a structured cut passes through unchanged: they act on each channel alone (or on none).
PER_CHANNEL = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Dropout, nn.Identity,
               nn.MaxPool2d, nn.AvgPool2d)


def parameter_counts(net: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters)."""
    params = list(net.parameters())
    return sum(p.numel() for p in params), sum(int(torch.count_nonzero(p)) for p in params)


def weight_sparsity(net: nn.Module) -> float:
    """The fraction of zero weights over the Conv2d and Linear layers (what unstructured pruning asks for)."""
    weights = [m.weight for m in net.modules() if isinstance(m, PRUNABLE)]
    return 1 - sum(int(torch.count_nonzero(w)) for w in weights) / sum(w.numel() for w in weights)


def unstructured(net: nn.Module, fraction: float) -> nn.Module:
    """A copy of net with torch.nn.utils.prune's masks on its Conv2d and Linear weights (global L1)."""
    net = copy.deepcopy(net)
    layers = [(m, "weight") for m in net.modules() if isinstance(m, PRUNABLE)]
    if not layers:
        raise LabError(f"--prune needs a net with Conv2d or Linear layers; {type(net).__name__} has none.")
    prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=fraction)
    return net


def permanent(net: nn.Module) -> nn.Module:
    """The masks made part of the weights (plain tensors again, zeros where pruned)."""
    for m in net.modules():
        if prune.is_pruned(m) and hasattr(m, "weight_mask"):
            prune.remove(m, "weight")
    return net


def _leaves(net: nn.Module) -> list[nn.Module]:
    """The modules of a chain of nn.Sequential (nested ones flattened), in order; [net] for any other net."""
    if not isinstance(net, nn.Sequential):
        return [net]
    return [leaf for m in net for leaf in _leaves(m)]


def _unsupported(what: str) -> LabError:
    return LabError(f"--structured prunes the channels of a chain of conv layers (model=cnn); this net {what}: "
                    "prune it without --structured.")


def _flatten_shape(leaves: list[nn.Module], in_shape: list[int]) -> tuple[int, ...] | None:
    """(C, H, W) of what reaches the first Flatten, from one forward pass of zeros."""
    x = torch.zeros(1, *in_shape)
    with torch.no_grad():
        for m in leaves:
            if isinstance(m, nn.Flatten):
                return tuple(x.shape[1:])
            x = m.eval()(x)
    return None


def structured(net: nn.Module, fraction: float, in_shape: list[int]) -> nn.Module:
    """A smaller copy of net (a chain of Conv2d, BatchNorm2d, per-channel layers, Flatten, Linear) with the
    lowest-L2-norm fraction of each conv's output channels gone, at least one kept per layer."""
    leaves = _leaves(net)
    if not any(isinstance(m, nn.Conv2d) for m in leaves):
        raise _unsupported("has no Conv2d layer")
    for m in leaves:
        if not isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Flatten, nn.Linear, *PER_CHANNEL)):
            raise _unsupported(f"has a {type(m).__name__} layer, or is not one nn.Sequential chain")
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise _unsupported("has a grouped convolution")
    spatial = _flatten_shape(leaves, in_shape)
    kept: torch.Tensor | None = None  # indices of the channels (after Flatten: features) that flow on
    out: list[nn.Module] = []
    with torch.no_grad():
        for m in leaves:
            if isinstance(m, nn.Conv2d):
                w = m.weight if kept is None else m.weight[:, kept]
                n = max(1, round(m.out_channels * (1 - fraction)))
                kept = w.flatten(1).norm(dim=1).topk(n).indices.sort().values
                conv = nn.Conv2d(w.shape[1], n, m.kernel_size, m.stride, m.padding, m.dilation,
                                 bias=m.bias is not None, padding_mode=m.padding_mode)
                conv.weight.copy_(w[kept])
                if m.bias is not None:
                    conv.bias.copy_(m.bias[kept])
                out.append(conv)
            elif isinstance(m, nn.BatchNorm2d) and kept is not None:
                bn = nn.BatchNorm2d(len(kept), m.eps, m.momentum, m.affine, m.track_running_stats)
                for name in ("weight", "bias", "running_mean", "running_var"):
                    if getattr(m, name) is not None:
                        getattr(bn, name).copy_(getattr(m, name)[kept])
                out.append(bn)
            elif isinstance(m, nn.Flatten) and kept is not None:
                if m.start_dim != 1 or spatial is None:
                    raise _unsupported("flattens other than from dimension 1")
                per_channel = spatial[1] * spatial[2]
                kept = (kept[:, None] * per_channel + torch.arange(per_channel)).flatten()
                out.append(copy.deepcopy(m))
            elif isinstance(m, nn.Linear) and kept is not None:
                if spatial is None:
                    raise _unsupported("has a Linear layer reading conv channels without a Flatten")
                linear = nn.Linear(len(kept), m.out_features, bias=m.bias is not None)
                linear.weight.copy_(m.weight[:, kept])
                if m.bias is not None:
                    linear.bias.copy_(m.bias)
                out.append(linear)
                kept = None  # Linear outputs are not pruned
            else:
                out.append(copy.deepcopy(m))
    return nn.Sequential(*out)


def finetune(net: nn.Module, cfg, datamodule, module, epochs: int) -> nn.Module:
    """net trained for epochs more on the run's data with its config's optimizer, loss and Trainer settings
    (no logger, no checkpoints): module is the run's Classifier as job.build made it; its net is replaced."""
    import pytorch_lightning as pl

    from lab.train import job

    pl.seed_everything(int(cfg.seed), verbose=False)
    module.net = net.train()  # a loaded model comes in eval mode
    module.backbone_lr_scale = 1.0  # the pruned net is one plain Sequential: no backbone to give its own rate
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)  # no GPU/TPU banners
    with tempfile.TemporaryDirectory(prefix="lab-finetune-") as root:
        kwargs = {**job.trainer_kwargs(cfg), "max_epochs": epochs, "min_epochs": None, "max_steps": -1,
                  "max_time": None, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                  "enable_model_summary": False, "default_root_dir": root}
        with warnings.catch_warnings():  # Lightning's advice to run under srun when SLURM is installed
            warnings.filterwarnings("ignore", message=".*srun.*")
            trainer = pl.Trainer(**kwargs)
            trainer.fit(module, datamodule=datamodule)
    return module.net.to("cpu", memory_format=torch.contiguous_format).eval()  # channels_last on a GPU
