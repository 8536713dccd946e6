"""Warm start: configurations from an exported best file or from another study's best trials, enqueued as
the first trials of a new study (only when it is created).

`warm_start: [conf/experiment/quickstart_best.yaml, {study: quickstart, storage: runs/quickstart/study.journal,
top: 5}]`. An exported file (`lab best`) carries its params on a `# params: {json}` line. Optuna accepts
enqueued values outside the space with a warning and then trains them; here they are refused, by name.
The entries' shape is checked with the rest of the file (spec.check_warm_start); they are read here, when
study.py creates the study.
"""
import json
from pathlib import Path
from typing import Any

import optuna

from lab import config
from lab.errors import LabError
from lab.sweep import ranking
from lab.sweep.spec import WARM_DEFAULT_TOP, contains, encode_choice, plain
from lab.sweep.storage import open_storage
from lab.uris import mask_password

ATTR = "lab.warm_start"  # user attr of an enqueued trial: where its configuration came from


def exported_file(text: str) -> Path:
    """As given, else in the folder `lab best` exports to (`quickstart_best` finds conf/experiment/quickstart_best.yaml)."""
    path = Path(text).expanduser()
    if path.is_file():
        return path
    for candidate in (config.export_dir() / path.name, config.export_dir() / f"{path.name}.yaml"):
        if not path.is_absolute() and candidate.is_file():
            return candidate
    raise LabError(f"warm_start: {text} does not exist (nor in {config.export_dir()}): give a file `lab best` "
                   "exported, e.g. conf/experiment/quickstart_best.yaml.")


def from_file(text: str) -> list[tuple[dict, str]]:
    path = exported_file(text)
    for line in path.read_text().splitlines():
        if line.startswith("# params: "):
            try:
                return [(json.loads(line.removeprefix("# params: ")), str(path))]
            except json.JSONDecodeError as err:
                raise LabError(f"warm_start: {path}: its `# params:` line is not valid JSON ({err}).") from err
    raise LabError(f"warm_start: {path} has no `# params: {{...}}` line: give a file written by `lab best`, or "
                   "{study: NAME} for another study's best trials.")


def from_study(entry: dict) -> list[tuple[dict, str]]:
    name = entry["study"]
    storage = str(entry.get("storage") or Path("runs") / name / "study.journal")
    try:
        source = optuna.load_study(study_name=name, storage=open_storage(storage, create=False))
    except KeyError as err:
        raise LabError(f"warm_start: no study {name!r} in {mask_password(storage)}: run its sweep first, or give "
                       "storage: where it ran.") from err
    best = ranking.ranked(source)[: int(entry.get("top", WARM_DEFAULT_TOP))]
    if not best:
        raise LabError(f"warm_start: study {name!r} in {mask_password(storage)} has no completed trial to start from.")
    return [(t.params, f"study {name} trial {t.number}") for t in best]


def describe(dist: optuna.distributions.BaseDistribution) -> str:
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return f"choices {list(dist.choices)}"
    step = f", step {dist.step}" if dist.step not in (None, 1) else ""
    return f"[{dist.low}, {dist.high}]" + (" (log)" if dist.log else "") + step


def inside(dist: optuna.distributions.BaseDistribution, value: Any) -> bool:
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return encode_choice(value) in dist.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not contains(dist, value):
        return False
    if isinstance(dist, optuna.distributions.IntDistribution):
        return float(value).is_integer() and (int(value) - dist.low) % dist.step == 0
    return dist.step is None or abs(round((value - dist.low) / dist.step) * dist.step - (value - dist.low)) < 1e-9


def resolve(sweep) -> list[tuple[dict, str]]:
    """(params, source) per configuration, in the file's order, checked against the sweep's space. Params the
    space does not search are dropped with a note in sweep.notes; a value outside the space is refused."""
    out = []
    for i, entry in enumerate(map(plain, sweep.spec.warm_start)):
        found = from_file(entry) if isinstance(entry, str) else from_study(entry)
        for params, source in found:
            dropped = sorted(set(params) - set(sweep.space))
            if dropped:
                sweep.notes.append(f"warm start from {source}: {', '.join(dropped)} not searched here: dropped.")
            kept = {name: value for name, value in params.items() if name in sweep.space}
            for name, value in kept.items():
                if not inside(sweep.space[name], value):
                    raise LabError(f"warm_start[{i}] ({source}): {name}={value!r} lies outside this sweep's space "
                                   f"{describe(sweep.space[name])}: widen params.{name}, or leave the entry out.")
            if kept:
                out.append((kept, source))
    return out


def enqueue(study: optuna.Study, configurations: list[tuple[dict, str]]) -> None:
    for params, source in configurations:
        study.enqueue_trial({k: encode_choice(v) for k, v in params.items()}, user_attrs={ATTR: source},
                            skip_if_exists=True)
