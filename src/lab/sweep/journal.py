"""The study's journal file: Optuna's JournalFileBackend, made to survive a full disk.

Optuna writes one JSON record per line under its own lock. Two faults break it:
- A write cut short (disk full, a kill mid-write) leaves a short line; once space is freed the next worker's
  record is glued onto it, and Optuna's reader raises JSONDecodeError for the whole study from then on.
  Here a failed append is cut back to where it started (so a record is in the file whole or not at all),
  and the reader skips bytes that do not decode, keeping a record glued onto them.
- A mistyped --storage (a PNG, a CSV, a folder) must never be "repaired" as if it were a journal.
"""
import contextlib
import json
import logging
import os
import time
from pathlib import Path

from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

from lab.errors import LabError
from lab.private import JOURNAL_RECORD_START as RECORD_START  # Optuna's record format: lab/private.py
from lab.private import journal_bytes

log = logging.getLogger(__name__)


def check(path: Path) -> None:
    """Refuse, without touching it, a path that is not a journal: a folder, or a file that has bytes and does
    not start like one."""
    if path.is_dir():
        raise LabError(f"--storage {path} is a folder; give a journal file (e.g. {path / 'study.journal'}) or a "
                       "database URL (postgresql://..., sqlite:///...).")
    if not path.is_file():
        return
    with open(path, "rb") as f:
        head = f.read(len(RECORD_START))
    if head and head != RECORD_START:
        raise LabError(f"--storage {path} is not an Optuna journal (it starts with {head[:8]!r}); lab leaves it "
                       "untouched. Give a new file name, the study.journal of an earlier sweep, or a database URL.")


def records(line: bytes) -> tuple[dict | None, bytes]:
    """(the record on a complete line, or None; the torn bytes of it, b'' when it decodes whole).

    A torn line is a short record with, maybe, a whole record glued on after it: that one is kept."""
    try:
        return json.loads(line), b""
    except ValueError:
        pass
    start = line.rfind(RECORD_START, 1)
    if start > 0:
        try:
            return json.loads(line[start:]), line[:start]
        except ValueError:
            pass
    return None, line


class Journal(JournalFileBackend):
    """Record numbers count decoded records, not lines, so that every process replays the same study."""

    def __init__(self, file_path: str, lock_obj=None):
        # The lock and path JournalFileBackend keeps (its default lock), held here too: its own are private.
        self.path, self.lock = file_path, lock_obj or JournalFileSymlinkLock(file_path)
        super().__init__(file_path, self.lock)
        self._offsets: dict[int, int] = {0: 0}  # record number -> byte offset of the line it starts on
        self._warned: set[int] = set()

    def read_logs(self, log_number_from: int):
        number = max((n for n in self._offsets if n <= log_number_from), default=0)
        offset = self._offsets[number]
        with open(self.path, "rb") as f:
            f.seek(offset)
            for line in f:
                if not line.endswith(b"\n"):
                    break  # being written now, or torn by a crash and not yet followed by anything
                record, torn = records(line)
                if torn and offset not in self._warned:
                    self._warned.add(offset)
                    log.warning("journal %s: %d torn bytes at byte %d skipped (a write cut short, e.g. disk full)%s",
                                self.path, len(torn), offset, "; the record after them is kept" if record else "")
                offset += len(line)
                if record is None:
                    self._offsets[number] = offset  # nothing to replay here: record `number` starts further on
                    continue
                self._offsets[number + 1] = offset
                if number >= log_number_from:
                    yield record
                number += 1

    @contextlib.contextmanager
    def locked(self):
        """The lock JournalFileBackend.append_logs itself takes (BaseJournalFileLock's acquire/release)."""
        self.lock.acquire()
        try:
            yield
        finally:
            self.lock.release()

    def append_logs(self, logs: list[dict]) -> None:
        data = journal_bytes(logs)
        with self.locked():
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except BaseException:
                try:  # whole records or none: cut back the part that was written (needs no free space)
                    os.ftruncate(fd, start)
                except OSError:
                    log.warning("journal %s: could not cut back a failed write; readers skip its bytes",
                                self.path)
                raise
            finally:
                os.close(fd)


def repair(path: Path) -> Path | None:
    """Rewrite the journal without its torn bytes (every record kept, a glued one included), which go to
    <name>.torn-<time>. Only where no worker is writing: the parent before it starts them. Returns where the
    torn bytes went, or None for a clean journal."""
    if not path.is_file():
        return None
    data = path.read_bytes()
    # Every line one whole record (a torn one lacks its newline, or has a record glued on): nothing to decode.
    if data.endswith(b"\n") and data.count(RECORD_START) == data.count(b"\n"):
        return None
    kept, torn = [], []
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            torn.append(line)
            continue
        record, bad = records(line)
        if bad:
            torn.append(bad if bad.endswith(b"\n") else bad + b"\n")
        if record is not None:
            kept.append(line[len(bad):])
    if not torn:
        return None
    aside = path.with_name(f"{path.name}.torn-{int(time.time())}")
    aside.write_bytes(b"".join(torn))
    fresh = path.with_name(f".{path.name}.repaired")
    fresh.write_bytes(b"".join(kept))
    os.replace(fresh, path)
    log.warning("journal %s had %d torn record(s) (%d bytes; a crash or a full disk during a write): moved them "
                "to %s; every intact record is kept", path, len(torn), sum(map(len, torn)), aside)
    return aside
