"""The nets on their own: shape checks, bad settings, local ResNet weights and freezing."""
import pytest
import torch
import torchvision

from lab.errors import LabError
from lab.train.nets import CNN, MLP, Linear
from lab.train.resnet import ResNet


@pytest.mark.parametrize("side", [7, 8, 28])
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_cnn_output_shape(side, kernel_size):
    net = CNN((1, side, side), 5, channels=[4, 8], kernel_size=kernel_size, hidden=[16])
    assert net(torch.zeros(3, 1, side, side)).shape == (3, 5)


def test_cnn_image_too_small_names_size():
    with pytest.raises(LabError, match="image size 3x3 is too small") as err:
        CNN((1, 3, 3), 10, channels=[32, 64])
    assert "4x4" in str(err.value)
    CNN((1, 4, 4), 10, channels=[32, 64])  # the smallest that fits


def test_cnn_even_kernel_raises():
    with pytest.raises(LabError, match="kernel_size=4"):
        CNN((1, 7, 7), 10, channels=[8], kernel_size=4)


@pytest.mark.parametrize("make", [
    lambda: MLP((1, 8, 8), 10, activation="swish"),
    lambda: CNN((1, 8, 8), 10, activation="swish"),
])
def test_unknown_activation_raises(make):
    with pytest.raises(LabError, match="'swish'"):
        make()


def test_unknown_init_and_pool_raise():
    with pytest.raises(LabError, match="'orthogonal'"):
        Linear((1, 4, 4), 3, init="orthogonal")
    with pytest.raises(LabError, match="'median'"):
        CNN((1, 8, 8), 3, pool="median")


@pytest.mark.parametrize("init", ["default", "he", "xavier"])
def test_mlp_inits(init):
    net = MLP((3, 4, 4), 7, hidden=[16, 8], activation="tanh", dropout=0.1, init=init)
    assert net(torch.zeros(2, 3, 4, 4)).shape == (2, 7)
    if init != "default":
        assert all(not m.bias.detach().any() for m in net.modules() if isinstance(m, torch.nn.Linear))


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    torch.manual_seed(123)
    state = torchvision.models.resnet18().state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(state, path)
    return path, state


def test_resnet_loads_local_weights(resnet18_file):
    path, state = resnet18_file
    net = ResNet((3, 32, 32), 4, weights=str(path))
    for name in ("conv1.weight", "layer3.1.conv2.weight", "layer4.0.bn1.running_var"):
        assert torch.equal(net.model.state_dict()[name], state[name]), name
    # timm's ResNet computes what torchvision's does from the same file: the features before the head agree
    tv = torchvision.models.resnet18()
    tv.load_state_dict(state)
    tv.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # eval: a forward in train mode would move the batch norms' running statistics
        assert torch.allclose(net.eval().model.forward_head(net.model.forward_features(x), pre_logits=True),
                              tv.eval()(x), atol=1e-6)
    assert net.train()(torch.zeros(2, 3, 32, 32)).shape == (2, 4)


def test_resnet_torchvision_weights_name_loads_from_the_hub_cache(resnet18_file, tmp_path, monkeypatch):
    path, state = resnet18_file
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cached = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]  # where torch.hub keeps a download
    cached.parent.mkdir(parents=True)
    cached.write_bytes(path.read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    net = ResNet((1, 32, 32), 3, weights="IMAGENET1K_V1")
    assert torch.allclose(net.model.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))


def test_resnet_grayscale_input_sums_pretrained_filters(resnet18_file):
    path, state = resnet18_file
    net = ResNet((1, 32, 32), 3, weights=str(path))
    assert torch.allclose(net.model.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    assert net(torch.zeros(2, 1, 32, 32)).shape == (2, 3)


def test_resnet_freeze_backbone_trains_head_only(resnet18_file):
    path, _ = resnet18_file
    net = ResNet((3, 32, 32), 4, weights=str(path), freeze="backbone", dropout=0.2)
    trainable = {name for name, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"model.fc.weight", "model.fc.bias"}
    everything = ResNet((3, 32, 32), 4, freeze="none")
    assert all(p.requires_grad for p in everything.parameters())


@pytest.mark.parametrize("weights", ["/no/such/resnet18.pth", "IMAGENET_NOPE"])
def test_resnet_bad_weights_name_raises(weights):
    with pytest.raises(LabError, match=f"model.net.weights={weights}"):
        ResNet((3, 32, 32), 4, weights=weights)


def test_resnet_weights_of_another_arch_raise(tmp_path):
    path = tmp_path / "small.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(LabError, match="does not fit resnet18"):
        ResNet((3, 32, 32), 4, weights=str(path))


def test_resnet_image_too_small_names_size_and_arch():
    with pytest.raises(LabError, match=r"image size 16x16 is too small for resnet18: it needs at least 32x32\. "
                                       r"Raise data.image_size or choose another model.net.arch"):
        ResNet((3, 16, 16), 4)
    assert ResNet.smallest_side({"arch": "resnet34"}) == ResNet.MIN_SIDE


def test_resnet_bad_arch_and_freeze_raise():
    with pytest.raises(LabError, match="'resnet7'"):
        ResNet((3, 32, 32), 4, arch="resnet7")
    with pytest.raises(LabError, match="'head'"):
        ResNet((3, 32, 32), 4, freeze="head")


def test_a_checkpoint_of_labs_earlier_resnet_loads():
    """lab's own ResNet (before it was timm's) named its head model.fc.1 and its class lab.train.nets.ResNet:
    runs and checkpoints made then load into today's."""
    from hydra.utils import get_class

    from lab.train import rebuild

    assert get_class(rebuild.MOVED["lab.train.nets.ResNet"]) is ResNet
    net = ResNet((1, 32, 32), 3, dropout=0.2)
    old = {k.replace("model.fc.", "model.fc.1."): v.clone() for k, v in net.state_dict().items()}
    assert "model.fc.1.weight" in old and "model.fc.weight" not in old
    again = ResNet((1, 32, 32), 3, dropout=0.2)
    again.load_state_dict(old)
    assert torch.equal(again.model.fc.weight, net.model.fc.weight) and torch.equal(again.model.fc.bias, net.model.fc.bias)
