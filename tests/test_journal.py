"""The journal file under byte-level faults: torn records anywhere, failed appends, files that are no journal."""
import json
import resource
import signal

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from lab.errors import LabError
from lab.sweep import journal
from lab.sweep import study as studies

TORN = b'{"op_code":6,"worker_id":"w","trial_id":1,"us'  # a record cut short by a full disk


def plain(path):
    """The study as plain Optuna reads the file."""
    return optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(path))))


def three_trials(path):
    study = optuna.create_study(study_name="s", storage=studies.open_storage(str(path)))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    return study


def tear_mid_journal(path):
    """A short record, then (space freed) the next worker's whole record glued onto it, then more records."""
    with open(path, "ab") as f:
        f.write(TORN)
    plain_backend = JournalFileBackend(str(path))
    plain_backend.append_logs([{"op_code": 2, "worker_id": "other", "study_id": 0, "user_attr": {"glued": True}}])
    plain_backend.append_logs([{"op_code": 2, "worker_id": "other", "study_id": 0, "user_attr": {"after": 1}}])


def test_a_torn_record_mid_journal_keeps_every_intact_record(tmp_path):
    path = tmp_path / "study.journal"
    three_trials(path)
    tear_mid_journal(path)
    with pytest.raises(ValueError):  # the fault is real: Optuna's own reader gives up on the whole study
        plain(path).get_trials()

    before = path.read_bytes()
    study = optuna.load_study(study_name="s", storage=studies.open_storage(str(path)))
    assert len(study.get_trials()) == 3
    assert study.user_attrs == {"glued": True, "after": 1}  # the record glued onto the tear is kept
    assert path.read_bytes() == before  # reading repairs nothing behind the writers' backs

    aside = journal.repair(path)
    assert aside.read_bytes() == TORN + b"\n"
    repaired = plain(path)  # plain Optuna reads the repaired file
    assert len(repaired.get_trials()) == 3 and repaired.user_attrs == {"glued": True, "after": 1}
    assert journal.repair(path) is None  # a clean journal is left alone


def test_a_worker_survives_a_tear_appearing_under_it(tmp_path):
    path = tmp_path / "study.journal"
    three_trials(path)
    study = optuna.load_study(study_name="s", storage=studies.open_storage(str(path)))  # a running worker's view
    assert len(study.get_trials()) == 3
    tear_mid_journal(path)
    assert study.user_attrs == {"glued": True, "after": 1}
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)  # it goes on asking and telling
    again = optuna.load_study(study_name="s", storage=studies.open_storage(str(path)))
    assert [t.state.name for t in again.get_trials()] == ["COMPLETE"] * 5
    assert [t.number for t in again.get_trials()] == [0, 1, 2, 3, 4]


def test_a_failed_append_leaves_no_partial_record(tmp_path):
    path = tmp_path / "study.journal"
    study = three_trials(path)
    before = path.read_bytes()
    record = {"op_code": 2, "worker_id": "w", "study_id": 0, "user_attr": {"big": "x" * 10_000}}
    # The file may grow by 100 bytes only: the kernel writes that much of the record, then refuses (EFBIG),
    # as a full disk does with ENOSPC.
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 100, old_limit[1]))
    try:
        with pytest.raises(OSError):
            journal.Journal(str(path)).append_logs([record])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert path.read_bytes() == before
    study.set_user_attr("after", 1)  # the next write lands on a clean line
    assert plain(path).user_attrs == {"after": 1}
    json.loads(path.read_bytes().splitlines()[-1])


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n" + bytes(200), b"epoch,loss\n1,0.5\n"])
def test_a_file_that_is_not_a_journal_is_refused_untouched(tmp_path, content):
    path = tmp_path / "photo.png"
    path.write_bytes(content)
    with pytest.raises(LabError, match="is not an Optuna journal"):
        studies.open_storage(str(path), repair=True)
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"]  # nothing set aside either


def test_a_folder_as_storage_is_refused(tmp_path):
    with pytest.raises(LabError, match="is a folder"):
        studies.open_storage(str(tmp_path), repair=True)


def test_a_torn_last_line_is_set_aside(tmp_path):
    path = tmp_path / "study.journal"
    study = optuna.create_study(study_name="s", storage=studies.open_storage(str(path)))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    with open(path, "ab") as f:
        f.write(b'{"op_code": 4, "worker_id": "torn-by-a-cra')  # a write cut short by a crash

    aside = journal.repair(path)
    assert aside is not None and aside.read_bytes().startswith(b'{"op_code": 4')
    study = optuna.load_study(study_name="s", storage=studies.open_storage(str(path)))
    assert len(study.get_trials()) == 3
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)  # appending works again
    assert len(optuna.load_study(study_name="s", storage=studies.open_storage(str(path))).get_trials()) == 4
    assert journal.repair(path) is None  # a clean journal is left alone


def test_lab_refuses_a_mistyped_storage_and_leaves_it_untouched(workdir, lab):
    tmp, _ = workdir
    photo = tmp / "photo.png"
    photo.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    before = photo.read_bytes()
    for command, storage in (("sweep", photo), ("sweep", tmp), ("best", photo)):  # no journal; a folder
        proc = lab(command, "quickstart", "--storage", storage)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        (line,) = proc.stderr.strip().splitlines()
        assert str(storage) in line and ("not an Optuna journal" in line or "is a folder" in line)
    assert photo.read_bytes() == before
    assert not list(tmp.glob("photo.png?*"))  # nothing set aside or created beside it
