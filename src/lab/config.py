"""Where conf/ lives, and composing it outside `lab train` (sweep workers, tests)."""
import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig


def conf_dir() -> Path:
    """$LAB_CONF_DIR, else the conf/ of this source checkout, else ./conf."""
    if os.environ.get("LAB_CONF_DIR"):
        return Path(os.environ["LAB_CONF_DIR"]).resolve()
    checkout = Path(__file__).resolve().parents[2] / "conf"
    return checkout if checkout.is_dir() else Path("conf").resolve()


def load(overrides: list[str] = (), config_name: str = "train") -> DictConfig:
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="lab"):
        return compose(config_name=config_name, overrides=list(overrides))
