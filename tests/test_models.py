"""timm architectures by name, transfer learning (weights, freezing, backbone_lr_scale) and the three losses:
real training on small synthetic data, each net at the smallest image side it says it takes."""
import math
from functools import partial

import pytest
import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import BackboneFinetuning

from lab.config import load
from lab.errors import LabError
from lab.train.job import build
from lab.train.module import Classifier
from lab.train.nets import MLP
from lab.train.resnet import ResNet
from lab.train.timm_net import TimmNet, min_side

# (architecture, image channels): a CNN, a MobileNet, an EfficientNet, a vision transformer; all small on a CPU.
ARCHS = [("resnet18", 1), ("mobilenetv3_small_100", 3), ("efficientnet_b0", 3), ("vit_tiny_patch16_224", 3)]
SMALL = ["data=synthetic", "data.n_train=48", "data.n_test=16", "data.batch_size=16"]


def trainer(epochs: int = 1, callbacks=(), **kw) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, callbacks=list(callbacks), **kw)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def names_of(net, part: str) -> set[str]:
    """State keys (under net.model) of the backbone's or the head's parameters and buffers."""
    ids = {id(t) for m in getattr(net, part).modules() for t in [*m.parameters(recurse=False), *m.buffers(False)]}
    return {k for k, t in net.model.state_dict(keep_vars=True).items() if id(t) in ids}


@pytest.mark.parametrize("arch, channels", ARCHS, ids=[a for a, _ in ARCHS])
def test_architecture_trains_and_tests(arch, channels):
    side = min_side(arch, channels)  # asked from the net: its total stride, or more if a forward pass fails
    cfg = load([*SMALL, "model=timm", f"model.net.name={arch}", f"data.size={side}", f"data.in_channels={channels}"])
    datamodule, model = build(cfg)
    before = snapshot(model.net.model)
    t = trainer()
    t.fit(model, datamodule=datamodule)
    result = t.test(model, datamodule=datamodule, verbose=False)[0]
    assert 0 <= result["test/acc"] <= 1 and math.isfinite(result["test/loss"])
    changed = {k for k, v in model.net.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed & names_of(model.net, "head") and changed & names_of(model.net, "backbone")
    with pytest.raises(LabError, match=f"needs at least {side}x{side}"):  # one pixel less is refused
        TimmNet((channels, side - 1, side - 1), 3, name=arch)


def test_min_side_is_searched_beyond_the_stride():
    # inception_v3's unpadded stem needs 75x75 (torchvision documents the same), though its stride is 32.
    assert min_side("inception_v3") == 75
    TimmNet((3, 75, 75), 2, name="inception_v3")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """ImageNet-shaped (1000-class) state_dicts of resnet18 and a ViT, as timm writes them, seeded."""
    out = tmp_path_factory.mktemp("weights")
    files = {}
    for i, name in enumerate(("resnet18", "vit_tiny_patch16_224")):
        torch.manual_seed(100 + i)
        files[name] = out / f"{name}.pth"
        torch.save(timm.create_model(name).state_dict(), files[name])
    return files


def test_local_weights_load_into_the_backbone_and_a_new_head(weights):
    state = torch.load(weights["resnet18"], weights_only=True)
    net = TimmNet((3, 32, 32), 4, name="resnet18", weights=str(weights["resnet18"]))
    got = net.model.state_dict()
    for key in ("conv1.weight", "layer3.1.conv2.weight", "layer4.0.bn1.running_var"):
        assert torch.equal(got[key], state[key]), key
    assert got["fc.weight"].shape == (4, 512)
    gray = TimmNet((1, 32, 32), 4, name="resnet18", weights=str(weights["resnet18"].parent))  # a folder: NAME.pth
    assert torch.allclose(gray.model.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))


def test_vit_weights_load_at_another_image_size(weights):
    state = torch.load(weights["vit_tiny_patch16_224"], weights_only=True)
    net = TimmNet((3, 32, 32), 2, name="vit_tiny_patch16_224", weights=str(weights["vit_tiny_patch16_224"]))
    got = net.model.state_dict()
    assert torch.equal(got["blocks.11.mlp.fc2.weight"], state["blocks.11.mlp.fc2.weight"])
    assert torch.equal(got["cls_token"], state["cls_token"])
    assert got["pos_embed"].shape == (1, 1 + 2 * 2, 192)  # resampled from 14x14 patches to 2x2
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 2)


def test_bad_weights_and_names_are_named(weights, tmp_path):
    with pytest.raises(LabError, match="model.net.weights=/no/such.pth is not a file"):
        TimmNet((3, 32, 32), 4, name="resnet18", weights="/no/such.pth")
    with pytest.raises(LabError, match=f"weights={tmp_path} is a folder without weights for mobilenetv3_small_100"):
        TimmNet((3, 32, 32), 4, name="mobilenetv3_small_100", weights=str(tmp_path))
    with pytest.raises(LabError, match="does not fit resnet34: .* tensors are not in the file"):  # missing keys
        TimmNet((3, 32, 32), 4, name="resnet34", weights=str(weights["resnet18"]))
    with pytest.raises(LabError, match="does not fit mobilenetv3_small_100"):  # nothing in common
        TimmNet((3, 32, 32), 4, name="mobilenetv3_small_100", weights=str(weights["resnet18"]))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a state_dict")
    with pytest.raises(LabError, match="garbage.pth does not fit resnet18"):
        TimmNet((3, 32, 32), 4, name="resnet18", weights=str(garbage))
    with pytest.raises(LabError, match="'mobilenetv3_smal_100' is not one of timm's .* mobilenetv3_small_100"):
        TimmNet((3, 32, 32), 4, name="mobilenetv3_smal_100")


def classifier(net, k: int = 3, lr: float = 0.1, **kw) -> Classifier:
    return Classifier(net, optimizer=partial(torch.optim.SGD, lr=lr), class_names=[f"c{i}" for i in range(k)], **kw)


@pytest.mark.parametrize("make", [lambda: TimmNet((3, 32, 32), 3, name="mobilenetv3_small_100"),
                                  lambda: ResNet((3, 32, 32), 3)], ids=["timm", "resnet"])
def test_backbone_lr_scale_sets_the_backbone_group(make):
    net = make()
    optimizer = classifier(net, backbone_lr_scale=0.1).configure_optimizers()
    head, backbone = optimizer.param_groups
    assert backbone["lr"] == pytest.approx(head["lr"] / 10)
    assert {id(p) for p in head["params"]} == {id(p) for p in net.head.parameters()}
    assert {id(p) for p in backbone["params"]} == {id(p) for p in net.backbone.parameters()}
    assert len(head["params"]) + len(backbone["params"]) == len(list(net.parameters()))


def test_backbone_lr_scale_zero_leaves_the_backbone_unchanged():
    cfg = load([*SMALL, "model=timm", "model.backbone_lr_scale=0", "data.size=32", "data.in_channels=3"])
    datamodule, model = build(cfg)
    before = snapshot(model.net.model)
    trainer(limit_train_batches=1, limit_val_batches=0).fit(model, datamodule=datamodule)  # one step
    after = model.net.model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in names_of(model.net, "backbone"))  # batch norm stats too
    assert any(not torch.equal(after[k], before[k]) for k in names_of(model.net, "head"))


def test_freeze_and_backbone_finetuning_work_for_a_vit():
    # ViT parameters held by the model itself (cls_token, pos_embed) must freeze and unfreeze with the rest.
    net = TimmNet((3, 32, 32), 3, name="vit_tiny_patch16_224", freeze="backbone")
    assert {n for n, p in net.model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    cfg = load([*SMALL, "model=timm", "model.net.name=vit_tiny_patch16_224", "data.size=32", "data.in_channels=3"])
    datamodule, model = build(cfg)
    cls_token = model.net.model.cls_token.detach().clone()
    finetune = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=0.1)
    t = trainer(epochs=1, callbacks=[finetune], limit_val_batches=0)
    t.fit(model, datamodule=datamodule)
    assert torch.equal(model.net.model.cls_token, cls_token)  # epoch 0: the head only
    finetune = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=0.1)
    t = trainer(epochs=2, callbacks=[finetune], limit_val_batches=0)
    t.fit(model, datamodule=datamodule)  # afresh: epoch 1 unfreezes
    assert len(t.optimizers[0].param_groups) == 2
    assert not torch.equal(model.net.model.cls_token, cls_token)


def test_bce_accuracy_is_that_of_its_logits():
    cfg = load([*SMALL, "data.classes=2", "model=mlp", "model.loss=bce", "model.optimizer.lr=0.01"])
    datamodule, model = build(cfg)
    t = trainer(epochs=2)
    t.fit(model, datamodule=datamodule)
    result = t.test(model, datamodule=datamodule, verbose=False)[0]
    model.eval()
    x, y = next(iter(datamodule.test_dataloader()))  # the 16 test images in one batch
    with torch.no_grad():
        z = model(datamodule.prepare_batch(x, training=False))
    assert z.shape == (16, 1)  # one logit, sigmoid(z) = P(class 1)
    assert result["test/acc"] == pytest.approx(((z[:, 0] > 0).long() == y).float().mean().item())
    p = model.probabilities(z)
    assert torch.allclose(p[:, 1], torch.sigmoid(z[:, 0])) and torch.allclose(p.sum(1), torch.ones(16))
    assert result["test/loss"] == pytest.approx(F.binary_cross_entropy_with_logits(z[:, 0], y.float()).item(),
                                                rel=1e-5)


def test_bce_refuses_more_than_two_classes():
    with pytest.raises(LabError, match=r"model.loss=bce is for two classes .* has 10: .*cross_entropy or mse"):
        classifier(MLP((1, 4, 4), 10), k=10, loss="bce")
    with pytest.raises(LabError, match="'hinge' is not known"):
        classifier(MLP((1, 4, 4), 3), loss="hinge")


class Flat(torch.nn.Module):
    def forward(self, x):  # (N, 1, 1, K) -> logits (N, K): the pixels themselves
        return x.flatten(1)


def test_mse_is_the_slides_formula():
    # softmax([0, ln 3]) = [1/4, 3/4]; one-hot targets of class 1, then of class 0.
    z = torch.tensor([[0.0, math.log(3)], [0.0, math.log(3)]])
    y = torch.tensor([1, 0])
    model = classifier(Flat(), k=2, loss="mse")
    per_sample = [((0.25 - 0) ** 2 + (0.75 - 1) ** 2) / 2, ((0.25 - 1) ** 2 + (0.75 - 0) ** 2) / 2]
    # The loss the Classifier trains with (its own private method: the module's only way to it).
    assert model._loss(z, y, reduction="none").tolist() == pytest.approx(per_sample)  # noqa: SLF001
    assert model._loss(z, y).item() == pytest.approx(sum(per_sample) / 2)  # noqa: SLF001 - 0.3125
    smoothed = classifier(Flat(), k=2, loss="mse", label_smoothing=0.2)  # targets [0.1, 0.9], [0.9, 0.1]
    assert smoothed._loss(z, y).item() == pytest.approx((0.0225 + 0.4225) / 2)  # noqa: SLF001
    assert torch.allclose(model.probabilities(z), torch.tensor([[0.25, 0.75]] * 2))


def test_mse_trains():
    cfg = load([*SMALL, "data.n_train=256", "model=mlp", "model.loss=mse", "model.optimizer.lr=0.01"])
    datamodule, model = build(cfg)
    t = trainer(epochs=3)
    t.fit(model, datamodule=datamodule)
    assert t.callback_metrics["val/acc"] > 0.5  # 4 classes: chance is 0.25


def test_parameter_count_is_logged(mlflow_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    from lab.train.job import run

    cfg = load([*SMALL, "model=timm", "data.size=32", "data.in_channels=3", "trainer.max_epochs=1",
                "trainer.enable_progress_bar=false"])
    run(cfg, tmp_path / "out")
    client = MlflowClient(mlflow_uri)
    (logged,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    n = sum(p.numel() for p in timm.create_model("mobilenetv3_small_100", num_classes=4, in_chans=3).parameters())
    assert logged.data.metrics["model/params"] == n
