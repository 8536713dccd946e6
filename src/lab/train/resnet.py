"""ResNet-18/34/50 (model=resnet): timm's ResNet under torchvision's names. timm builds the stem for the
data's channels (pretrained RGB filters summed for grayscale) and the head for the classes; its ResNets have
torchvision's parameter names and shapes and compute the same outputs from the same state_dict, so a
torchvision .pth file and torchvision's weights names (IMAGENET1K_V1) load as they are.
"""
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision

from lab.errors import LabError
from lab.train.timm_net import TimmNet, min_side


def weights_file(arch: str, weights: str) -> Path:
    """A torchvision weights name's file, in torch's hub cache (TORCH_HOME/hub/checkpoints): downloaded once,
    checked against the hash its name carries, by torchvision's own get_state_dict."""
    enum = torchvision.models.get_model_weights(arch)
    try:  # torchvision's names: IMAGENET1K_V1, ResNet18_Weights.IMAGENET1K_V1, DEFAULT (an alias)
        chosen = enum.verify(weights)
    except (KeyError, ValueError) as err:
        raise LabError(f"model.net.weights={weights} is neither a file nor a weights name of {arch}: use a path "
                       f"to a state_dict file (or a folder of {arch}.pth files), null, DEFAULT, or one of "
                       f"{sorted(w.name for w in enum)}.") from err
    try:
        chosen.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError) as err:  # offline (URLError), or a download whose hash does not match
        raise LabError(f"model.net.weights={weights}: torchvision could not get {arch}'s weights ({err}); download "
                       "them where there is a network and give the file: model.net.weights=PATH.") from err
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(chosen.url).path).name


def old_head(module, state_dict, prefix, *_) -> None:
    """Checkpoints of lab's own ResNet (before 2026-12-03) hold the head as Sequential(Dropout, Linear):
    model.fc.1.* there is timm's model.fc.*."""
    for end in ("weight", "bias"):
        old = f"{prefix}model.fc.1.{end}"
        if old in state_dict:
            state_dict[f"{prefix}model.fc.{end}"] = state_dict.pop(old)


class ResNet(TimmNet):
    """weights: null (random), a torchvision weights name (needs the hub cache or a network), a local
    state_dict file in torchvision's or timm's format, or a folder of ARCH.pth files."""

    ARCHS = ("resnet18", "resnet34", "resnet50")
    MIN_SIDE = 32  # pixels: five stride-2 stages take 32 down to 1x1 before the pooling head
    NAME_KEY = "arch"
    # torchvision's initialisation: timm zeroes each block's last batch norm weight by default
    CREATE_KWARGS = {"zero_init_last": False}

    def __init__(self, in_shape, num_classes: int, arch: str = "resnet18", weights: str | None = None,
                 freeze: str = "none", dropout: float = 0.0):
        if arch not in self.ARCHS:
            raise LabError(f"model.net.arch={arch!r} is not known: choose one of {list(self.ARCHS)}.")
        if weights is not None and not Path(str(weights)).expanduser().exists():
            weights = str(weights_file(arch, str(weights)))
        super().__init__(in_shape, num_classes, name=arch, weights=weights, freeze=freeze, dropout=dropout)
        self.register_load_state_dict_pre_hook(old_head)

    @classmethod
    def smallest_side(cls, settings: dict) -> int:
        return min_side(settings.get("arch", cls.ARCHS[0]))
