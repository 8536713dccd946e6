"""`lab best`: the best trial of a sweep, printed, exported as an experiment config that replays it."""
import json
import shlex
from pathlib import Path

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from lab import config
from lab.analysis import registry, results
from lab.errors import LabError
from lab.sweep import outcome, ranking, spec
from lab.sweep.objectives import objectives


def experiment_yaml(sweep: spec.Sweep, trial: optuna.trial.FrozenTrial) -> str:
    """An experiment config equal to the trial: the base experiment, group choices, then values."""
    experiments, groups, values = [], [], OmegaConf.create({})
    for override in OverridesParser.create().parse_overrides(sweep.model_overrides(trial)):
        key = override.key_or_group
        if key == "experiment":
            experiments.append(f"/experiment/{override.value()}")
        elif config.is_group(key):  # a config group: choose it in the defaults list
            groups.append({f"override /{key}": override.value()})
        else:
            OmegaConf.update(values, key, override.value(), force_add=True)
    names = [o.metric for o in objectives(sweep.spec)]
    header = (f"# @package _global_\n# Trial {trial.number} of study {sweep.spec.study}: "
              f"{ranking.values_text(names, trial)}\n# params: {json.dumps(trial.params)}\n"
              f"# trained as: lab train {shlex.join(sweep.model_overrides(trial))}\n")
    return header + OmegaConf.to_yaml(OmegaConf.merge({"defaults": [*experiments, *groups, "_self_"]}, values))


def chosen_trial(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    trial = trials.get(number)
    if trial is None or not trial.params:
        have = [n for n, t in trials.items() if t.params]
        raise LabError(f"--trial {number} is not a trial of study {study.study_name!r} with parameters: its trials "
                       f"are {have[0]}..{have[-1]}." if have else f"--trial {number}: study {study.study_name!r} "
                       "has no trial yet.")
    return trial


def check_export(path: Path, study: str) -> None:
    """Replaces only an earlier export of the same study: `--export conf/experiment/digits_mlp.yaml` once wrote over
    the experiment the sweep itself starts from, which then named itself as its own base."""
    if path.is_dir():
        raise LabError(f"--export {path} is a folder: give a file name, e.g. {path / (study + '_best.yaml')}.")
    if path.exists():
        head = path.read_text(errors="replace").splitlines()[:2]
        if len(head) < 2 or not head[1].startswith("# Trial ") or f" of study {study}:" not in head[1]:
            raise LabError(f"--export {path} exists and is not an earlier export of study {study!r}: it is left as "
                           "it is; give another file name.")


def write_export(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as err:
        raise LabError(f"--export {path} cannot be written ({err.strerror or err}): give a path in a folder you can "
                       "write to.") from err


def command(args) -> None:
    sweep, _, study, storage = results.open_study(args)
    chosen = chosen_trial(study, args.trial) if args.trial is not None else None  # a wrong --trial: nothing printed
    name = f"{sweep.spec.study}_best" if chosen is None else f"{sweep.spec.study}_trial{args.trial}"
    path = Path(args.export) if args.export else config.export_dir() / f"{name}.yaml"
    check_export(path, sweep.spec.study)
    outcome.close_if_done(sweep, study, results.mlflow_uri(), storage)
    best = outcome.print_best(sweep, study)
    if chosen is not None:  # any trial of any study: a Pareto front member, a runner-up
        best = chosen
        names = [o.metric for o in objectives(sweep.spec)]
        print(f"trial {best.number} ({best.state.name}): {ranking.values_text(names, best)}")
    elif best is None:
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        raise LabError(f"study {sweep.spec.study!r} has no completed trial to export yet"
                       + (" that meets the constraints: export one with --trial N." if complete else "."))
    write_export(path, experiment_yaml(sweep, best))
    print(f"exported: {path}")
    found = [d / "experiment" for d in config.search_path()]
    if path.resolve().parent in found:
        print(f"reproduce: lab train experiment={path.stem}")
    else:
        print(f"reproduce: move it to {config.export_dir()}/ and run lab train experiment={path.stem}")
    if args.trial is None:  # the winner becomes models:/<study>@champion; a member picked by hand does not
        registry.register(sweep.spec.study, best)
