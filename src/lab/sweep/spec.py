"""The sweep file: its schema, and every check that must pass before a single worker starts.

Optuna validates a distribution only when a trial samples it, and then the whole optimize() aborts;
building every distribution here surfaces low > high, log with low <= 0 and empty choices up front.
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from lab import config
from lab.errors import LabError, close_matches
from lab.sweep import seeds
from lab.sweep import stop as stop_rules
from lab.sweep.objectives import (
    DIRECTIONS,
    EPOCH_METRICS,
    FINAL_METRICS,
    MODEL_METRICS,
    BoundSpec,
    ObjectiveSpec,
    check_objectives,
    known_metric,
    objectives,
)
from lab.sweep.stack_spec import check_stack, stack_notes

SAMPLERS = ("tpe", "random", "grid", "cmaes", "gp", "qmc", "nsga2")
PRUNERS = ("none", "median", "percentile", "successive_halving", "hyperband", "wilcoxon")
EPOCH_PRUNERS = ("median", "percentile", "successive_halving", "hyperband")  # they compare epochs, not seeds
AGGREGATES = ("mean", "lcb")
LOG_MODELS = ("all", "best")
PARAM_TYPES = ("float", "int", "categorical")


@dataclass
class ParamSpec:
    type: str = "float"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None


@dataclass
class SweepSpec:
    study: str = "???"
    experiment: str | None = None  # conf/experiment/NAME.yaml, the base of every trial
    overrides: list[str] = field(default_factory=list)
    metric: str = "val/acc"
    direction: str = "maximize"
    n_trials: int = 20  # total for the study, across resumes
    timeout: float | None = None  # seconds from this launch; no new trial starts after it
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "tpe", "seed": 0})
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    params: dict[str, ParamSpec] = field(default_factory=dict)
    enqueue: list[dict[str, Any]] = field(default_factory=list)  # configurations to try first
    mlflow_experiment: str | None = None  # default: the study name
    max_failures: int = 5  # consecutive failed trials that stop the sweep; 0: never stop
    max_retries: int = 2  # times a trial whose worker process died is run again before it fails for good
    seeds: int = 1  # each trial trains with seeds seed, seed+1, ..., seed+K-1; its value aggregates them (seeds.py)
    aggregate: str = "mean"  # over the seeds: mean, or lcb = mean -/+ one standard error (the cautious choice)
    warm_start: list[Any] = field(default_factory=list)  # exported best files or {study, storage, top} (warm.py)
    stop: dict[str, Any] = field(default_factory=dict)  # {target: value} and/or {patience: N trials} (stop.py)
    log_models: str = "all"  # all: every trial run logs its model; best: none (`lab best` logs the winner's)
    # Several objectives replace metric/direction (which then name the first): the study keeps a Pareto front.
    objectives: list[ObjectiveSpec] = field(default_factory=list)
    constraints: dict[str, BoundSpec] = field(default_factory=dict)  # metric -> {min, max}
    launcher: dict[str, Any] = field(default_factory=dict)  # --launcher slurm's settings (sweep/slurm/settings.py)
    # Up to this many trials of one structure (same net, sizes, epochs, optimizer class, data) train as one
    # vectorised stack in a worker, each its own trial (sweep/stacking.py); auto: measured (stacking.auto_size).
    stack: Any = 1
    # A seeded trial's seeds as one stack (unless the pruner is wilcoxon); false: one after another, each seed
    # resumable from its own last.ckpt when its worker dies.
    stack_seeds: bool = True


def encode_choice(value: Any) -> Any:
    """Optuna's categorical choices must be None/bool/int/float/str; lists travel as their override text."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def override_key(override: str) -> str:
    """`+a.b=1`, `++a.b=1`, `~a.b` and `a.b=1` all address a.b."""
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(*groups: list[str]) -> list[str]:
    """Hydra applies overrides in order and the last value of a key wins: keep only that one, in its place,
    so that `trainer.max_epochs=10 trainer.max_epochs=1` is stored and replayed as `trainer.max_epochs=1`."""
    merged: dict[str, str] = {}
    for override in (o for group in groups for o in group):
        key = override_key(override)
        before = merged.pop(key, "")
        added = before[: len(before) - len(before.lstrip("+"))]  # `+key=a` then `key=b`: b still needs the +
        if added and not override.startswith(("+", "~")):
            override = added + override
        merged[key] = override
    return list(merged.values())


def same_overrides(a: list[str], b: list[str]) -> bool:
    """The same settings as Hydra reads them: in any order, `lr=1e-1` as `lr=0.1`, `'[8]'` as `[8]`. A number's
    type counts (max_epochs=1 is not max_epochs=1.0)."""
    def read(overrides):
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        return sorted((o.key_or_group, str(o.package), o.type.name, repr(o.value())) for o in parsed)

    try:
        return read(a) == read(b)
    except Exception:  # noqa: BLE001 - text Hydra cannot read: only the same text is the same
        return list(a) == list(b)


def override_value(value: Any) -> str:
    """A Python value as Hydra override text: json covers numbers, bools, null, lists; bare words stay bare."""
    if isinstance(value, str):
        if value.startswith(("[", "{")) or value.replace("_", "").replace("-", "").replace(".", "").isalnum():
            return value
        return json.dumps(value)
    return json.dumps(value)


def distribution(name: str, p: ParamSpec) -> optuna.distributions.BaseDistribution:
    if p.type not in PARAM_TYPES:
        raise LabError(f"params.{name}.type={p.type!r} is not valid: choose one of {list(PARAM_TYPES)}.")
    try:
        if p.type == "categorical":
            if not p.choices:
                raise LabError(f"params.{name}.choices is empty or missing: list at least one value.")
            return optuna.distributions.CategoricalDistribution([encode_choice(c) for c in p.choices])
        if p.low is None or p.high is None:
            raise LabError(f"params.{name} ({p.type}) needs both low and high.")
        bad = [f"{k}={v}" for k, v in (("low", p.low), ("high", p.high), ("step", p.step))
               if v is not None and not math.isfinite(v)]
        if bad:
            raise LabError(f"params.{name}: {', '.join(bad)} is not valid: bounds and steps are finite numbers.")
        if p.log and p.low <= 0:
            raise LabError(f"params.{name}: log=true needs low > 0, got low={p.low}.")
        if p.log and p.step is not None:
            raise LabError(f"params.{name}: step and log=true cannot be combined (Optuna forbids it).")
        if p.low > p.high:
            raise LabError(f"params.{name}: low={p.low} is greater than high={p.high}.")
        if p.type == "int":
            if p.low != int(p.low) or p.high != int(p.high):
                raise LabError(f"params.{name}: int bounds must be whole numbers, got low={p.low}, high={p.high}.")
            return optuna.distributions.IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        return optuna.distributions.FloatDistribution(p.low, p.high, log=p.log, step=p.step)
    except ValueError as err:  # what Optuna's own checks say, with the parameter named
        raise LabError(f"params.{name}: {err}") from err


def grid_values(name: str, dist) -> list:
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, optuna.distributions.IntDistribution):
        return list(range(dist.low, dist.high + 1, dist.step))
    if dist.step is None:
        raise LabError(f"params.{name}: the grid sampler needs a step for a float parameter (or use choices).")
    n = int(math.floor((dist.high - dist.low) / dist.step + 1e-9)) + 1
    return [round(dist.low + i * dist.step, 12) for i in range(n)]


def contains(dist, value) -> bool:
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return encode_choice(value) in dist.choices
    try:
        return dist.low <= float(value) <= dist.high
    except (TypeError, ValueError):
        return False


@dataclass
class Sweep:
    """A validated sweep: the spec plus its Optuna distributions and base overrides.

    base_overrides: what every trial starts from (the file's experiment and overrides, then the command
    line's); a study stores them when it is created, and commands that read a study adopt the stored ones.
    """

    spec: SweepSpec
    path: Path
    space: dict[str, optuna.distributions.BaseDistribution]
    base_overrides: list[str]
    cli_overrides: list[str] = field(default_factory=list)  # the command line's part of base_overrides
    notes: list[str] = field(default_factory=list)  # said once before the sweep starts
    typed: str = ""  # the file as the user named it (`quickstart` for a shipped one), for messages

    @property
    def grid_size(self) -> int | None:
        if self.spec.sampler.get("name") != "grid":
            return None
        return math.prod(len(grid_values(n, d)) for n, d in self.space.items())

    @property
    def mlflow_experiment(self) -> str:
        return self.spec.mlflow_experiment or self.spec.study

    def trial_overrides(self, params: dict[str, Any], base: bool = False) -> list[str]:
        """The params as overrides; base=True: after the base overrides, with the params winning."""
        own = [f"{name}={override_value(value)}" for name, value in params.items()]
        return merge_overrides(self.base_overrides, own) if base else own

    def replay_overrides(self, trial) -> list[str]:
        """What `lab train` needs to train exactly what a trial trained: base overrides, params, and the
        worker's thread count (a different count sums in another order: another last digit)."""
        threads = trial.user_attrs.get("threads")
        own = threads and not any(override_key(o) == "threads" for o in self.base_overrides)  # the user's wins
        return self.trial_overrides(trial.params, base=True) + ([f"threads={threads}"] if own else [])

    def model_overrides(self, trial) -> list[str]:
        """replay_overrides, and for a seeded trial the seed of the run holding its model: a replay of what
        `lab best` prints or exports then retrains the registered model, not the trial's first seed."""
        seed = seeds.model_seed(trial)
        return merge_overrides(self.replay_overrides(trial), [f"seed={seed}"] if seed is not None else [])

    def space_json(self) -> str:
        return json.dumps({k: optuna.distributions.distribution_to_json(d) for k, d in self.space.items()},
                          sort_keys=True)


SHIPPED_SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"  # in a checkout, a link to sweeps/


def find(path: Path) -> Path:
    """The sweep file: as given, else one shipped with lab (`sweeps/quickstart.yaml` or `quickstart` from
    any folder, once lab is installed)."""
    if path.is_file():
        return path
    name = path.name if path.suffix else f"{path.name}.yaml"
    shipped = SHIPPED_SWEEPS / name
    if not path.is_absolute() and path.parent in (Path("."), Path("sweeps")) and shipped.is_file():
        return shipped
    names = sorted(p.stem for p in SHIPPED_SWEEPS.glob("*.yaml"))
    raise LabError(f"sweep file {path} does not exist; the sweeps shipped with lab are {', '.join(names)} "
                   "(give a name, e.g. `lab sweep quickstart`, or a path to your own file).")


def file_error(path: Path, raw, err: OmegaConfBaseException) -> LabError:
    """One sentence for a sweep file OmegaConf refuses: the key, what is wrong, the likely meant key."""
    key = str(getattr(err, "full_key", None) or getattr(err, "key", None) or "")
    fields = sorted(SweepSpec.__dataclass_fields__)
    if key == "study" and "study" not in (raw or {}):
        return LabError(f"{path} sets no study: a sweep file names its study (study: NAME) and the params to search, "
                        "e.g. sweeps/quickstart.yaml.")
    if not isinstance(raw, DictConfig):
        return LabError(f"{path} is not a sweep file: it holds a {type(raw).__name__.removesuffix('Config').lower()}, "
                        "and a sweep file is a mapping (study: NAME, params: {...}), e.g. sweeps/quickstart.yaml.")
    if isinstance(err, ConfigKeyError):
        leaf = key.rsplit(".", 1)[-1]
        in_param = key.startswith("params.")
        valid = sorted(ParamSpec.__dataclass_fields__) if in_param else fields
        close = close_matches(leaf, valid, n=1)
        where = f"a param's setting (in {key.rsplit('.', 1)[0]})" if in_param else "a key of a sweep file"
        hint = f" Did you mean {close[0]}?" if close else ""
        return LabError(f"{path}: {leaf} is not {where}.{hint} Valid: {', '.join(valid)}.")
    if key.startswith("params.") and "ParamSpec" in str(err):
        return LabError(f"{path}: {key} must be a mapping such as {{type: float, low: 1.0e-4, high: 1.0e-1, log: "
                        "true} or {type: categorical, choices: [16, 32]}, not a single value.")
    if isinstance(err, ValidationError) and key:
        return LabError(f"{path}: {key} is not valid: {str(err).splitlines()[0]}.")
    return LabError(f"{path}: invalid sweep file at {key!r}: {str(err).splitlines()[0]}. Valid keys: "
                    f"{', '.join(fields)}; each param takes {', '.join(sorted(ParamSpec.__dataclass_fields__))}.")


def load(path: str | Path, extra_overrides: list[str] = (), n_trials: int | None = None, check: bool = True,
         max_failures: int | None = None, max_retries: int | None = None) -> Sweep:
    """check=False skips composing the config per parameter (workers the parent already checked for).
    n_trials, max_failures, max_retries: command-line values that replace the file's."""
    typed, path = str(path), find(Path(path))
    try:
        raw = OmegaConf.load(path)
    except yaml.YAMLError as err:
        raise LabError(f"{path} is not valid YAML: {err}") from err
    try:
        spec_cfg = OmegaConf.merge(OmegaConf.structured(SweepSpec), raw)
        spec: SweepSpec = OmegaConf.to_object(spec_cfg)
    except OmegaConfBaseException as err:
        raise file_error(path, raw, err) from err
    for key, value in (("n_trials", n_trials), ("max_failures", max_failures), ("max_retries", max_retries)):
        if value is not None:
            setattr(spec, key, value)
    check_objectives(spec, raw, path)
    check_spec(spec, path)
    check_seeds(spec, path)
    check_stack(spec, path)
    stop_rules.check(spec.stop, path)
    check_warm_start(spec.warm_start, path)
    space = {name: distribution(name, p) for name, p in spec.params.items()}
    exp = [f"experiment={spec.experiment}"] if spec.experiment else []
    sweep = Sweep(spec, path, space, merge_overrides(exp, spec.overrides, list(extra_overrides)), list(extra_overrides),
                  typed=typed)
    sweep.notes += seed_notes(spec) + stack_notes(spec)
    for i, values in enumerate(spec.enqueue):
        for name, value in values.items():
            if name not in space:
                raise LabError(f"enqueue[{i}] sets {name!r}, which is not a searched parameter {sorted(space)}.")
            if not contains(space[name], value):
                raise LabError(f"enqueue[{i}].{name}={value!r} lies outside its search space {space[name]}.")
    grid_size = sweep.grid_size
    if grid_size is not None and spec.n_trials > grid_size:
        sweep.notes.append(f"n_trials={spec.n_trials} is more than the grid's {grid_size} combinations: "
                           f"running each combination once ({grid_size} trials).")
        spec.n_trials = grid_size
    if check:
        check_trials(sweep)
    return sweep


WARM_STUDY_KEYS = ("study", "storage", "top")  # a warm_start entry that names a study (warm.from_study)
WARM_DEFAULT_TOP = 5


def plain(entry):
    """A config node as plain Python (lists, dicts); anything else as it is."""
    return OmegaConf.to_container(entry) if isinstance(entry, DictConfig) else entry


def check_warm_start(entries: list, path: Path) -> None:
    """The shape of each warm_start entry; files and studies are read when the study is created (warm.resolve)."""
    for i, entry in enumerate(map(plain, entries)):
        if isinstance(entry, str) and entry.strip():
            continue
        if not isinstance(entry, dict):
            raise LabError(f"{path}: warm_start[{i}]={entry!r} is not valid: give the path of a file `lab best` "
                           "exported, or {study: NAME, storage: PATH_OR_URL, top: N}.")
        unknown = sorted(set(entry) - set(WARM_STUDY_KEYS))
        if unknown or not isinstance(entry.get("study"), str) or not entry["study"].strip():
            raise LabError(f"{path}: warm_start[{i}]={entry!r} is not valid: a study entry takes study (required), "
                           f"storage and top{f', not {unknown}' if unknown else ''}.")
        top = entry.get("top", WARM_DEFAULT_TOP)
        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise LabError(f"{path}: warm_start[{i}].top={top!r} is not valid: give how many of the study's best "
                           "trials to start from (1 or more).")


def check_spec(spec: SweepSpec, path: Path) -> None:
    if spec.study in ("???", ""):
        raise LabError(f"{path}: 'study' (the Optuna study name) is required.")
    if spec.direction not in DIRECTIONS:
        raise LabError(f"{path}: direction={spec.direction!r} is not valid: choose one of {list(DIRECTIONS)}.")
    if spec.n_trials < 1:
        raise LabError(f"{path}: n_trials={spec.n_trials} is not valid: it must be at least 1.")
    if spec.timeout is not None and not (math.isfinite(spec.timeout) and spec.timeout > 0):
        raise LabError(f"{path}: timeout={spec.timeout} is not valid: give a positive number of seconds or leave "
                       "it out.")
    if spec.max_failures < 0:
        raise LabError(f"{path}: max_failures={spec.max_failures} is not valid: give the number of consecutive "
                       "failed trials that stops the sweep (at least 1), or 0 to never stop.")
    if spec.max_retries < 0:
        raise LabError(f"{path}: max_retries={spec.max_retries} is not valid: give how many times a trial whose "
                       "worker died is run again (0 or more).")
    if not known_metric(spec.metric):
        raise LabError(f"{path}: metric={spec.metric!r} is not a logged metric: choose one of "
                       f"{list(EPOCH_METRICS + FINAL_METRICS + MODEL_METRICS)} or test/f1/<class>.")
    if spec.sampler.get("name") not in SAMPLERS:
        raise LabError(f"{path}: sampler.name={spec.sampler.get('name')!r} is not valid: choose one of {list(SAMPLERS)}.")
    if spec.pruner.get("name", "none") not in PRUNERS:
        raise LabError(f"{path}: pruner.name={spec.pruner.get('name')!r} is not valid: choose one of {list(PRUNERS)}.")
    if not spec.params:
        raise LabError(f"{path}: 'params' is empty: a sweep needs at least one parameter to search.")


def check_seeds(spec: SweepSpec, path: Path) -> None:
    """seeds, aggregate, log_models, and the pruners that make sense with them (seeds.py runs them)."""
    if not isinstance(spec.seeds, int) or spec.seeds < 1:
        raise LabError(f"{path}: seeds={spec.seeds} is not valid: give how many seeds each trial trains with "
                       "(1: one run per trial, 3 or 5 to average out seed noise).")
    if spec.aggregate not in AGGREGATES:
        raise LabError(f"{path}: aggregate={spec.aggregate!r} is not valid: choose mean, or lcb (the mean less one "
                       "standard error over the seeds, plus for a minimized metric).")
    if spec.log_models not in LOG_MODELS:
        raise LabError(f"{path}: log_models={spec.log_models!r} is not valid: all (every trial logs its model) or "
                       "best (none; `lab best` logs the winner's).")
    pruner = spec.pruner.get("name", "none")
    if pruner == "wilcoxon" and spec.seeds < 2:
        raise LabError(f"{path}: pruner wilcoxon compares a trial's seeds with the best trial's, and seeds="
                       f"{spec.seeds}: set seeds: 3 or more, or choose another pruner.")
    if pruner in EPOCH_PRUNERS and spec.seeds > 1:
        raise LabError(f"{path}: pruner {pruner} compares epochs of one run, and seeds={spec.seeds} trains several "
                       "runs per trial: use pruner wilcoxon (stops a trial after some seeds) or none.")
    if spec.seeds > 1 and len(spec.objectives) > 1:
        raise LabError(f"{path}: seeds={spec.seeds} with several objectives is not supported yet: use seeds: 1, "
                       "or one objective.")


def seed_notes(spec: SweepSpec) -> list[str]:
    """Wilcoxon's one-sided p after n seeds that all lose is 2**-n, its smallest: a threshold at or below
    2**-(K-1) can never stop a trial before its last seed (after it there is nothing left to save)."""
    if spec.pruner.get("name") != "wilcoxon":
        return []
    p = float(spec.pruner.get("p_threshold", 0.1))
    startup = max(2, int(spec.pruner.get("n_startup_steps", 2)))
    last = spec.seeds - 1  # the most seeds a trial has behind it when pruning still saves one
    if last >= startup and 2.0 ** -last < p:
        return []
    need = max(startup, math.floor(-math.log2(p)) + 1) + 1 if p > 0 else None
    return [f"pruner wilcoxon will never stop a trial: after {last} of seeds={spec.seeds} the smallest p-value "
            f"is 2**-{last} = {2.0 ** -last:.3g}, not below p_threshold={p:g} (n_startup_steps={startup}); "
            + (f"use seeds: {need} or more, or a larger p_threshold." if need else "p_threshold=0 never prunes.")]


def check_trials(sweep: Sweep) -> None:
    """What every trial would trip on: a searched parameter also typed on the command line, then each parameter
    composed and checked as `lab train` checks it (check_paths: Lightning's imports, ~3 s). `lab sweep` calls it
    after its own options are checked, so that a mistyped option is said without that wait."""
    searched = [o for o in sweep.cli_overrides if override_key(o) in sweep.space]
    if searched:  # typed on the command line, the trial's sampled value would replace it without a word
        key = override_key(searched[0])
        raise LabError(f"{searched[0]} sets {key}, which this sweep searches (params.{key}): every trial would "
                       f"replace it with its own value. Remove it, or remove params.{key} from {sweep.path} to fix it.")
    check_paths(sweep)


def check_paths(sweep: Sweep) -> None:
    """What would otherwise fail every trial, found before one starts: each parameter's override path exists
    (Hydra rejects unknown ones) and its values pass the checks `lab train` makes (types, RULES), at the bounds
    of a range and for every choice of a categorical (checked as values, not by composing one config each)."""
    from hydra.utils import instantiate

    from lab import config_schema  # the checks lab train makes (Lightning's imports, once per launch)
    from lab.train import compose_errors

    def compose(overrides: list[str], what: str):
        try:
            cfg = config.load(overrides)
        except Exception as err:  # any compose failure is the user's override
            said = compose_errors.sentence(err)
            if said:  # `trainer.max_epoch is not a setting of Trainer: did you mean trainer.max_epochs?`
                raise LabError(f"{sweep.path}: {what}: {said}") from err
            raise LabError(f"{sweep.path}: {what}: {str(err).splitlines()[0].rstrip('.')}. Use a Hydra override "
                           "path that exists, such as model.optimizer.lr, data.batch_size, data.image_size or "
                           "model.net.dropout.") from err
        try:
            config_schema.check_config(cfg)
        except LabError as err:
            raise LabError(f"{sweep.path}: {what}: {err}") from err
        return cfg

    base = compose(sweep.base_overrides, f"the base config ({' '.join(sweep.base_overrides) or 'no overrides'})")
    if not any(override_key(name) == "data" or override_key(name).startswith("data.root") for name in sweep.space):
        try:  # the data is where every trial will look for it (constructed only: nothing is read or downloaded)
            instantiate(base.data).check_source()
        except LabError as err:
            raise LabError(f"{sweep.path}: {err}") from err
    # model/params is counted on every run; the other costs are measured only with measure.enabled.
    timed = sorted(({o.metric for o in objectives(sweep.spec)} | set(sweep.spec.constraints)) & set(MODEL_METRICS[1:]))
    if timed and not OmegaConf.select(base, "measure.enabled", default=True):
        raise LabError(f"{sweep.path}: {', '.join(timed)} is an objective or constraint, but the base config sets "
                       "measure.enabled=false, so no trial would measure it: remove that override or the objective.")
    for name, dist in sweep.space.items():
        categorical = isinstance(dist, optuna.distributions.CategoricalDistribution)
        probes = list(dist.choices) if categorical else [dist.low, dist.high]
        if categorical and not config.is_group(override_key(name)):
            probes = probes[:1]  # the path and the whole config, once; every value below
        for value in probes:
            cfg = compose(sweep.trial_overrides({name: value}, base=True), f"parameter {name!r} = {value!r}")
        if categorical and len(probes) < len(dist.choices):
            parser = OverridesParser.create()
            # Each value as Hydra reads the trial's override (a quoted "64" in the file is the number 64 then).
            values = (parser.parse_override(sweep.trial_overrides({name: value})[0]).value() for value in dist.choices)
            try:
                config_schema.check_values(cfg, override_key(name),
                                 (OmegaConf.to_object(v) if OmegaConf.is_config(v) else v for v in values))
            except LabError as err:
                raise LabError(f"{sweep.path}: params.{name}: {err}") from err


def from_args(args, check: bool = True) -> Sweep:
    """The sweep file with a command's overrides and options (argparse names); --study renames its study."""
    sweep = load(args.sweep_file, getattr(args, "overrides", ()), getattr(args, "n_trials", None), check=check,
                 max_failures=getattr(args, "max_failures", None), max_retries=getattr(args, "max_retries", None))
    name = getattr(args, "study", None)
    if name is not None:
        if not name.strip() or "/" in name or name in (".", ".."):
            raise LabError(f"--study={name!r} is not valid: give a name, without '/'.")
        sweep.spec.study = name
    return sweep
