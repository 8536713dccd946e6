"""SIGINT/SIGTERM become lab.errors.Interrupted, but not while a database call is under way.

An exception raised while SQLAlchemy is inside sqlite3's executemany leaves the statement unfinalized: the
connection cannot close and keeps SQLite's write lock while the traceback lives. Ending the run KILLED then waits
MLflow's 20 s busy_timeout and fails with "database is locked", and so does every later write of the process.
Measured with a SIGINT from a timer at a random moment of a MlflowClient.log_batch loop: the 5th of 20 tries
locked the store for good; with the signal held here, 20 of 20 runs were ended KILLED at once. A signal that
lands in such a call is held and raised once the call has returned; a second one is raised where it lands."""

import signal

from lab.errors import Interrupted

# Calls that must not be cut short: SQL sessions (MLflow's and Optuna's stores) and the stores around them.
STORE_MODULES = ("sqlalchemy.", "sqlite3", "alembic.", "mlflow.store.", "optuna.storages.")
RECHECK_S = 0.02  # how soon a held signal looks again whether the call has returned (SIGALRM)

_held: list[int] = []  # the signal waiting for a store call to return: none or one


def inside_store(frame) -> bool:
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith(STORE_MODULES):
            return True
        frame = frame.f_back
    return False


def raise_interrupted(signum, frame) -> None:
    if _held or not inside_store(frame):
        _held.clear()
        signal.setitimer(signal.ITIMER_REAL, 0)
        raise Interrupted(signal.Signals(signum).name)
    _held.append(signum)
    signal.signal(signal.SIGALRM, _recheck)
    signal.setitimer(signal.ITIMER_REAL, RECHECK_S)


def _recheck(_signum, frame) -> None:
    if not _held:
        return
    if inside_store(frame):
        signal.setitimer(signal.ITIMER_REAL, RECHECK_S)
        return
    raise Interrupted(signal.Signals(_held.pop()).name)


def install(signals=(signal.SIGINT, signal.SIGTERM)) -> None:
    """Ctrl-C and SIGTERM (a cluster's, `kill`'s) both end runs KILLED, in lab's words."""
    _held.clear()
    for sig in signals:
        signal.signal(sig, raise_interrupted)
