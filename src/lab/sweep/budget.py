"""The trial budget: what counts towards n_trials and max_failures, retrying trials that were cut off, and
reaping the trials of workers that died, under a lock that makes the budget exact across workers."""
import contextlib
import socket
import zlib
from pathlib import Path

import optuna
from optuna.trial import TrialState

from lab import private, processes, settings
from lab.errors import LabError
from lab.locks import file_lock
from lab.sweep import patience
from lab.sweep.spec import Sweep
from lab.sweep.study import LAUNCH_ATTR, GridSampler
from lab.uris import is_rdb, mask_password

RETRY_OF = "lab.retry_of"  # user attr of a queued trial: the number of the trial it repeats
RESUME_FROM = "lab.resume_from"  # user attr of a queued trial: the checkpoint it continues from
LAST_CHECKPOINT = "last.ckpt"  # what lab.train.checkpoints.LastCheckpoint writes in a trial's checkpoint_dir
ATTEMPT = "lab.attempt"  # user attr: 1 for a trial's first run, 2 for its first retry after its worker died


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
    return isinstance(sampler, GridSampler) and sampler.is_exhausted(study)


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


def stored(study: optuna.Study, trial: optuna.trial.BaseTrial) -> optuna.trial.FrozenTrial:
    """The trial as the storage has it now (another process may have ended it meanwhile)."""
    return next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)


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
        private.set_trial_user_attr(study, trial, "fail_reason", reason)  # another process's trial
        study.tell(trial.number, state=TrialState.FAIL)
    return again


def stale_trials(study: optuna.Study, storage: str) -> list[tuple[optuna.trial.FrozenTrial, str]]:
    """(trial, why) for each RUNNING trial whose worker is gone: on this host, a dead process id (any storage);
    on RDB storage also a heartbeat older than the grace period (a host that died). Call with the budget lock
    held: a worker asks for its trial and records its host and pid under that lock, so a RUNNING trial without
    them belongs to a worker that died in between (a kill, or a sampler that raised)."""
    host = socket.gethostname()
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    stale = {t.number: "worker process died" for t in running
             if t.user_attrs.get("host") == host and "pid" in t.user_attrs and not processes.alive(int(t.user_attrs["pid"]))}
    stale.update({t.number: "its worker died before it started (no owner recorded)" for t in running
                  if "pid" not in t.user_attrs})
    timing = settings.rdb_timing()
    # Not just after the database itself was away: every trial's heartbeats were lost to it, not to its worker.
    if is_rdb(storage) and not patience.outage.recent(timing["grace_period"] + timing["heartbeat_interval"]):
        # The query of optuna.storages.fail_stale_trials, without its failing: each trial is failed with its
        # reason and queued again while it is still RUNNING (lab/private.py says why).
        for t in private.stale_by_heartbeat(study, running):
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

    def locked():
        conn = engine.connect()
        try:
            conn.execute(sqlalchemy.text(lock), {"key": key})
        except BaseException:
            conn.close()
            raise
        return conn

    conn = patience.call(locked, mask_password(storage))  # a database restart is waited out (patience.py)
    try:
        yield
    finally:
        try:
            conn.execute(sqlalchemy.text(unlock), {"key": key})
        except sqlalchemy.exc.SQLAlchemyError as err:
            if patience.unreachable(err) is None:
                raise  # else the lock ended with its connection, when the server went away
        finally:
            conn.close()
