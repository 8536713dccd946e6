"""Where the configs are, and composing them outside `lab train` (sweep workers, tests).

The configs that ship with lab live in the package (lab/conf: in a checkout, a link to the repository's
conf/). A user's own folder, $LAB_CONF_DIR or else ./conf when the working directory has one, joins Hydra's
search path: its files add experiments (and data, models...) to the shipped ones. A user folder that holds
its own train.yaml is a whole config tree and comes first: its files also override shipped ones.
(Hydra looks for the primary config only in the primary folder, so a folder without train.yaml can only
come second.)
"""
import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

SHIPPED = Path(__file__).resolve().parent / "conf"


def user_dir() -> Path | None:
    if os.environ.get("LAB_CONF_DIR"):
        return Path(os.environ["LAB_CONF_DIR"]).expanduser().resolve()
    local = Path("conf").resolve()
    return local if local.is_dir() and local != SHIPPED.resolve() else None


def search_path() -> list[Path]:
    """Where configs are looked up, first match wins."""
    user, shipped = user_dir(), SHIPPED.resolve()
    if user is None:
        return [shipped]
    return [user, shipped] if (user / "train.yaml").is_file() else [shipped, user]


def conf_dir() -> Path:
    """The primary config folder (the one holding train.yaml that comes first)."""
    return search_path()[0]


def export_dir() -> Path:
    """Where `lab best` writes experiments: the user's folder (./conf when none is set), never the package."""
    return (user_dir() or Path("conf").resolve()) / "experiment"


def is_group(name: str) -> bool:
    return any((d / name).is_dir() for d in search_path())


def groups() -> set[str]:
    return {g.name for d in search_path() for g in d.iterdir() if g.is_dir() and not g.name.startswith((".", "_"))}


def search_path_override() -> list[str]:
    """The Hydra override that puts the folders after the primary one on the search path."""
    rest = search_path()[1:]
    return [f"hydra.searchpath=[{','.join(f'file://{d}' for d in rest)}]"] if rest else []


def load(overrides: list[str] = (), config_name: str = "train") -> DictConfig:
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="lab"):
        return compose(config_name=config_name, overrides=[*search_path_override(), *overrides])
