"""The Optuna study behind a sweep: storage, sampler, pruner, create-or-resume, and the trial budget.

Journal file storage is the default (many processes on one host, no "database is locked"); RDB URLs
(postgresql://, sqlite:///) serve studies shared across hosts and get heartbeats.
"""
import contextlib
import json
import logging
import os
import socket
import uuid
import warnings
import zlib
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.trial import TrialState

from lab.errors import LabError
from lab.locks import file_lock
from lab.sweep import journal, warm
from lab.sweep.spec import Sweep, grid_values, objectives, override_key
from lab.uris import is_rdb, mask_password

log = logging.getLogger(__name__)
# RDB only: a trial without a heartbeat for grace_s seconds is failed and retried (30 s, 120 s). The
# environment can shorten them, for tests and for clusters whose schedulers pause jobs; read when a
# storage is opened, not at import.
HEARTBEAT_ENV = {"heartbeat_interval": ("LAB_HEARTBEAT_S", 30), "grace_period": ("LAB_GRACE_S", 120)}
RETRY_OF = "lab.retry_of"  # user attr of a queued trial: the number of the trial it repeats
RESUME_FROM = "lab.resume_from"  # user attr of a queued trial: the checkpoint it continues from
LAST_CHECKPOINT = "last.ckpt"  # what lab.train.checkpoints.LastCheckpoint writes in a trial's checkpoint_dir
ATTEMPT = "lab.attempt"  # user attr: 1 for a trial's first run, 2 for its first retry after its worker died
BASE_ATTR = "lab.base_overrides"  # study attr: the overrides every trial starts from, fixed at creation
UID_ATTR = "lab.uid"  # study attr: tells this study from an earlier one of the same name and storage
LAUNCH_ATTR = "lab.launch_after"
BUDGET_ATTR = "lab.budget"  # study attr: n_trials, max_failures, max_retries of the last `lab sweep` launch
BUDGET_KEYS = ("n_trials", "max_failures", "max_retries")  # study attr: the last trial number before this launch of `lab sweep`


def default_storage(out_dir: Path) -> str:
    return str(out_dir / "study.journal")


def locate(sweep: Sweep, storage: str | None = None, out: str | None = None) -> tuple[Path, str]:
    """(output folder, storage): runs/<study>/ and its study.journal unless --out/--storage say otherwise."""
    out_dir = Path(out or Path("runs") / sweep.spec.study).resolve()
    storage = storage or default_storage(out_dir)
    if not is_rdb(storage):
        storage = str(Path(storage).resolve())
    return out_dir, storage


def open_storage(storage: str, repair: bool = False, create: bool = True):
    """create=False: a journal or SQLite file that does not exist is an error, not a new empty study."""
    if is_rdb(storage) and not create and storage.startswith("sqlite:///"):
        if not Path(storage.removeprefix("sqlite:///")).is_file():
            raise KeyError(storage)  # opening it would create an empty database
    if is_rdb(storage):
        try:
            timing = {key: int(os.environ.get(name) or default) for key, (name, default) in HEARTBEAT_ENV.items()}
            return RDBStorage(storage, **timing)
        except Exception as err:  # noqa: BLE001 - unreachable server, bad driver, bad URL
            raise LabError(f"cannot open Optuna storage {mask_password(storage)}: {err}") from err
    path = Path(storage)
    journal.check(path)  # before anything could modify it
    if not create and not path.is_file():
        raise KeyError(storage)
    path.parent.mkdir(parents=True, exist_ok=True)
    if repair:  # only where no worker is writing yet: the parent before it starts them
        journal.repair(path)
    return JournalStorage(journal.Journal(str(path)))


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


WORKER_ONLY = ("mlflow.experiment", "trainer.enable_progress_bar", "trainer.enable_model_summary", "threads")


def stored_base(study: optuna.Study) -> list[str] | None:
    """The overrides the study was created with; for a study from before lab stored them, what its first
    trial ran with, less its params and the worker's own settings."""
    if BASE_ATTR in study.user_attrs:
        return list(study.user_attrs[BASE_ATTR])
    for t in study.get_trials(deepcopy=False):
        if "overrides" in t.user_attrs:
            skip = {*t.params, *WORKER_ONLY}
            return [o for o in t.user_attrs["overrides"] if override_key(o) not in skip]
    return None


def adopt(sweep: Sweep, study: optuna.Study) -> None:
    stored = stored_base(study)
    if stored is not None:
        sweep.base_overrides = stored


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid, run by ask/tell workers across launches.

    - after_trial: Optuna's calls study.stop() once the grid is done, which raises outside optimize(); the
      workers stop on their own when every combination has run (exhausted()).
    - A combination that is running is not handed out again.
    - A combination whose trial failed in an earlier launch counts as not yet run, so that rerunning the
      sweep after fixing the cause (missing data, say) runs exactly those again. Within one launch a failed
      combination stays done: the failure limit, not a retry loop, deals with it.
    """

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        # Optuna's gives trial k < grid size grid id k without looking at what ran (an enqueued or retried
        # trial takes a number too): every new trial takes a combination that has not run.
        if "grid_id" in trial.system_attrs or "fixed_params" in trial.system_attrs:
            return
        target = self._get_unvisited_grid_ids(study) or list(range(len(self._all_grids)))
        study._storage.set_trial_system_attr(trial._trial_id, "search_space", self._search_space)  # noqa: SLF001
        study._storage.set_trial_system_attr(trial._trial_id, "grid_id", int(self._rng.rng.choice(target)))  # noqa: SLF001

    def after_trial(self, study, trial, state, values) -> None:
        pass

    def _get_unvisited_grid_ids(self, study: optuna.Study) -> list[int]:
        launch = study.user_attrs.get(LAUNCH_ATTR, -1)
        visited, running = set(), set()
        for t in study._storage.get_all_trials(study._study_id, deepcopy=False):  # noqa: SLF001 - as Optuna's own
            # The params say which combination ran; a grid id alone may come from a study whose workers
            # shuffled the grid each their own way (lab before it gave every worker the same seed).
            grid_id = self._grid_id_of(t.params or t.system_attrs.get("fixed_params", {}))
            if grid_id is None:
                grid_id = t.system_attrs.get("grid_id")
            if grid_id is None:
                continue
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (t.state == TrialState.FAIL and t.number > launch):
                visited.add(grid_id)
            elif t.state in (TrialState.RUNNING, TrialState.WAITING):
                running.add(grid_id)
        # Optuna falls back to the running combinations here (for workers that cannot wait); lab's workers
        # wait for them instead, so that each combination runs once.
        return sorted(set(range(len(self._all_grids))) - visited - running)

    def _grid_id_of(self, params: dict) -> int | None:
        if set(params) != set(self._param_names):
            return None
        cell = tuple(params[name] for name in self._param_names)
        return next((i for i, grid in enumerate(self._all_grids) if tuple(grid) == cell), None)

    def exhausted(self, study: optuna.Study) -> bool:
        return not self._get_unvisited_grid_ids(study)


def make_sampler(sweep: Sweep, worker_id: str | None = None) -> optuna.samplers.BaseSampler:
    """Each worker gets its own seed (seed + a number from its id): with one shared seed, workers that
    start together would all sample the same first configurations."""
    options = dict(sweep.spec.sampler)
    name = options.pop("name")
    seed = options.pop("seed", None)
    # Not for the grid: its seed shuffles the order of the combinations, and a grid id in the storage must
    # name the same combination in every worker.
    if seed is not None and worker_id is not None and name != "grid":
        seed = (int(seed) + zlib.crc32(worker_id.encode())) % 2**31
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
    try:
        store = open_storage(storage, repair, create=not join)  # a worker creates no journal or database file
        names = {s.study_name for s in optuna.study.get_all_study_summaries(store, include_best_trial=False)}
    except KeyError:
        names, store = set(), None
    if join and sweep.spec.study not in names:
        raise LabError(f"no study {sweep.spec.study!r} in {mask_password(storage)}: a worker joins a study that "
                       f"exists; create it with `lab sweep {sweep.typed or sweep.path} --prepare` (same --storage) first.")
    # Read and checked before the study exists: a missing file or a value outside the space creates nothing.
    warm_trials = warm.resolve(sweep) if not join and sweep.spec.study not in names else []
    study = optuna.create_study(study_name=sweep.spec.study, storage=store, sampler=make_sampler(sweep, worker_id),
                                pruner=make_pruner(sweep), directions=[o.direction for o in objectives(sweep.spec)],
                                load_if_exists=True)
    stored = study.user_attrs
    wanted = [o.direction for o in objectives(sweep.spec)]
    if [d.name.lower() for d in study.directions] != wanted:  # create_study kept the stored ones silently
        before = ", ".join(d.name.lower() for d in study.directions)
        raise LabError(f"study {sweep.spec.study!r} in {mask_password(storage)} was created with direction(s) "
                       f"{before}, the sweep file now says {', '.join(wanted)}. Resuming would mix incomparable "
                       "trials: restore the file, or start a new study with --study NAME.")
    if sweep.spec.study in names and stored.get("lab.metric"):
        for key, now in identity(sweep).items():
            if key not in stored:  # a study from before lab stored this part of it
                if not join:
                    study.set_user_attr(key, now)
                continue
            if stored.get(key) != now:
                what = key.removeprefix("lab.")
                raise LabError(
                    f"study {sweep.spec.study!r} in {mask_password(storage)} was created with {what}="
                    f"{stored.get(key)}, the sweep file now says {what}={now}. Resuming would mix incomparable "
                    "trials: restore the file, or start a new study with --study NAME."
                )
        before = stored_base(study)
        if join:
            for key, value in stored.get(BUDGET_ATTR, {}).items():
                if key not in (given or set()):
                    setattr(sweep.spec, key, value)
        if join and before is not None and not sweep.cli_overrides:
            sweep.base_overrides = list(before)
        elif before is not None and list(before) != sweep.base_overrides:
            raise LabError(
                f"study {sweep.spec.study!r} was created with the overrides {' '.join(before) or '(none)'}; this "
                f"launch gives {' '.join(sweep.base_overrides) or '(none)'}. Resuming would mix trials trained "
                "differently: repeat the original overrides to resume, or add --study NEW_NAME to start a "
                "separate study from the same file."
            )
        if BASE_ATTR not in stored and not join:  # a study from before overrides were stored
            study.set_user_attr(BASE_ATTR, sweep.base_overrides)
        if UID_ATTR not in stored:
            study.set_user_attr(UID_ATTR, uuid.uuid4().hex)
    else:
        # The first trials first, the identity last: a launch cut off in between is still a new study to the next
        # one, which enqueues again (skip_if_exists: nothing twice) instead of resuming without them.
        warm.enqueue(study, warm_trials)  # before the file's own enqueue list
        for values in sweep.spec.enqueue:
            study.enqueue_trial(values, skip_if_exists=True)
        study.set_user_attr(BASE_ATTR, sweep.base_overrides)
        study.set_user_attr(UID_ATTR, uuid.uuid4().hex)
        for key, value in sorted(identity(sweep).items(), key=lambda kv: kv[0] == "lab.metric"):
            study.set_user_attr(key, value)  # lab.metric last: its presence is what marks the study as created
    return study


def begin_launch(sweep: Sweep, study: optuna.Study) -> None:
    """Failures of earlier launches neither count towards this launch's failure limit nor keep a grid
    combination from running again; the budget settings of this launch are what `lab worker`s adopt."""
    study.set_user_attr(BUDGET_ATTR, {key: getattr(sweep.spec, key) for key in BUDGET_KEYS})
    trials = study.get_trials(deepcopy=False)
    study.set_user_attr(LAUNCH_ATTR, max((t.number for t in trials), default=-1))


def retried(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    """Numbers of the failed trials that were queued again (their retry stands in for them)."""
    return {t.user_attrs[RETRY_OF] for t in trials if RETRY_OF in t.user_attrs}


def counts(trials: list[optuna.trial.FrozenTrial]) -> dict[str, int]:
    """complete, pruned, running, failed (for good), retried (cut off and queued again), waiting."""
    again = retried(trials)
    out = dict.fromkeys(("complete", "pruned", "running", "failed", "retried", "waiting"), 0)
    for t in trials:
        if t.state == TrialState.FAIL:
            out["retried" if t.number in again else "failed"] += 1
        elif t.state.name.lower() in out:
            out[t.state.name.lower()] += 1
    return out


def used_budget(study: optuna.Study, failures_count: bool = False) -> int:
    """Trials that use up n_trials: finished, pruned, running, and retries queued for trials that were cut
    off. Failed trials do not (a sweep whose trials fail stops at max_failures with its budget left), unless
    failures_count: with max_failures=0 nothing else would end a sweep whose every trial fails."""
    trials = study.get_trials(deepcopy=False)
    again = retried(trials) if failures_count else set()
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
               or (t.state == TrialState.WAITING and RETRY_OF in t.user_attrs)
               or (failures_count and t.state == TrialState.FAIL and t.number not in again) for t in trials)


def queued_retries(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)) if RETRY_OF in t.user_attrs]


def done(sweep: Sweep, study: optuna.Study, sampler: optuna.samplers.BaseSampler | None = None) -> bool:
    """No new trial is needed: the budget is spent, or every grid combination has run."""
    if used_budget(study, failures_count=not sweep.spec.max_failures) >= sweep.spec.n_trials:
        return True
    return isinstance(sampler, GridSampler) and sampler.exhausted(study)


def failure_streak(sweep: Sweep, study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The longest run of consecutive failed trials in this launch, in the order they ended, once it reaches
    max_failures (else []). Cut-off trials that were queued again are neither failures nor successes."""
    if not sweep.spec.max_failures:
        return []
    launch = study.user_attrs.get(LAUNCH_ATTR, -1)
    trials = study.get_trials(deepcopy=False)
    again = retried(trials)
    ended = sorted((t for t in trials if t.state.is_finished() and t.number > launch and t.number not in again),
                   key=lambda t: (t.datetime_complete.timestamp() if t.datetime_complete else 0.0, t.number))
    run: list[optuna.trial.FrozenTrial] = []
    for t in ended:
        run = run + [t] if t.state == TrialState.FAIL else []
        if len(run) >= sweep.spec.max_failures:
            return run
    return []


def fail_reason(trial: optuna.trial.FrozenTrial) -> str:
    return trial.user_attrs.get("fail_reason") or "no reason recorded"


def retry(study: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str, max_retries: int | None = None) -> bool:
    """A trial that did not end on its own (worker died, interrupt, lost heartbeat): fail it if still RUNNING
    and queue its configuration again, to resume from its last checkpoint when it has one.

    max_retries: a trial whose worker died this many times already fails for good (a configuration that
    takes its process down, a segfault or the kernel's OOM killer, must not be tried forever). None: an
    interrupt, which retries without counting. Returns whether the trial was queued again."""
    attempt = int(trial.user_attrs.get(ATTEMPT, 1))
    again = max_retries is None or attempt <= max_retries
    if not again:
        reason = f"{reason}; gave up after {attempt} attempts (max_retries={max_retries})"
    if again:  # queued before the original fails, so that the budget never looks free in between
        attrs = {RETRY_OF: trial.number, "lab.retry_reason": reason,
                 ATTEMPT: attempt if max_retries is None else attempt + 1}
        last = Path(trial.user_attrs.get("checkpoint_dir", "/nonexistent")) / LAST_CHECKPOINT
        if last.is_file():
            attrs[RESUME_FROM] = str(last)
        study.enqueue_trial(trial.params, user_attrs=attrs)
    if trial.state == TrialState.RUNNING:
        # Another process's trial: Optuna has no public attribute setter for it short of the storage.
        study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)  # noqa: SLF001
        study.tell(trial.number, state=TrialState.FAIL)
    return again


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_trials(study: optuna.Study, storage: str) -> list[tuple[optuna.trial.FrozenTrial, str]]:
    """(trial, why) for each RUNNING trial whose worker is gone: on this host, a dead process id (any storage);
    on RDB storage also a heartbeat older than the grace period (a host that died). Call with the budget lock
    held: a worker asks for its trial and records its host and pid under that lock, so a RUNNING trial without
    them belongs to a worker that died in between (a kill, or a sampler that raised)."""
    host = socket.gethostname()
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    stale = {t.number: "worker process died" for t in running
             if t.user_attrs.get("host") == host and "pid" in t.user_attrs and not pid_alive(int(t.user_attrs["pid"]))}
    stale.update({t.number: "its worker died before it started (no owner recorded)" for t in running
                  if "pid" not in t.user_attrs})
    if is_rdb(storage):
        # The heartbeat API's own query (what optuna.storages.fail_stale_trials uses), called here so that each
        # trial is failed with its reason and queued again while it is still RUNNING.
        ids = set(study._storage._get_stale_trial_ids(study._study_id))  # noqa: SLF001
        for t in running:
            if t._trial_id in ids:  # noqa: SLF001
                stale.setdefault(t.number, "heartbeat lost")
    return [(t, stale[t.number]) for t in running if t.number in stale]


def reap(study: optuna.Study, storage: str, abandon, dead_pid_reason: str | None = None) -> list[optuna.trial.FrozenTrial]:
    """Fail (and queue again, within max_retries) the trials whose worker is gone, calling abandon(trial, why)
    for each while it is still RUNNING. Call with the budget lock held. Returns the trials reaped."""
    stale = stale_trials(study, storage)
    for trial, why in stale:
        abandon(trial, dead_pid_reason if dead_pid_reason and why == "worker process died" else why)
    return [t for t, _ in stale]


def trials_of_process(study: optuna.Study, pid: int) -> list[optuna.trial.FrozenTrial]:
    """The trials a worker process on this host ran, newest last."""
    host = socket.gethostname()
    return [t for t in study.get_trials(deepcopy=False)
            if t.user_attrs.get("host") == host and t.user_attrs.get("pid") == pid]


_ENGINES: dict = {}


@contextlib.contextmanager
def budget_lock(storage: str, study_name: str):
    """One worker at a time checks the budget and asks for a trial, so n_trials is exact.

    Journal and SQLite storage live on one host: an exclusive file lock. PostgreSQL and MySQL are shared
    across hosts: a lock held by the database itself (an advisory lock), released if a host dies."""
    if not is_rdb(storage) or storage.startswith("sqlite"):
        # Next to the journal or database file, so that every process using it takes the same lock.
        # (Not <file>.lock: Optuna's journal uses that name for its own lock.)
        with file_lock(Path(storage.removeprefix("sqlite:///") + ".budget.lock")):
            yield
        return
    import sqlalchemy  # Optuna's RDB storage depends on it

    if storage not in _ENGINES:
        _ENGINES[storage] = sqlalchemy.create_engine(storage, poolclass=sqlalchemy.pool.NullPool)
    key = zlib.crc32(f"lab-budget:{study_name}".encode())  # one lock per study, whatever each host's --out
    engine = _ENGINES[storage]
    dialect = engine.dialect.name
    if dialect == "postgresql":
        lock, unlock = "SELECT pg_advisory_lock(:key)", "SELECT pg_advisory_unlock(:key)"
    elif dialect in ("mysql", "mariadb"):
        lock, unlock = "SELECT GET_LOCK(CONCAT('lab', :key), -1)", "SELECT RELEASE_LOCK(CONCAT('lab', :key))"
    else:
        raise LabError(f"storage {mask_password(storage)}: lab shares studies across hosts on PostgreSQL or "
                       "MySQL; use a journal file or sqlite:/// on one host.")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(lock), {"key": key})
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text(unlock), {"key": key})


def trial_table(study: optuna.Study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        values = t.values or []  # several with several objectives (FrozenTrial.value raises then)
        rows.append({"number": t.number, "state": t.state.name, "value": values[0] if len(values) == 1 else
                     (json.dumps(values) if values else None),
                     "constraints": json.dumps(t.constraints) if t.constraints else None,
                     "duration_s": t.duration.total_seconds() if t.duration else None,
                     "worker": t.user_attrs.get("worker"), "reason": t.user_attrs.get("fail_reason"),
                     "mlflow_run_id": t.user_attrs.get("mlflow_run_id"), "params": json.dumps(t.params)})
    return rows
