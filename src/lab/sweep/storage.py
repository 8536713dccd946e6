"""Opening an Optuna storage by what a user names: a journal file path, or an RDB URL (postgresql://, sqlite:///).

Journal file storage is the default (many processes on one host, no "database is locked"); RDB URLs serve
studies shared across hosts and get heartbeats. study.py opens a sweep's own study through here, warm.py the
studies a warm start reads from.
"""
from pathlib import Path

from optuna.storages import JournalStorage, RDBStorage

from lab import private, settings
from lab.errors import LabError
from lab.sweep import journal, patience
from lab.uris import is_rdb, mask_password


def open_storage(storage: str, repair: bool = False, create: bool = True):
    """create=False: a journal or SQLite file that does not exist is an error, not a new empty study."""
    if is_rdb(storage) and not create and storage.startswith("sqlite:///"):
        if not Path(storage.removeprefix("sqlite:///")).is_file():
            raise KeyError(storage)  # opening it would create an empty database
    if is_rdb(storage):
        try:
            # A trial without a heartbeat for the grace period is failed and retried (LAB_HEARTBEAT_S, LAB_GRACE_S:
            # 30 s, 120 s; shorter for tests and clusters whose schedulers pause jobs), read when a storage opens.
            if storage.startswith("sqlite"):
                return RDBStorage(storage, **settings.rdb_timing())
            # A database server can restart under a running sweep: every call waits it out (patience.py), on
            # connections checked before use (a restart leaves the pooled ones dead).
            rdb = RDBStorage(storage, **settings.rdb_timing(), engine_kwargs={"pool_pre_ping": True})
            return patience.PatientStorage(private.CachedStorage(rdb), storage)
        except Exception as err:  # unreachable server, bad driver, bad URL
            raise LabError(f"cannot open Optuna storage {mask_password(storage)}: {err}") from err
    path = Path(storage)
    journal.check(path)  # before anything could modify it
    if not create and not path.is_file():
        raise KeyError(storage)
    path.parent.mkdir(parents=True, exist_ok=True)
    if repair:  # only where no worker is writing yet: the parent before it starts them
        journal.repair(path)
    return JournalStorage(journal.Journal(str(path)))
