"""Where the configs are, and composing them outside `lab train` (sweep workers, tests).

The configs that ship with lab live in the package (lab/conf: in a checkout, a link to the repository's
conf/). A user's own folder, $LAB_CONF_DIR or else ./conf when the working directory has one, joins Hydra's
search path: its files add experiments (and data, models...) to the shipped ones. A user folder that holds
its own train.yaml is a whole config tree and comes first: its files also override shipped ones.
(Hydra looks for the primary config only in the primary folder, so a folder without train.yaml can only
come second.)
"""
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from lab import settings
from lab.errors import LabError

SHIPPED = Path(__file__).resolve().parent / "conf"


def user_dir() -> Path | None:
    chosen = settings.get("LAB_CONF_DIR")
    if chosen is not None:
        return chosen
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


def make_importable() -> list[str]:
    """The working folder, and the folder holding a user conf/, on sys.path as a Hydra app's own folder is:
    `_target_: mynets.MyNet` finds ./mynets.py under the `lab` console script too (whose sys.path[0] is its bin/
    folder), in every process of a sweep. First, where `python -m` puts the working folder. Returns what it added."""
    here, user = Path.cwd().resolve(), user_dir()
    wanted = dict.fromkeys(str(f) for f in (here, user.parent if user is not None else here))
    added = [f for f in wanted if f not in sys.path and not (f == str(here) and "" in sys.path)]
    sys.path[0:0] = added
    return added


def group_defaults() -> dict[str, str | None]:
    """The option the primary config picks for each group: `- optimizer: adam`, `- scheduler: null`."""
    defaults = OmegaConf.load(conf_dir() / "train.yaml").get("defaults") or []
    return {str(k): v for d in defaults if OmegaConf.is_dict(d) for k, v in d.items()}


def check_groups(overrides: list[str]) -> None:
    """`optimizer=null` (any group set to null): one sentence instead of Hydra's ValueError traceback. A group
    is chosen by name, and one that is off by default is left out by not naming it (`~group` removes it)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for text in overrides:
        try:
            (override,) = parser.parse_overrides([text])
        except OverrideParseException:
            continue  # Hydra's own message, in lab's words (compose_errors), says what is wrong with it
        group = override.key_or_group
        if override.is_delete() or override.value() is not None or override.package or not is_group(group):
            continue
        choices = ", ".join(sorted({f.stem for d in search_path() for f in (d / group).glob("*.yaml")}))
        default = group_defaults().get(group)
        if default is None:
            raise LabError(f"{text} is not valid: {group} is off unless one of its options is named, so leave "
                           f"{text} out (~{group} removes one an experiment set); its options are {choices}.")
        raise LabError(f"{text} is not valid: every run needs one of the {group} configs, {choices} (the files in "
                       f"conf/{group}/); leave {text} out for the default, {group}={default}.")


def load(overrides: list[str] = (), config_name: str = "train") -> DictConfig:
    check_groups(list(overrides))
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="lab"):
        return compose(config_name=config_name, overrides=[*search_path_override(), *overrides])
