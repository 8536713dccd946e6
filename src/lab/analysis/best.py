"""`lab best`: the best trial of a sweep, printed, exported as an experiment config that replays it."""
import json
import shlex
from pathlib import Path

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from lab import config
from lab.errors import LabError
from lab.sweep import commands, spec
from lab.sweep import study as studies
from lab.train import tracking
from lab.uris import absolute_uri


def experiment_yaml(sweep: spec.Sweep, trial: optuna.trial.FrozenTrial) -> str:
    """An experiment config equal to the trial: the base experiment, group choices, then values."""
    experiments, groups, values = [], [], OmegaConf.create({})
    for override in OverridesParser.create().parse_overrides(sweep.replay_overrides(trial)):
        key = override.key_or_group
        if key == "experiment":
            experiments.append(f"/experiment/{override.value()}")
        elif config.is_group(key):  # a config group: choose it in the defaults list
            groups.append({f"override /{key}": override.value()})
        else:
            OmegaConf.update(values, key, override.value(), force_add=True)
    header = (f"# @package _global_\n# Best trial {trial.number} of study {sweep.spec.study}: "
              f"{sweep.spec.metric}={trial.value:.6g}\n# params: {json.dumps(trial.params)}\n"
              f"# trained as: lab train {shlex.join(sweep.replay_overrides(trial))}\n")
    return header + OmegaConf.to_yaml(OmegaConf.merge({"defaults": [*experiments, *groups, "_self_"]}, values))


def command(args) -> None:
    sweep = spec.from_args(args, check=False)
    _, storage = studies.locate(sweep, args.storage, args.out)
    study = studies.load(sweep, storage)
    commands.close_if_done(sweep, study, absolute_uri(tracking.tracking_uri()), storage)
    best = commands.print_best(sweep, study)
    if best is None:
        raise LabError(f"study {sweep.spec.study!r} has no completed trial to export yet.")
    path = Path(args.export) if args.export else config.export_dir() / f"{sweep.spec.study}_best.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(experiment_yaml(sweep, best))
    print(f"exported: {path}")
    found = [d / "experiment" for d in config.search_path()]
    if path.resolve().parent in found:
        print(f"reproduce: lab train experiment={path.stem}")
    else:
        print(f"reproduce: move it to {config.export_dir()}/ and run lab train experiment={path.stem}")
