"""Every config in conf/ composes, builds and runs a forward pass; new YAML files are picked up by the globs."""
from pathlib import Path

import pytest
import torch
import yaml

from lab.config import conf_dir, load
from lab.train import build, run

CONF = Path(__file__).resolve().parents[1] / "conf"
DATA = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def test_globs_see_the_configs():
    assert conf_dir() == CONF
    assert {"synthetic", "digits", "fashion_mnist", "image_folder"} <= set(DATA)
    assert {"linear", "mlp", "cnn", "resnet"} <= set(MODELS)
    assert EXPERIMENTS


def forward(cfg):
    datamodule, model = build(cfg)
    x, y = next(iter(datamodule.train_dataloader()))
    logits = model(datamodule.prepare_batch(x, training=True))
    return datamodule, logits, y


def min_side(model: str) -> int:
    net = yaml.safe_load((CONF / "model" / f"{model}.yaml").read_text())["net"]
    return 32 if net["_target_"].endswith("ResNet") else 12  # ResNet downsamples 32x


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


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment(experiment, small_data, mlflow_uri, tmp_path):
    composed = load([f"experiment={experiment}"])
    cfg = load([f"experiment={experiment}", *small_data(composed.data._target_)])
    # The experiment still decides the data's kind and shape; only where it comes from changed.
    assert cfg.data._target_ == composed.data._target_
    assert cfg.data.get("image_size") == composed.data.get("image_size")
    assert cfg.model == composed.model
    datamodule, logits, y = forward(cfg)
    if composed.data.get("image_size"):
        assert datamodule.shape[1:] == (composed.data.image_size,) * 2
    assert logits.shape == (len(y), datamodule.num_classes)
    # ...and trains for one epoch end to end at its own image size, callbacks and optimizer included.
    results = run(load([f"experiment={experiment}", *small_data(composed.data._target_), "trainer.max_epochs=1",
                        "trainer.enable_progress_bar=false"]), tmp_path / "out")
    assert 0.0 <= results["test/acc"] <= 1.0 and results["train/loss"] == results["train/loss"]
