"""Any timm architecture by name (model=timm model.net.name=efficientnet_b0).

timm rather than torchvision's registry: timm builds every one of its ~1300 architectures (CNNs, MobileNets,
EfficientNets, ViTs...) with its own stem for in_chans and its own classifier for num_classes, says which
module is the classifier (get_classifier) and what input a net was trained on (pretrained_cfg), and adapts
pretrained weights to both. torchvision has a few dozen, each with its head and stem in another attribute.
Imported only when a config names TimmNet: importing timm costs about 2 s.
"""
import functools
import inspect
from pathlib import Path

import timm
import torch
from torch import nn

from lab.errors import LabError, close_matches
from lab.train.nets import PretrainedNet

MAX_SIDE = 2048  # pixels: the search for the smallest input gives up above this
WEIGHT_FILES = (".safetensors", ".pth", ".bin")  # what timm.models.load_state_dict reads


def check_name(name: str) -> None:
    if timm.is_model(name):
        return
    arch = timm.models.get_arch_name(name)
    close = close_matches(arch, timm.list_models())
    hint = f"did you mean {' or '.join(close)}?" if close else (
        "list them with `python -c \"import timm; print(timm.list_models('*net*'))\"`.")
    raise LabError(f"model.net.name={name!r} is not one of timm's {len(timm.list_models())} architectures: {hint}")


def fixed_size(name: str) -> bool:
    """Nets built for one input size (ViTs: position embeddings per patch); timm builds them for any img_size."""
    cfg = timm.get_pretrained_cfg(name)
    return bool(cfg and cfg.fixed_input_size)


def _accepts(model: nn.Module, in_chans: int, h: int, w: int) -> bool:
    was_training = model.training
    model.eval()  # batch norm in eval mode: one image is enough
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chans, h, w))
        return True
    except Exception:  # noqa: BLE001 - convs, pools and timm's size asserts each raise their own kind
        return False
    finally:
        model.train(was_training)


def lower_bound(model: nn.Module) -> int:
    """Pixels: the net's total stride (timm's feature_info reduction), or the minimum its pretrained_cfg
    declares if larger. Below the stride the last stage sees less than a pixel: padding alone gets it through."""
    stride = max((int(f["reduction"]) for f in getattr(model, "feature_info", None) or []), default=1)
    return max(stride, (model.pretrained_cfg.get("min_input_size") or (0, 0, 0))[-1])


@functools.lru_cache(maxsize=None)
def min_side(name: str, in_chans: int = 3) -> int:
    """The smallest square side in pixels the architecture classifies: searched upward from lower_bound by
    forward passes of one zero image (inception_v3: 75, its stride 32). Assumes that a net that takes a side
    takes every larger one, as strided convs and pools do."""
    check_name(name)
    model = timm.create_model(name, num_classes=2, in_chans=in_chans)
    fixed = fixed_size(name)

    def fits(side: int) -> bool:
        try:  # a fixed-size net is built for each side it is tried at
            net = timm.create_model(name, num_classes=2, in_chans=in_chans, img_size=side) if fixed else model
        except Exception:  # noqa: BLE001 - too small to build (window or patch sizes)
            return False
        return _accepts(net, in_chans, side, side)

    low, high = 0, lower_bound(model)  # invariant: nothing up to low fits; high is the next candidate
    while not fits(high):
        low, high = high, high * 2
        if high > MAX_SIDE:
            raise LabError(f"model.net.name={name}: no square input up to {MAX_SIDE}x{MAX_SIDE} pixels passes "
                           "through it; choose another architecture.")
    while low and high - low > 1:  # the smallest that fits lies in (low, high]
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid, high)
    return high


def weight_kwargs(name: str, weights: str | None) -> dict:
    """timm.create_model's arguments for model.net.weights: null, pretrained, or a local file."""
    if weights is None:
        return {"pretrained": False}
    if weights == "pretrained":  # timm downloads them (Hugging Face Hub) into its cache: needs a network once
        return {"pretrained": True}
    path = weights_file(name, weights)
    return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}


def weights_file(name: str, weights: str) -> Path:
    """The file itself, or in a folder NAME.safetensors / .pth / .bin: one folder serves a sweep over names."""
    path = Path(str(weights)).expanduser()
    if path.is_dir():
        found = [path / f"{name}{ext}" for ext in WEIGHT_FILES if (path / f"{name}{ext}").is_file()]
        if found:
            return found[0]
        raise LabError(f"model.net.weights={weights} is a folder without weights for {name}: put a state_dict of "
                       f"{name} there as {' or '.join(name + ext for ext in WEIGHT_FILES)}.")
    if not path.is_file():
        raise LabError(f"model.net.weights={weights} is not a file: give a state_dict of {name} "
                       f"({', '.join(WEIGHT_FILES)}) or a folder of NAME{WEIGHT_FILES[0]} files, 'pretrained' "
                       "(downloaded by timm, needs a network), or null (random weights).")
    return path


def check_loaded(model: nn.Module, name: str, path: str) -> None:
    """timm loads a file non-strictly when the class count differs (the old head is dropped), so a file of
    another net would leave the backbone random without a word: every non-head tensor must be in the file."""
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    wanted = [k for k in model.state_dict() if not any(k == h or k.startswith(h + ".") for h in heads)]
    have = set(timm.models.load_state_dict(path))
    missing = [k for k in wanted if k not in have]
    if missing:
        raise LabError(f"model.net.weights={path} does not fit {name}: {len(missing)} of its {len(wanted)} tensors "
                       f"are not in the file (e.g. {', '.join(missing[:3])}); it needs a state_dict of {name}, "
                       f"as torch.save(timm.create_model({name!r}).state_dict(), PATH) writes.")


class TimmNet(PretrainedNet):
    """A timm architecture with num_classes outputs for in_shape's channels. weights: null (random),
    "pretrained" (timm's default weights, downloaded), or a local state_dict file; the old class head is
    dropped and grayscale input gets the pretrained first filters summed over RGB (timm's adapt_input_conv).
    Fixed-size nets (ViT) are built for the data's image size, position embeddings resampled by timm."""

    NAME_KEY = "name"  # the config key errors name for the architecture (ResNet's is arch)
    CREATE_KWARGS: dict = {}  # more arguments of timm.create_model a subclass fixes

    def __init__(self, in_shape, num_classes: int, name: str = "mobilenetv3_small_100", weights: str | None = None,
                 freeze: str = "none", dropout: float = 0.0):
        super().__init__()
        check_name(name)
        if freeze not in ("none", "backbone"):
            raise LabError(f"model.net.freeze={freeze!r} is not valid: choose 'none' or 'backbone'.")
        c, h, w = in_shape
        kwargs = {"num_classes": num_classes, "in_chans": c, **self.CREATE_KWARGS, **weight_kwargs(name, weights)}
        if dropout:  # timm's dropout before the classifier; some nets take no drop_rate, so only when asked
            kwargs["drop_rate"] = dropout
        if fixed_size(name):
            kwargs["img_size"] = (h, w)
        try:
            self.model = timm.create_model(name, **kwargs)
        except Exception as err:  # timm, torch.load, safetensors and the hub each raise their own
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if weights == "pretrained":
                raise LabError(f"model.net.weights=pretrained: timm could not get the weights of {name} ({first}); "
                               "download them where there is a network and give the file: "
                               "model.net.weights=PATH.") from err
            if weights is not None:
                raise LabError(f"model.net.weights={weights} does not fit {name}: {first}") from err
            self._check_side(name, c, h, w)
            raise LabError(f"model.net.{self.NAME_KEY}={name} cannot be built for {c}x{h}x{w} input: {first}") from err
        if weights not in (None, "pretrained"):
            check_loaded(self.model, name, kwargs["pretrained_cfg_overlay"]["file"])
        trained_side = min(self.model.pretrained_cfg.get("input_size", (3, 0, 0))[1:])
        if min(h, w) < lower_bound(self.model):
            self._check_side(name, c, h, w)
        if min(h, w) < trained_side and not _accepts(self.model, c, h, w):  # below what it was trained at: try
            self._check_side(name, c, h, w)
            raise LabError(f"model.net.{self.NAME_KEY}={name} does not take {c}x{h}x{w} input; it was trained at "
                           f"{trained_side}x{trained_side}: set data.image_size={trained_side}.")
        if freeze == "backbone":
            self.freeze_backbone()

    @classmethod
    def _check_side(cls, name: str, c: int, h: int, w: int) -> None:
        need = min_side(name, c)
        if min(h, w) < need:
            raise LabError(f"image size {h}x{w} is too small for {name}: it needs at least {need}x{need}. Raise "
                           f"data.image_size or choose another model.net.{cls.NAME_KEY}.")

    @classmethod
    def smallest_side(cls, settings: dict) -> int:
        """min_side of the architecture a model config's net settings name (tests pick image sizes with it)."""
        return min_side(settings.get("name", inspect.signature(cls).parameters["name"].default))

    @property
    def head(self) -> nn.Module:
        return self.model.get_classifier()

    def reset_classifier(self, num_classes: int) -> None:
        self.model.reset_classifier(num_classes)

    def forward(self, x):
        return self.model(x)
