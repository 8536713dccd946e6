"""The Optuna study behind a sweep: sampler, pruner, identity, create-or-resume, the start of a launch.
The second pass of `lab sweep`: spec.py turned the file and options into a checked Sweep without opening any
storage; this opens or creates its study (the storage itself: storage.py). The trial budget, retries and
reaping live in budget.py.
"""
import json
import logging
import uuid
import warnings
import zlib
from pathlib import Path

import optuna
from optuna.trial import TrialState

from lab import private
from lab.errors import LabError
from lab.sweep import trial_record, warm
from lab.sweep.objectives import objectives
from lab.sweep.spec import Sweep, grid_values, same_overrides
from lab.sweep.storage import open_storage
from lab.uris import is_rdb, mask_password

log = logging.getLogger(__name__)
BASE_ATTR = "lab.base_overrides"  # study attr: the overrides every trial starts from, fixed at creation
UID_ATTR = "lab.uid"  # study attr: tells this study from an earlier one of the same name and storage
LAUNCH_ATTR = "lab.launch_after"  # study attr: the last trial number before this launch of `lab sweep`
BUDGET_ATTR = "lab.budget"  # study attr: n_trials, max_failures, max_retries of the last `lab sweep` launch
BUDGET_KEYS = ("n_trials", "max_failures", "max_retries")  # the settings stored in BUDGET_ATTR


def default_storage(out_dir: Path) -> str:
    return str(out_dir / "study.journal")


def locate(sweep: Sweep, storage: str | None = None, out: str | None = None) -> tuple[Path, str]:
    """(output folder, storage): runs/<study>/ and its study.journal unless --out/--storage say otherwise."""
    out_dir = Path(out or Path("runs") / sweep.spec.study).resolve()
    storage = storage or default_storage(out_dir)
    if not is_rdb(storage):
        storage = str(Path(storage).resolve())
    return out_dir, storage


def load(sweep: Sweep, storage: str, command: str = "lab sweep") -> optuna.Study:
    """An existing study, for the commands that read one; creates nothing, not even an empty journal.
    The sweep adopts the overrides the study was created with."""
    try:
        study = optuna.load_study(study_name=sweep.spec.study, storage=open_storage(storage, create=False))
    except KeyError as err:
        raise LabError(f"no study {sweep.spec.study!r} in {mask_password(storage)}: run `{command} {sweep.typed or sweep.path}` "
                       "first, or pass --storage/--out/--study where it ran.") from err
    adopt(sweep, study)
    return study


def stored_base(study: optuna.Study) -> list[str] | None:
    """The overrides the study was created with (None: a study whose creation was cut off before them)."""
    return list(study.user_attrs[BASE_ATTR]) if BASE_ATTR in study.user_attrs else None


def adopt(sweep: Sweep, study: optuna.Study) -> None:
    stored = stored_base(study)
    if stored is not None:
        sweep.base_overrides = stored


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid, run by ask/tell workers across launches (its internals: lab/private.py).

    - after_trial: Optuna's calls study.stop() once the grid is done, which raises outside optimize(); the
      workers stop on their own when every combination has run (is_exhausted()).
    - A combination that is running is not handed out again.
    - A combination whose trial failed in an earlier launch counts as not yet run, so that rerunning the
      sweep after fixing the cause (missing data, say) runs exactly those again. Within one launch a failed
      combination stays done: the failure limit, not a retry loop, deals with it.
    """

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        # Optuna's gives trial k < grid size grid id k without looking at what ran (an enqueued or retried
        # trial takes a number too): every new trial takes a combination that has not run.
        if private.GRID_ID in trial.system_attrs or private.FIXED_PARAMS in trial.system_attrs:
            return
        target = self.unvisited(study) or list(range(len(private.grid_cells(self))))
        private.assign_grid_cell(study, trial, self, target)

    def after_trial(self, study, trial, state, values) -> None:
        pass

    def unvisited(self, study: optuna.Study) -> list[int]:
        """The grid ids of the combinations that have not run and are not running."""
        launch = study.user_attrs.get(LAUNCH_ATTR, -1)
        visited, running = set(), set()
        for t in study.get_trials(deepcopy=False):  # the storage's trials, as Optuna's own reads them
            # The params say which combination ran; a grid id alone may come from a study whose workers
            # shuffled the grid each their own way (lab before it gave every worker the same seed).
            grid_id = self._grid_id_of(t.params or t.system_attrs.get(private.FIXED_PARAMS, {}))
            if grid_id is None:
                grid_id = t.system_attrs.get(private.GRID_ID)
            if grid_id is None:
                continue
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (t.state == TrialState.FAIL and t.number > launch):
                visited.add(grid_id)
            elif t.state in (TrialState.RUNNING, TrialState.WAITING):
                running.add(grid_id)
        # Optuna falls back to the running combinations here (for workers that cannot wait); lab's workers
        # wait for them instead, so that each combination runs once.
        return sorted(set(range(len(private.grid_cells(self)))) - visited - running)

    def _grid_id_of(self, params: dict) -> int | None:
        names = private.grid_names(self)
        if set(params) != set(names):
            return None
        cell = tuple(params[name] for name in names)
        return next((i for i, grid in enumerate(private.grid_cells(self)) if tuple(grid) == cell), None)

    def is_exhausted(self, study: optuna.Study) -> bool:
        return not self.unvisited(study)


def make_sampler(sweep: Sweep, worker_id: str | None = None, trials_before: int = 0) -> optuna.samplers.BaseSampler:
    """Each worker gets its own seed (seed + a number from its id): with one shared seed, workers that
    start together would all sample the same first configurations. trials_before (the study's trials when the
    worker joins) moves it on for a resumed sweep, whose workers have the same ids as before: a sampler still in
    its random start-up would otherwise draw the first launch's configurations again."""
    options = dict(sweep.spec.sampler)
    name = options.pop("name")
    seed = options.pop("seed", None)
    # Not for the grid: its seed shuffles the order of the combinations, and a grid id in the storage must
    # name the same combination in every worker.
    if seed is not None and worker_id is not None and name != "grid":
        seed = (int(seed) + zlib.crc32(worker_id.encode()) + 7919 * trials_before) % 2**31
    try:
        if name == "grid":
            space = {n: grid_values(n, d) for n, d in sweep.space.items()}
            return GridSampler(space, seed=seed, **options)
        cls = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
               "cmaes": optuna.samplers.CmaEsSampler, "gp": optuna.samplers.GPSampler,
               "qmc": optuna.samplers.QMCSampler, "nsga2": optuna.samplers.NSGAIISampler}[name]
        return cls(seed=seed, **options)
    except TypeError as err:
        raise LabError(f"sampler {name}: {err}. Check the option names in {sweep.path}.") from err


def make_pruner(sweep: Sweep) -> optuna.pruners.BasePruner:
    options = dict(sweep.spec.pruner)
    name = options.pop("name", "none")
    cls = {"none": optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
           "percentile": optuna.pruners.PercentilePruner,
           "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
           "hyperband": optuna.pruners.HyperbandPruner, "wilcoxon": optuna.pruners.WilcoxonPruner}[name]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # Wilcoxon's, on every launch
            return cls(**options)
    except (TypeError, ValueError) as err:
        raise LabError(f"pruner {name}: {err}. Check the options in {sweep.path}.") from err


def identity(sweep: Sweep) -> dict[str, str]:
    """What a study may not change between launches: resuming under another one would mix results."""
    return {"lab.metric": sweep.spec.metric, "lab.direction": sweep.spec.direction, "lab.space": sweep.space_json(),
            "lab.sampler": json.dumps(sweep.spec.sampler, sort_keys=True),
            "lab.pruner": json.dumps(sweep.spec.pruner, sort_keys=True),
            # Values over another number of seeds, or another aggregate, are not comparable.
            "lab.seeds": json.dumps({"seeds": sweep.spec.seeds, "aggregate": sweep.spec.aggregate}),
            "lab.objectives": json.dumps([[o.metric, o.direction] for o in objectives(sweep.spec)]),
            "lab.constraints": json.dumps({k: [b.min, b.max] for k, b in sweep.spec.constraints.items()}, sort_keys=True)}


def create_or_resume(sweep: Sweep, storage: str, worker_id: str | None = None, repair: bool = False,
                     join: bool = False, given: set[str] | None = None) -> optuna.Study:
    """`lab sweep`: create the study, or check that the stored one is the same experiment (space, metric,
    overrides), and store this launch's budget settings. join=True (`lab worker`): the study must exist;
    the overrides and the budget settings not in `given` (command-line options) are taken from it."""
    store, names = stored_studies(storage, repair, join)
    if join and sweep.spec.study not in names:
        raise LabError(f"no study {sweep.spec.study!r} in {mask_password(storage)}: a worker joins a study that "
                       f"exists; create it with `lab sweep {sweep.typed or sweep.path} --prepare` (same --storage) first.")
    # Read and checked before the study exists: a missing file or a value outside the space creates nothing.
    warm_trials = warm.resolve(sweep) if not join and sweep.spec.study not in names else []
    study = optuna.create_study(study_name=sweep.spec.study, storage=store, sampler=make_sampler(sweep, worker_id),
                                pruner=make_pruner(sweep), directions=[o.direction for o in objectives(sweep.spec)],
                                load_if_exists=True)
    if worker_id is not None:  # a resumed study: this worker's seed moved on by the trials already there
        study.sampler = make_sampler(sweep, worker_id, len(study.get_trials(deepcopy=False)))
    check_directions(sweep, study, storage)
    if sweep.spec.study in names and study.user_attrs.get("lab.metric"):
        check_identity(sweep, study, storage)
        resume(sweep, study, join, given or set())
    else:
        initialise(sweep, study, warm_trials)
    return study


def stored_studies(storage: str, repair: bool, join: bool):
    """(the storage opened, the names of the studies in it); (None, empty) for a file a worker finds missing."""
    try:
        store = open_storage(storage, repair, create=not join)  # a worker creates no journal or database file
        return store, {s.study_name for s in optuna.study.get_all_study_summaries(store, include_best_trial=False)}
    except KeyError:
        return None, set()


def check_directions(sweep: Sweep, study: optuna.Study, storage: str) -> None:
    wanted = [o.direction for o in objectives(sweep.spec)]
    if [d.name.lower() for d in study.directions] != wanted:  # create_study kept the stored ones silently
        before = ", ".join(d.name.lower() for d in study.directions)
        raise LabError(f"study {sweep.spec.study!r} in {mask_password(storage)} was created with direction(s) "
                       f"{before}, the sweep file now says {', '.join(wanted)}. Resuming would mix incomparable "
                       "trials: restore the file, or start a new study with --study NAME.")


def check_identity(sweep: Sweep, study: optuna.Study, storage: str) -> None:
    """The stored study is the same experiment as the file's (identity()): else resuming would mix trials."""
    stored = study.user_attrs
    for key, now in identity(sweep).items():
        if stored.get(key) != now:
            what = key.removeprefix("lab.")
            raise LabError(
                f"study {sweep.spec.study!r} in {mask_password(storage)} was created with {what}="
                f"{stored.get(key)}, the sweep file now says {what}={now}. Resuming would mix incomparable "
                "trials: restore the file, or start a new study with --study NAME."
            )


def resume(sweep: Sweep, study: optuna.Study, join: bool, given: set[str]) -> None:
    """The sweep takes the stored study's overrides (a worker also its budget settings, but those in given),
    or, for `lab sweep`, refuses overrides that differ from them."""
    before = stored_base(study)
    if join:
        for key, value in study.user_attrs.get(BUDGET_ATTR, {}).items():
            if key not in given:
                setattr(sweep.spec, key, value)
    if join and before is not None and not sweep.cli_overrides:
        sweep.base_overrides = list(before)
    elif before is not None and same_overrides(before, sweep.base_overrides):
        sweep.base_overrides = list(before)  # the same settings, typed in another order or notation
    elif before is not None:
        raise LabError(
            f"study {sweep.spec.study!r} was created with the overrides {' '.join(before) or '(none)'}; this "
            f"launch gives {' '.join(sweep.base_overrides) or '(none)'}. Resuming would mix trials trained "
            "differently: repeat the original overrides to resume, or add --study NEW_NAME to start a "
            "separate study from the same file."
        )


def initialise(sweep: Sweep, study: optuna.Study, warm_trials: list[tuple[dict, str]]) -> None:
    """A new study: its first trials (warm start, then the file's enqueue list), then its identity. The
    identity last: a launch cut off in between is still a new study to the next one, which enqueues again
    (skip_if_exists: nothing twice) instead of resuming without them."""
    warm.enqueue(study, warm_trials)  # before the file's own enqueue list
    for values in sweep.spec.enqueue:
        study.enqueue_trial(values, skip_if_exists=True)
    study.set_user_attr(BASE_ATTR, sweep.base_overrides)
    study.set_user_attr(UID_ATTR, uuid.uuid4().hex)
    for key, value in sorted(identity(sweep).items(), key=lambda kv: kv[0] == "lab.metric"):
        study.set_user_attr(key, value)  # lab.metric last: its presence is what marks the study as created


def begin_launch(sweep: Sweep, study: optuna.Study) -> None:
    """Failures of earlier launches neither count towards this launch's failure limit nor keep a grid
    combination from running again; the budget settings of this launch are what `lab worker`s adopt."""
    study.set_user_attr(BUDGET_ATTR, {key: getattr(sweep.spec, key) for key in BUDGET_KEYS})
    trials = study.get_trials(deepcopy=False)
    study.set_user_attr(LAUNCH_ATTR, max((t.number for t in trials), default=-1))


def trial_table(study: optuna.Study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        values = t.values or []  # several with several objectives (FrozenTrial.value raises then)
        rows.append({"number": t.number, "state": t.state.name, "value": values[0] if len(values) == 1 else
                     (json.dumps(values) if values else None),
                     "constraints": json.dumps(t.constraints) if t.constraints else None,
                     "duration_s": t.duration.total_seconds() if t.duration else None,
                     "worker": t.user_attrs.get("worker"), "reason": t.user_attrs.get("fail_reason"),
                     trial_record.RUN_ID: trial_record.run_id(t), "params": json.dumps(t.params)})
    return rows
