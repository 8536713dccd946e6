"""The Optuna study behind a sweep: storage, sampler, pruner, create-or-resume, and the trial budget.

Journal file storage is the default (many processes on one host, no "database is locked"); RDB URLs
(postgresql://, sqlite:///) serve studies shared across hosts and get heartbeats.
"""
import json
import logging
import os
import socket
import time
import zlib
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from lab.errors import LabError
from lab.tracking import mask_password
from lab.spec import Sweep, grid_values

log = logging.getLogger(__name__)
# RDB only: a trial without a heartbeat for GRACE_S seconds is failed and retried. Environment overrides
# exist for tests and for clusters whose schedulers pause jobs.
HEARTBEAT_S = int(os.environ.get("LAB_HEARTBEAT_S", 30))
GRACE_S = int(os.environ.get("LAB_GRACE_S", 120))
RETRY_OF = "lab.retry_of"  # user attr of a queued trial: the number of the trial it repeats
RESUME_FROM = "lab.resume_from"  # user attr of a queued trial: the checkpoint it continues from


def is_rdb(storage: str) -> bool:
    return "://" in storage


def default_storage(out_dir: Path) -> str:
    return str(out_dir / "study.journal")


def repair_journal(path: Path) -> Path | None:
    """A crash or a full disk mid-write leaves a torn last line; the next append would glue a valid record
    onto it and make the whole study unreadable. Move the torn bytes aside; returns where they went."""
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        data = f.read()
    cut = data.rfind(b"\n") + 1
    torn = data[cut:]
    if not torn:
        return None
    aside = path.with_name(f"{path.name}.torn-{int(time.time())}")
    aside.write_bytes(torn)
    with open(path, "r+b") as f:
        f.truncate(cut)
    log.warning("journal %s ended in a torn line (%d bytes, crash during a write?): moved it to %s; "
                "all complete records are kept", path, len(torn), aside)
    return aside


def open_storage(storage: str, repair: bool = False, on_stale=None):
    """on_stale(study, trial): RDB storage calls it for each trial whose heartbeat stopped."""
    if is_rdb(storage):
        try:
            return RDBStorage(storage, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                              heartbeat_stale_trial_callback=on_stale)
        except Exception as err:  # noqa: BLE001 - unreachable server, bad driver, bad URL
            raise LabError(f"cannot open Optuna storage {mask_password(storage)}: {err}") from err
    path = Path(storage)
    path.parent.mkdir(parents=True, exist_ok=True)
    if repair:  # only where no worker is writing yet: the parent before it starts them
        repair_journal(path)
    return JournalStorage(JournalFileBackend(str(path)))


def make_sampler(sweep: Sweep, worker_id: str | None = None) -> optuna.samplers.BaseSampler:
    """Each worker gets its own seed (seed + a number from its id): with one shared seed, workers that
    start together would all sample the same first configurations."""
    options = dict(sweep.spec.sampler)
    name = options.pop("name")
    seed = options.pop("seed", None)
    if seed is not None and worker_id is not None:
        seed = (int(seed) + zlib.crc32(worker_id.encode())) % 2**31
    try:
        if name == "grid":
            space = {n: grid_values(n, d) for n, d in sweep.space.items()}
            return optuna.samplers.GridSampler(space, seed=seed, **options)
        cls = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
               "cmaes": optuna.samplers.CmaEsSampler, "gp": optuna.samplers.GPSampler,
               "qmc": optuna.samplers.QMCSampler}[name]
        return cls(seed=seed, **options)
    except TypeError as err:
        raise LabError(f"sampler {name}: {err}. Check the option names in {sweep.path}.") from err


def make_pruner(sweep: Sweep) -> optuna.pruners.BasePruner:
    options = dict(sweep.spec.pruner)
    name = options.pop("name", "none")
    cls = {"none": optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
           "percentile": optuna.pruners.PercentilePruner,
           "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
           "hyperband": optuna.pruners.HyperbandPruner}[name]
    try:
        return cls(**options)
    except (TypeError, ValueError) as err:
        raise LabError(f"pruner {name}: {err}. Check the options in {sweep.path}.") from err


def identity(sweep: Sweep) -> dict[str, str]:
    """What a study may not change between launches: resuming under another one would mix results."""
    return {"lab.metric": sweep.spec.metric, "lab.direction": sweep.spec.direction, "lab.space": sweep.space_json()}


def create_or_resume(sweep: Sweep, storage: str, worker_id: str | None = None, repair: bool = False,
                     on_stale=None) -> optuna.Study:
    """Create the study, or check that the stored one is the same experiment."""
    store = open_storage(storage, repair, on_stale)
    names = {s.study_name for s in optuna.study.get_all_study_summaries(store, include_best_trial=False)}
    study = optuna.create_study(study_name=sweep.spec.study, storage=store, sampler=make_sampler(sweep, worker_id),
                                pruner=make_pruner(sweep), direction=sweep.spec.direction, load_if_exists=True)
    stored = study.user_attrs
    if sweep.spec.study in names and stored.get("lab.metric"):
        for key, now in identity(sweep).items():
            if stored.get(key) != now:
                what = key.removeprefix("lab.")
                raise LabError(
                    f"study {sweep.spec.study!r} in {mask_password(storage)} was created with {what}="
                    f"{stored.get(key)}, the sweep file now says {what}={now}. Resuming would mix incomparable "
                    "trials: restore the file, or give the changed sweep a new 'study' name."
                )
    else:
        for key, value in identity(sweep).items():
            study.set_user_attr(key, value)
        for values in sweep.spec.enqueue:
            study.enqueue_trial(values, skip_if_exists=True)
    return study


def used_budget(study: optuna.Study) -> int:
    """Trials that use up n_trials: finished, running, and failures that were not queued again."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs[RETRY_OF] for t in trials if RETRY_OF in t.user_attrs}
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
               or (t.state == TrialState.FAIL and t.number not in retried) for t in trials)


def retry(study: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str) -> None:
    """A trial that did not end on its own (worker killed, interrupt, lost heartbeat): fail it if still
    RUNNING, and queue its configuration again, to resume from its last checkpoint when it has one."""
    if trial.state == TrialState.RUNNING:
        # Another process's trial: Optuna has no public attribute setter for it short of the storage.
        study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)  # noqa: SLF001
        study.tell(trial.number, state=TrialState.FAIL)
    attrs = {RETRY_OF: trial.number, "lab.retry_reason": reason}
    last = Path(trial.user_attrs.get("checkpoint_dir", "/nonexistent")) / "last.ckpt"
    if last.is_file():
        attrs[RESUME_FROM] = str(last)
    study.enqueue_trial(trial.params, user_attrs=attrs)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """RUNNING trials whose worker process on this host is gone (journal storage has no heartbeat)."""
    host = socket.gethostname()
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.user_attrs.get("host") == host and not pid_alive(int(t.user_attrs.get("pid", -1)))]


def trial_table(study: optuna.Study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "state": t.state.name, "value": t.value,
                     "duration_s": t.duration.total_seconds() if t.duration else None,
                     "worker": t.user_attrs.get("worker"), "reason": t.user_attrs.get("fail_reason"),
                     "mlflow_run_id": t.user_attrs.get("mlflow_run_id"), "params": json.dumps(t.params)})
    return rows
