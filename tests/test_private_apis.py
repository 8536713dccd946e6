"""Optuna's and MLflow's private names live in lab/private.py alone, and what it relies on still holds.

(a) An ast scan of src/lab: a private module or name imported from optuna/mlflow, an attribute chain through
    one (optuna.storages._heartbeat...), a private attribute of an Optuna or MLflow object (study._storage,
    trial._trial_id, ...), or a subclass of theirs reading their private state (self._all_grids) fails here,
    naming file and line, anywhere but lab/private.py.
(b) Each name lab/private.py offers is checked against the installed Optuna and MLflow, so that an upgrade that
    changes one fails here by its name instead of breaking resume and reaping silently.
"""
import ast
import json
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

import lab
from lab import private

SRC = Path(lab.__file__).resolve().parent
LIBRARIES = ("optuna", "mlflow")


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and not name.endswith("_")  # not _target_


def private_names_of_objects(tmp_path_factory) -> set[str]:
    """The private attributes of the Optuna and MLflow objects lab handles: their classes' and instances'."""
    tmp = tmp_path_factory.mktemp("objects")
    rdb = private.CachedStorage(RDBStorage(f"sqlite:///{tmp / 'o.db'}", heartbeat_interval=60))
    journal = JournalStorage(JournalFileBackend(str(tmp / "o.journal")))
    objects = [rdb, rdb._backend, journal, journal._backend, optuna.storages.InMemoryStorage()]  # private: ok here
    for storage in (rdb, journal):
        study = optuna.create_study(storage=storage, sampler=optuna.samplers.GridSampler({"x": [1, 2]}))
        trial = study.ask()
        trial.suggest_categorical("x", [1, 2])
        objects += [study, trial, study.sampler, study.pruner]
        study.tell(trial, 1.0)
        objects += study.get_trials()
    objects += [getattr(optuna.samplers, n) for n in optuna.samplers.__all__]
    objects += [getattr(optuna.pruners, n) for n in optuna.pruners.__all__]
    client = MlflowClient("http://127.0.0.1:9")  # a REST client connects on first use: nothing is sent here
    objects += [client, client._tracking_client, mlflow.entities.Run, mlflow.entities.RunInfo,  # private: ok here
                mlflow.entities.RunData, mlflow.entities.Dataset, mlflow.data.meta_dataset.MetaDataset]
    names = set()
    for o in objects:
        names |= {n for n in dir(o) if is_private(n)}
        names |= {n for n in getattr(o, "__dict__", {}) if is_private(n)}
    return names


def library_bindings(tree: ast.Module) -> set[str]:
    """Names a file binds to Optuna or MLflow modules or objects (import optuna; from mlflow.x import y)."""
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] in LIBRARIES}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in LIBRARIES:
            bound |= {a.asname or a.name for a in node.names}
    return bound


def chain_root(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def findings(source: str, private_attrs: set[str]) -> list[str]:
    """What in source uses a private Optuna/MLflow name: 'line: what' for each."""
    tree = ast.parse(source)
    bound = library_bindings(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in LIBRARIES:
            names = [a.name for a in node.names]
            if any(is_private(p) for p in node.module.split(".")) or any(is_private(n) for n in names):
                out.append(f"{node.lineno}: from {node.module} import {', '.join(names)}")
        elif isinstance(node, ast.Import):
            out += [f"{node.lineno}: import {a.name}" for a in node.names
                    if a.name.split(".")[0] in LIBRARIES and any(is_private(p) for p in a.name.split("."))]
        elif isinstance(node, ast.Attribute) and is_private(node.attr):
            base = ast.unparse(node.value)
            if chain_root(node) in bound or (base not in ("self", "cls") and node.attr in private_attrs):
                out.append(f"{node.lineno}: {base}.{node.attr}")
        elif isinstance(node, ast.ClassDef) and any(chain_root(b) in bound for b in node.bases):
            # A subclass of theirs: self._x that the class does not define itself is their private state.
            own = {t.attr for n in ast.walk(node) if isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign))
                   for target in (n.targets if isinstance(n, ast.Assign) else [n.target]) for t in ast.walk(target)
                   if isinstance(t, ast.Attribute) and ast.unparse(t.value) == "self"}  # a, self._b = ... too
            own |= {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
            out += [f"{n.lineno}: self.{n.attr} (in {node.name}, a subclass of {', '.join(map(ast.unparse, node.bases))})"
                    for n in ast.walk(node) if isinstance(n, ast.Attribute) and ast.unparse(n.value) == "self"
                    and is_private(n.attr) and n.attr not in own]
    return out


@pytest.fixture(scope="module")
def private_attrs(tmp_path_factory):
    return private_names_of_objects(tmp_path_factory)


def test_private_names_only_in_lab_private(private_attrs):
    wrong = {}
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "private.py" and path.parent == SRC:
            continue
        found = findings(path.read_text(), private_attrs)
        if found:
            wrong[str(path.relative_to(SRC))] = found
    assert not wrong, f"private Optuna/MLflow names outside lab/private.py (move them there, saying why): {wrong}"


def test_the_scan_sees_each_kind_of_private_use(private_attrs):
    """The rule above can fail: each way lab once used a private name is seen."""
    bad = '''
import optuna
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.storages import _CachedStorage
from mlflow.tracking._tracking_service import utils

def f(study, trial):
    study._storage.get_trial(trial._trial_id)
    optuna.storages._heartbeat.is_heartbeat_enabled(None)
    return utils._tracking_uri

class Grid(optuna.samplers.GridSampler):
    def g(self):
        self._mine, x = 1, 2
        return self._all_grids, self._mine
'''
    found = "\n".join(findings(bad, private_attrs))
    for use in ("optuna.storages._heartbeat import", "import _CachedStorage", "mlflow.tracking._tracking_service",
                "study._storage", "trial._trial_id", ": optuna.storages._heartbeat",
                "utils._tracking_uri", "self._all_grids"):
        assert use in found, (use, found)
    assert "self._mine" not in found  # the subclass's own state is its own
    assert not findings("def f(m):\n    return m._loss, node._target_\n", private_attrs)  # lab's own names


# ---- (b): what lab/private.py relies on, checked against the installed versions -----------------------------

def rdb_study(tmp_path, heartbeat_s: int | None = None, grace_s: int | None = None, sampler=None) -> optuna.Study:
    storage = RDBStorage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_interval=heartbeat_s, grace_period=grace_s)
    return optuna.create_study(storage=private.CachedStorage(storage), sampler=sampler)


def check_cached_storage(tmp_path):
    study = rdb_study(tmp_path)
    assert isinstance(study._storage, optuna.storages.BaseStorage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert len(optuna.load_study(study_name=study.study_name, storage=f"sqlite:///{tmp_path / 'study.db'}").trials) == 2


def check_base_heartbeat(tmp_path):
    assert issubclass(RDBStorage, private.BaseHeartbeat)
    # What PatientStorage delegates, and Optuna's heartbeat thread and stale-trial query call on it.
    for name in ("record_heartbeat", "_get_stale_trial_ids", "get_heartbeat_interval"):
        assert name in private.BaseHeartbeat.__abstractmethods__, name
    from lab.sweep import patience

    wrapped = patience.PatientStorage(private.CachedStorage(RDBStorage(f"sqlite:///{tmp_path / 'p.db'}",
                                                                       heartbeat_interval=5)), "p.db")
    assert wrapped.get_heartbeat_interval() == 5


def check_heartbeat_thread_and_stale(tmp_path):
    """A trial whose heartbeat thread ran and stopped goes stale after the grace period; one whose beats go on
    (or whose storage keeps none) does not."""
    study = rdb_study(tmp_path, heartbeat_s=1, grace_s=1)
    quiet, beating = study.ask(), study.ask()
    thread = private.heartbeat_thread(study, quiet)
    thread.start()
    thread.join()  # one beat, then none
    thread = private.heartbeat_thread(study, beating)
    thread.start()
    try:
        time.sleep(2.2)  # > grace 1 s after the quiet trial's only beat; the beating one beats every 1 s
        running = study.get_trials(states=(TrialState.RUNNING,))
        assert [t.number for t in private.stale_by_heartbeat(study, running)] == [quiet.number]
    finally:
        thread.join()
    journal = optuna.create_study(storage=JournalStorage(JournalFileBackend(str(tmp_path / "j.journal"))))
    trial = journal.ask()
    thread = private.heartbeat_thread(journal, trial)  # no heartbeats on a journal: a thread that does nothing
    thread.start()
    thread.join()


def check_set_trial_user_attr(tmp_path):
    study = rdb_study(tmp_path)
    trial = study.ask()
    other = optuna.load_study(study_name=study.study_name, storage=f"sqlite:///{tmp_path / 'study.db'}")
    (frozen,) = other.get_trials()
    private.set_trial_user_attr(other, frozen, "fail_reason", "worker process died")
    assert study.get_trials()[0].user_attrs["fail_reason"] == "worker process died" and trial.number == 0


def check_grid(tmp_path):
    """The grid's cells and names, and a grid id given by assign_grid_cell is what the trial then runs."""
    space = {"b": [1, 2], "a": ["x", "y", "z"]}
    sampler = optuna.samplers.GridSampler(space, seed=3)
    cells, names = private.grid_cells(sampler), private.grid_names(sampler)
    assert names == ["a", "b"] and sorted(map(tuple, cells)) == [(a, b) for a in "xyz" for b in (1, 2)]

    class Pick(optuna.samplers.GridSampler):
        def before_trial(self, study, trial):
            private.assign_grid_cell(study, trial, self, [4])

    study = optuna.create_study(sampler=Pick(space, seed=3))
    trial = study.ask({n: optuna.distributions.CategoricalDistribution(v) for n, v in space.items()})
    assert trial.params == dict(zip(names, cells[4])), (trial.params, cells)
    assert study.get_trials()[0].system_attrs[private.GRID_ID] == 4
    study.enqueue_trial({"a": "x", "b": 1})
    assert private.FIXED_PARAMS in study.get_trials()[-1].system_attrs


def check_journal_format(tmp_path):
    """Every line JournalFileBackend writes starts like a record and is what journal_bytes gives for it."""
    path = tmp_path / "study.journal"
    study = optuna.create_study(storage=JournalStorage(JournalFileBackend(str(path))))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    study.set_user_attr("lab.metric", "val/acc")
    lines = path.read_bytes().splitlines(keepends=True)
    assert len(lines) > 5
    for line in lines:
        assert line.startswith(private.JOURNAL_RECORD_START), line
        assert private.journal_bytes([json.loads(line)]) == line, line


def check_tracking_uri_set(tmp_path, monkeypatch):
    before = private.tracking_uri_set()
    try:
        mlflow.set_tracking_uri(None)  # unsets $MLFLOW_TRACKING_URI too where one was set
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'env.db'}")
        assert private.tracking_uri_set() is None and mlflow.get_tracking_uri().endswith("env.db")
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'set.db'}")
        assert private.tracking_uri_set() == f"sqlite:///{tmp_path / 'set.db'}"
    finally:
        mlflow.set_tracking_uri(before)


CHECKS = {
    "CachedStorage": check_cached_storage,
    "BaseHeartbeat": check_base_heartbeat,
    "heartbeat_thread": check_heartbeat_thread_and_stale,
    "stale_by_heartbeat": check_heartbeat_thread_and_stale,
    "set_trial_user_attr": check_set_trial_user_attr,
    "GRID_ID": check_grid, "FIXED_PARAMS": check_grid, "grid_cells": check_grid, "grid_names": check_grid,
    "assign_grid_cell": check_grid,
    "JOURNAL_RECORD_START": check_journal_format, "journal_bytes": check_journal_format,
    "tracking_uri_set": check_tracking_uri_set,
}


def test_every_offered_name_has_a_check():
    assert set(private.OFFERED) == set(CHECKS), set(private.OFFERED) ^ set(CHECKS)
    for name in private.OFFERED:
        getattr(private, name)  # each exists (the lazy ones import here)


@pytest.mark.parametrize("check", sorted(set(CHECKS.values()), key=lambda f: f.__name__), ids=lambda f: f.__name__)
def test_what_lab_private_relies_on_still_holds(check, tmp_path, monkeypatch):
    names = [n for n, f in CHECKS.items() if f is check]
    kwargs = {"monkeypatch": monkeypatch} if "monkeypatch" in check.__code__.co_varnames else {}
    try:
        check(tmp_path, **kwargs)
    except Exception as err:  # re-raised with the names it concerns
        raise AssertionError(
            f"lab.private.{', lab.private.'.join(names)} no longer hold with optuna {optuna.__version__}, mlflow "
            f"{mlflow.__version__}: {type(err).__name__}: {err}. Adapt lab/private.py (and the ranges in "
            "pyproject.toml).") from err
