"""Plain nn.Modules. Each takes in_shape=(C, H, W) and num_classes from the datamodule at build time;
reset_classifier(n) gives one a new last layer of n outputs (model.loss=bce asks for 1).
Any timm architecture: lab/train/timm_net.py; ResNet (timm's) under torchvision's names: lab/train/resnet.py."""
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lab.errors import LabError

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "leaky_relu": nn.LeakyReLU}
INITS = ("default", "he", "xavier")


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise LabError(f"activation={name!r} is not known: choose one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]()


def initialize(module: nn.Module, scheme: str) -> None:
    """He (Kaiming) suits ReLU-family layers, Xavier (Glorot) suits tanh/sigmoid; biases start at zero."""
    if scheme not in INITS:
        raise LabError(f"init={scheme!r} is not known: choose one of {list(INITS)}.")
    if scheme == "default":
        return
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if scheme == "he":
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def dense_stack(n_in: int, hidden: list[int], act: str, dropout: float) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(n_in, width), make_activation(act)] + ([nn.Dropout(dropout)] if dropout else [])
        n_in = width
    return nn.Sequential(*layers), n_in


def reset_last(layers: nn.Sequential, num_classes: int, init: str) -> None:
    """A new last Linear layer with num_classes outputs (1 for model.loss=bce), initialized as the net was."""
    layers[-1] = nn.Linear(layers[-1].in_features, num_classes)
    initialize(layers[-1], init)


class OwnParams(nn.Module):
    """The parameters a container module holds itself (a ViT's cls_token and pos_embed) as a leaf module of
    their own: Lightning's BackboneFinetuning freezes and unfreezes leaf modules' parameters only."""

    def __init__(self, module: nn.Module):
        super().__init__()
        for name, p in module.named_parameters(recurse=False):
            self.register_parameter(name, p)  # the same Parameter objects, not copies


class PretrainedNet(nn.Module):
    """A (pretrained) feature extractor, self.model, and a new class head: the one split that freeze,
    Lightning's BackboneFinetuning and Classifier's backbone_lr_scale act on. Subclasses define head."""

    @property
    def head(self) -> nn.Module:
        raise NotImplementedError

    @property
    def backbone(self) -> nn.ModuleList:
        """Every leaf module outside the head (plus containers' own parameters), for freezing or a lower lr."""
        in_head = {id(m) for m in self.head.modules()}
        parts: list[nn.Module] = []
        for m in self.model.modules():
            if id(m) in in_head:
                continue
            if next(m.children(), None) is None:
                parts.append(m)
            elif next(m.parameters(recurse=False), None) is not None:
                parts.append(OwnParams(m))
        return nn.ModuleList(parts)

    def freeze_backbone(self) -> None:
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True):
        # A batch norm layer whose weights are frozen also keeps its running statistics (what Keras does for
        # a frozen base): in train mode they would drift to the new data under weights that cannot follow.
        super().train(mode)
        if mode:
            for m in self.modules():
                params = list(m.parameters(recurse=False))
                if isinstance(m, _BatchNorm) and params and not any(p.requires_grad for p in params):
                    m.eval()
        return self


class LayerStack(nn.Module):
    """A net that is one nn.Sequential, `layers`, ending in its classifier (a Linear)."""

    def reset_classifier(self, num_classes: int) -> None:
        reset_last(self.layers, num_classes, self.init)

    def forward(self, x):
        return self.layers(x)


class Linear(LayerStack):
    """Flatten -> one affine layer -> class logits (softmax lives in the loss)."""

    def __init__(self, in_shape, num_classes: int, init: str = "default"):
        super().__init__()
        c, h, w = in_shape
        self.init = init
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, num_classes))
        initialize(self, init)


class MLP(LayerStack):
    def __init__(self, in_shape, num_classes: int, hidden: list[int] = (128,), activation: str = "relu",
                 dropout: float = 0.0, init: str = "he"):
        super().__init__()
        c, h, w = in_shape
        body, width = dense_stack(c * h * w, list(hidden), activation, dropout)
        self.init = init
        self.layers = nn.Sequential(nn.Flatten(), body, nn.Linear(width, num_classes))
        initialize(self, init)


class CNN(nn.Module):
    """Blocks of conv(3x3, same padding) -> [batch norm] -> activation -> 2x2 pool; then dense layers.

    Each block halves H and W, so an image side must be at least 2**len(channels).
    """

    def __init__(self, in_shape, num_classes: int, channels: list[int] = (32, 64), kernel_size: int = 3,
                 batch_norm: bool = True, pool: str = "max", hidden: list[int] = (128,),
                 activation: str = "relu", dropout: float = 0.25, init: str = "he"):
        super().__init__()
        c, h, w = in_shape
        channels = list(channels)
        need = 2 ** len(channels)
        if min(h, w) < need:
            raise LabError(
                f"image size {h}x{w} is too small for a CNN with {len(channels)} pooling blocks: each halves the "
                f"side, so it needs at least {need}x{need}. Raise data.image_size or use fewer model.net.channels."
            )
        if kernel_size % 2 == 0:  # padding k//2 keeps the side only for odd k; the sizes below assume it does
            raise LabError(f"model.net.kernel_size={kernel_size} is not valid: use an odd size (3, 5, 7).")
        pools = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}
        if pool not in pools:
            raise LabError(f"pool={pool!r} is not known: choose one of {sorted(pools)}.")
        blocks: list[nn.Module] = []
        for out in channels:
            blocks += [nn.Conv2d(c, out, kernel_size, padding=kernel_size // 2, bias=not batch_norm)]
            blocks += [nn.BatchNorm2d(out)] if batch_norm else []
            blocks += [make_activation(activation), pools[pool](2)]
            c, h, w = out, h // 2, w // 2
        body, width = dense_stack(c * h * w, list(hidden), activation, dropout)
        self.init = init
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Flatten(), body, nn.Linear(width, num_classes))
        initialize(self, init)

    def reset_classifier(self, num_classes: int) -> None:
        reset_last(self.head, num_classes, self.init)

    def forward(self, x):
        return self.head(self.features(x))
