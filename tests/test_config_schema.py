"""lab/config_schema.py: each rule declared once, and the same sentence whichever door a bad value comes in by:
`lab train`'s fast path (lab.train.api.compose, what the CLI runs), the whole-config check a run and `lab sweep`
make, and the constructor itself, called from Python."""
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lab import config_schema
from lab.config import load
from lab.data.folder import ImageFolder
from lab.data.synthetic import Synthetic
from lab.errors import LabError
from lab.train.api import compose
from lab.train.module import Classifier
from lab.train.nets import MLP

CONF = Path(__file__).resolve().parents[1] / "conf"


def mlp_classifier(**kw) -> Classifier:
    return Classifier(MLP((1, 8, 8), 3, hidden=[4]), optimizer=partial(torch.optim.SGD, lr=0.1),
                      class_names=["a", "b", "c"], **kw)


FOLDER = ["data=image_folder", "data.root=photos"]
# key, a bad value, the constructor given it from Python, the groups whose configs hold the key
SAME_SENTENCE = [
    ("data.batch_size", 0, lambda v: Synthetic(batch_size=v), ["data=synthetic"]),
    ("data.image_size", 0, lambda v: Synthetic(image_size=v), ["data=synthetic"]),
    ("data.channels", 2, lambda v: Synthetic(channels=v), ["data=synthetic"]),
    ("data.val_fraction", 1.0, lambda v: Synthetic(val_fraction=v), ["data=synthetic"]),
    ("data.test_fraction", 0, lambda v: Synthetic(test_fraction=v), ["data=digits"]),
    ("data.resident_max_gb", -1, lambda v: Synthetic(resident_max_gb=v), ["data=synthetic"]),
    ("data.cache_max_gb", 0, lambda v: ImageFolder(root="photos", cache_max_gb=v), FOLDER),
    ("data.max_pixels", 0.5, lambda v: ImageFolder(root="photos", max_pixels=v), FOLDER),
    ("model.label_smoothing", 1.5, lambda v: mlp_classifier(label_smoothing=v), ["data=synthetic", "model=mlp"]),
    ("model.l1", -0.1, lambda v: mlp_classifier(l1=v), ["data=synthetic", "model=mlp"]),
    ("model.backbone_lr_scale", -1, lambda v: mlp_classifier(backbone_lr_scale=v), ["data=synthetic", "model=resnet"]),
]


@pytest.mark.parametrize("key, bad, build, groups", SAME_SENTENCE, ids=[s[0] for s in SAME_SENTENCE])
def test_lab_train_the_run_and_the_constructor_say_the_same_sentence(key, bad, build, groups):
    overrides = [*groups, f"{key}={bad}"]
    with pytest.raises(LabError) as fast:
        compose(overrides)  # what `lab train` and lab.train() check before torch loads
    with pytest.raises(LabError) as whole:
        config_schema.check_config(load(overrides))  # what job.run and `lab sweep`'s up-front checks call
    with pytest.raises(LabError) as built:
        build(bad)
    said = f"{key}={bad!r} is not valid: it must be {config_schema.RULES[key].valid}."
    assert str(fast.value) == str(whole.value) == str(built.value) == said


def test_good_values_pass_every_door():
    cfg = compose(["data=synthetic", "model=mlp", "data.channels=3", "model.label_smoothing=0.1", "model.l1=0"])
    config_schema.check_config(cfg)
    Synthetic(channels=3, image_size=None, val_fraction=0.2)
    mlp_classifier(label_smoothing=0.1, l1=0)


def test_every_rule_names_a_key_of_the_shipped_configs():
    """A rule whose key no config has (an argument renamed) would check nothing: each one is found in the root
    config with some data, model and optimizer."""
    def options(group: str) -> list[str]:
        return sorted(p.stem for p in (CONF / group).glob("*.yaml"))

    absent = object()
    keys: set[str] = set()
    choices = [[f"data={d}"] for d in options("data")]
    choices += [["data=digits", f"model={m}", f"optimizer={o}"] for m in options("model") for o in options("optimizer")]
    for overrides in choices:
        cfg = load(overrides)
        keys |= {k for k in config_schema.RULES if OmegaConf.select(cfg, k, default=absent) is not absent}
    assert set(config_schema.RULES) - keys == set()



def test_a_users_own_model_is_still_checked_from_its_signature(tmp_path, monkeypatch):
    (tmp_path / "own_model.py").write_text(
        "from lab.train.module import Classifier\n\n"
        "class Own(Classifier):\n"
        "    def __init__(self, net, optimizer, temperature: float = 1.0, **kwargs):\n"
        "        super().__init__(net, optimizer, **kwargs)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    base = ["data=synthetic", "model=mlp", "model._target_=own_model.Own"]
    config_schema.check_config(load([*base, "+model.temperature=2.0"]))  # its own argument, followed up to **kwargs
    with pytest.raises(LabError, match=r"^model.temperature='hot' is not valid: it must be a number\.$"):
        config_schema.check_config(load([*base, "+model.temperature=hot"]))
    with pytest.raises(LabError, match=r"model.temprature is not a setting of own_model.Own: did you mean "):
        config_schema.check_config(load([*base, "+model.temprature=2.0"]))
    with pytest.raises(LabError, match=r"^model.l1=-1 is not valid: it must be a number >= 0"):
        config_schema.check_config(load([*base, "model.l1=-1"]))  # the rules of the class it extends


def test_a_bad_value_is_said_before_torch_lightning_or_mlflow_load():
    code = ("import sys\nfrom lab.errors import LabError\nfrom lab.train.api import compose\n"
            "try:\n    compose(['data=digits', 'model.optimizer.lr=-1'])\nexcept LabError as err:\n    print(err)\n"
            "print(sorted(m for m in ('torch', 'pytorch_lightning', 'lightning', 'mlflow') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    said, heavy = done.stdout.strip().splitlines()
    assert said.startswith("model.optimizer.lr=-1 is not valid: it must be a number >= 0"), done.stderr
    assert heavy == "[]"
