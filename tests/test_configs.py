"""Every config in conf/ composes, builds and runs a forward pass; new YAML files are picked up by the globs.
Training every experiment for an epoch is the slow tier's part of the registry."""
import math
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import get_class

from lab.config import conf_dir, load
from lab.train.job import build, run

CONF = Path(__file__).resolve().parents[1] / "conf"
DATA = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
SIDE = 12  # image side of a data x model pair, raised to what the net says it needs (MIN_SIDE)
MAX_TRAIN = 2000  # small_data must leave a registry test no more training images than this


def test_globs_see_the_configs():
    assert conf_dir() == CONF
    assert {"synthetic", "digits", "fashion_mnist", "image_folder"} <= set(DATA)
    assert {"linear", "mlp", "cnn", "resnet", "timm"} <= set(MODELS)
    assert EXPERIMENTS


def forward(cfg):
    """(datamodule, (N, K) class logits of a training batch, its labels): a bce net's one output made two."""
    datamodule, model = build(cfg)
    x, y = next(iter(datamodule.train_dataloader()))
    logits = model.class_logits(model(datamodule.prepare_batch(x, training=True)))
    n_train = len(datamodule.splits["train"].y)
    assert n_train <= MAX_TRAIN, (f"{datamodule.name} kept {n_train} training images: give its class small "
                                  "settings (see small_data in tests/conftest.py)")
    return datamodule, logits, y


def min_side(model: str) -> int:
    """The smallest image side the model's net is meant for, as its class says (MIN_SIDE, or smallest_side(net
    settings) where it depends on them, as timm's architectures do; neither: any side)."""
    net = yaml.safe_load((CONF / "model" / f"{model}.yaml").read_text())["net"]
    cls = get_class(net["_target_"])
    need = cls.smallest_side(net) if hasattr(cls, "smallest_side") else getattr(cls, "MIN_SIDE", 1)
    return max(SIDE, need)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("data", DATA)
def test_data_model_pair(data, model, small_data):
    target = yaml.safe_load((CONF / "data" / f"{data}.yaml").read_text())["_target_"]
    side = min_side(model)
    cfg = load([f"data={data}", f"model={model}", *small_data(target, image_size=side)])
    datamodule, logits, y = forward(cfg)
    assert datamodule.shape[1:] == (side, side)
    assert logits.shape == (len(y), datamodule.num_classes)
    assert torch.isfinite(logits).all()


def small_experiment(experiment: str, small_data, *extra: str):
    """The experiment as shipped, with small_data's overrides: its data's kind, shape and its model unchanged."""
    composed = load([f"experiment={experiment}"])
    classes = 2 if composed.model.get("loss") == "bce" else None  # a binary experiment (cats vs dogs)
    cfg = load([f"experiment={experiment}", *small_data(composed.data._target_, classes=classes), *extra])
    assert cfg.data._target_ == composed.data._target_
    assert cfg.data.get("image_size") == composed.data.get("image_size")
    assert cfg.model == composed.model
    return composed, cfg


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_builds_and_runs_a_batch(experiment, small_data):
    composed, cfg = small_experiment(experiment, small_data)
    datamodule, logits, y = forward(cfg)
    if composed.data.get("image_size"):
        assert datamodule.shape[1:] == (composed.data.image_size,) * 2
    assert logits.shape == (len(y), datamodule.num_classes)
    assert torch.isfinite(logits).all()


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_trains_one_epoch(experiment, small_data, mlflow_uri, tmp_path):
    # ...end to end at its own image size, callbacks and optimizer included.
    _, cfg = small_experiment(experiment, small_data, "trainer.max_epochs=1", "trainer.enable_progress_bar=false")
    results = run(cfg, tmp_path / "out")
    assert 0.0 <= results["test/acc"] <= 1.0 and math.isfinite(results["train/loss"])


@pytest.mark.parametrize("overrides, named", [
    (["model=mlp", "model.net.dropout=1.5"], "model.net.dropout=1.5 is not valid: it must be a number in [0, 1)"),
    (["model=cnn", "model.net.dropout=1.0"], "model.net.dropout=1.0"),  # trains nothing: every unit dropped
    (["model=mlp", "model.net.hidden=[-5]"], "model.net.hidden=[-5] is not valid"),
    (["model=mlp", "model.net.hidden=[0]"], "model.net.hidden=[0]"),
    (["model=cnn", "model.net.channels=[0]"], "model.net.channels=[0] is not valid"),
    (["model=cnn", "model.net.channels=[]"], "model.net.channels=[]"),
])
def test_net_sizes_and_dropout_out_of_range_are_refused_before_a_run(overrides, named):
    """They used to end in a torch traceback when the net was built, or train a net that cannot learn."""
    from lab.config_schema import check_config
    from lab.errors import LabError

    with pytest.raises(LabError) as err:
        check_config(load(["data=synthetic", *overrides]))
    assert named in str(err.value)


def test_in_range_net_values_pass():
    from lab.config_schema import check_config

    check_config(load(["data=synthetic", "model=mlp", "model.net.hidden=[]", "model.net.dropout=0.0"]))
    check_config(load(["data=synthetic", "model=cnn", "model.net.channels=[8]", "model.net.dropout=0.5"]))
