"""Waiting out an Optuna database that went away (a PostgreSQL restart, a failover, a network cut).

Optuna's RDB storage raises StorageInternalError on the first call that finds the server gone, and every
worker used to die of it with its trial left RUNNING. Here every storage call that fails because the server
cannot be reached is tried again, with logged attempts 1, 2, 4 ... 10 s apart, for LAB_STORAGE_OUTAGE_S seconds
(600 by default) counted from the first failure; then StorageUnreachable says so in one sentence. Calls that fail
for any other reason raise as before. While it waits, the worker's pulse goes on: waiting is not hanging.

A call that reached the server just before it went away may have been applied: telling a finished trial again
then raises UpdateFinishedTrialError, which the worker reads as done (worker.run_one).
"""
import abc
import logging
import threading
import time

from optuna.storages import BaseStorage

from lab import settings
from lab.errors import LabError
from lab.private import BaseHeartbeat  # the interface Optuna's heartbeat thread needs (lab/private.py)
from lab.sweep import liveness
from lab.uris import mask_password

log = logging.getLogger(__name__)
FIRST_WAIT_S, LONGEST_WAIT_S = 1.0, 10.0  # between attempts: doubling from the first to the longest


class StorageUnreachable(LabError):
    """The storage stayed unreachable for longer than LAB_STORAGE_OUTAGE_S."""

    def __init__(self, message: str, why: str):
        super().__init__(message)
        self.why = why


def unreachable(err: BaseException) -> str | None:
    """What says the database server could not be reached behind err (a refused or dropped connection, a server
    shutting down or starting up), as its driver's first line; None for any other error."""
    import sqlalchemy.exc

    seen = err
    while seen is not None:
        if isinstance(seen, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)) or getattr(
                seen, "connection_invalidated", False):
            text = str(getattr(seen, "orig", None) or seen).strip().splitlines()
            return mask_password(text[0].strip() if text else type(seen).__name__)
        seen = seen.__cause__ or seen.__context__
    return None


class Outage:
    """This process's view of the storage: reachable, or unreachable since when (one per process: the main thread
    and the heartbeat thread wait out the same outage and say it once)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.since: float | None = None  # time.time() of the first failed call
        self.ended_at = float("-inf")  # time.monotonic() when the last outage ended
        self.gave_up = False

    def began(self, why: str, where: str) -> float:
        with self.lock:
            if self.since is None:
                self.since = time.time()
                log.warning("storage unreachable (%s): %s; retrying for up to %g s (LAB_STORAGE_OUTAGE_S)", why,
                            where, settings.get("LAB_STORAGE_OUTAGE_S"))
            return self.since

    def ended(self) -> None:
        with self.lock:
            if self.since is not None:
                log.warning("storage reachable again after %.0f s", time.time() - self.since)
                self.since, self.gave_up, self.ended_at = None, False, time.monotonic()

    def recent(self, within_s: float) -> bool:
        """An outage is under way or ended within the last within_s seconds (heartbeats were lost to it)."""
        return self.since is not None or time.monotonic() - self.ended_at < within_s


outage = Outage()


def reason(why: str) -> str:
    return f"storage unreachable ({why})"


def attempt(fn, args, kwargs):
    """(fn's result, None), or (None, why) when the server could not be reached; other errors raise."""
    try:
        return fn(*args, **kwargs), None
    except Exception as err:
        why = unreachable(err)
        if why is None:
            raise
        return None, why


def call(fn, where: str, *args, **kwargs):
    """fn(*args, **kwargs), tried again while the database cannot be reached, for up to LAB_STORAGE_OUTAGE_S."""
    result, why = attempt(fn, args, kwargs)
    if why is None:
        if outage.since is not None:
            outage.ended()
        return result
    since = outage.began(why, where)
    began = time.strftime("%H:%M:%S", time.localtime(since))
    limit, wait, tries = settings.get("LAB_STORAGE_OUTAGE_S"), FIRST_WAIT_S, 1
    while why is not None:
        left = since + limit - time.time()
        if left <= 0 or outage.gave_up:
            outage.gave_up = True
            raise StorageUnreachable(
                f"the Optuna storage {where} has been unreachable since {began} ({time.time() - since:.0f} s, more "
                f"than LAB_STORAGE_OUTAGE_S={limit:g}): {why}; start it again and run the same command: trials cut "
                "off are retried.", why) from None
        pause = min(wait, left)
        log.warning("storage unreachable since %s (%s): attempt %d failed, next in %.0f s, giving up in %.0f s",
                    began, why, tries, pause, left)
        time.sleep(pause)
        liveness.progressed()
        tries, wait = tries + 1, min(wait * 2, LONGEST_WAIT_S)
        result, why = attempt(fn, args, kwargs)
    outage.ended()
    return result


class PatientStorage(BaseStorage, BaseHeartbeat):
    """An Optuna storage (Optuna's cached RDB storage) whose every call waits out an outage (call() above)."""

    def __init__(self, inner: BaseStorage, url: str):
        self._inner, self._where = inner, mask_password(url)

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            call(self._inner.record_heartbeat, self._where, trial_id)
        except StorageUnreachable:
            pass  # the heartbeat thread must not die with a traceback: the trial's own next call says it

    def __getstate__(self):
        return self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)


def _patient(name: str):
    def method(self, *args, **kwargs):
        return call(getattr(self._inner, name), self._where, *args, **kwargs)

    method.__name__ = method.__qualname__ = name
    return method


# Every method of the two interfaces (the abstract ones and those with a default, which the cached storage
# implements better), delegated.
for _name in sorted({n for cls in (BaseStorage, BaseHeartbeat) for n, v in vars(cls).items()
                     if callable(v) and not n.startswith("__")} - set(vars(PatientStorage))):
    setattr(PatientStorage, _name, _patient(_name))
abc.update_abstractmethods(PatientStorage)
