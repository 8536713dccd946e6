"""Every private name of Optuna and MLflow that lab relies on, and nowhere else (tests/test_private_apis.py fails
when one is used outside this file, and checks at test time that each one here still exists and behaves as
assumed, naming it). For each: why lab needs it, and the public API that would replace it.

The versions these were checked against are the ranges in pyproject.toml (the lowest: `make test-lowest`).

Public APIs that were considered and do not fit lab's rules (sweep/budget.py, sweep/worker.py):
- optuna.storages.fail_stale_trials fails each stale trial first and then calls the storage's stale-trial
  callback. lab records why on the trial (fail_reason, a user attr, which a FAILED trial no longer takes),
  ends its MLflow run, and queues the retry *before* the original fails, so that the budget never looks free
  in between; and it also reaps trials whose process died on this host, on a journal (no heartbeats at all).
- optuna.storages.RetryFailedTrialCallback runs only from that callback (RDB heartbeats), counts retries in
  system attrs of its own, and does not resume from a checkpoint (lab.resume_from): budget.retry does all
  three for every kind of cut-off trial.

Optuna and MLflow are imported where a name is first used: train/ reaches only the MLflow part, and `lab train`
must not pay for loading Optuna.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import optuna

# Every name this module offers (tests/test_private_apis.py checks each against the installed versions).
OFFERED = ("CachedStorage", "BaseHeartbeat", "heartbeat_thread", "set_trial_user_attr", "stale_by_heartbeat",
           "GRID_ID", "FIXED_PARAMS", "grid_cells", "grid_names", "assign_grid_cell", "JOURNAL_RECORD_START",
           "journal_bytes", "tracking_uri_set")

# --- Optuna storages -------------------------------------------------------------------------------------


def __getattr__(name: str):
    """Two Optuna classes, imported on first use (PEP 562).

    CachedStorage (optuna.storages._CachedStorage). Why: create_study wraps an RDBStorage in this cache itself,
    but only when given the URL or the bare RDBStorage; lab wraps the cached storage in
    sweep/patience.PatientStorage (waiting out a database restart), so it builds the cache itself. Public
    replacement: none (optuna.storages.get_storage says "only for internal usage").

    BaseHeartbeat (optuna.storages._heartbeat.BaseHeartbeat). Why: the interface that Optuna's heartbeat thread
    and checks look for (isinstance), which PatientStorage must offer for heartbeats to run through it. Public
    replacement: an exported BaseHeartbeat."""
    if name == "CachedStorage":
        from optuna.storages import _CachedStorage

        return _CachedStorage
    if name == "BaseHeartbeat":
        from optuna.storages._heartbeat import BaseHeartbeat

        return BaseHeartbeat
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def heartbeat_thread(study: optuna.Study, trial: optuna.Trial):
    """Optuna's heartbeat thread for trial (start() / join(); a no-op one where the storage keeps no heartbeats).

    Why: optimize() runs it around each trial; lab's workers ask and tell by hand (the budget check and the ask
    under one lock, worker.py) and must run it themselves. Public replacement: a heartbeat context for ask/tell
    trials, or optimize() with a budget hook."""
    from optuna.storages._heartbeat import get_heartbeat_thread

    return get_heartbeat_thread(trial._trial_id, study._storage)


def set_trial_user_attr(study: optuna.Study, trial: optuna.trial.FrozenTrial, key: str, value) -> None:
    """A user attr on a RUNNING trial this process did not ask for (a dead worker's, before it is failed).

    Why: Study.tell takes a trial number, but only a Trial (the asking process's object) sets attrs. Public
    replacement: Study.set_trial_user_attr(number, ...), or a tell() that takes user attrs."""
    study._storage.set_trial_user_attr(trial._trial_id, key, value)


def stale_by_heartbeat(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Those of trials whose heartbeat is older than the storage's grace period (RDB storage with heartbeats).

    Why: the query fail_stale_trials runs, without failing them (see the top of this file: lab fails each with
    its reason after queueing its retry). Public replacement: a public stale-trial query."""
    ids = set(study._storage._get_stale_trial_ids(study._study_id))
    return [t for t in trials if t._trial_id in ids]


# --- Optuna's GridSampler ----------------------------------------------------------------------------------
# Why: lab's GridSampler (sweep/study.py) hands out combinations across launches and workers by its own rules
# (none running twice, failures of earlier launches again); Optuna's keeps the grid, its order and the way it
# tells sample_independent which combination a trial runs private. Public replacement: a hook that chooses the
# next grid id, or a grid exposed as (names, cells).

GRID_ID = "grid_id"  # trial system attr: the index in grid_cells() of the combination the trial runs
FIXED_PARAMS = "fixed_params"  # trial system attr: enqueue_trial's params (the trial's combination is given)


def grid_cells(sampler: optuna.samplers.GridSampler) -> list[tuple]:
    """The combinations, in the order the seed shuffled them (a grid id indexes this list)."""
    return sampler._all_grids


def grid_names(sampler: optuna.samplers.GridSampler) -> list[str]:
    """The parameter names, in the order of each combination's values."""
    return sampler._param_names


def assign_grid_cell(study: optuna.Study, trial: optuna.trial.FrozenTrial, sampler: optuna.samplers.GridSampler,
                     choices: list[int]) -> None:
    """Gives trial one of the grid ids in choices, drawn by the sampler's seeded generator (as Optuna's own
    before_trial does), in the system attrs that sample_independent reads."""
    study._storage.set_trial_system_attr(trial._trial_id, "search_space", sampler._search_space)
    study._storage.set_trial_system_attr(trial._trial_id, GRID_ID, int(sampler._rng.rng.choice(choices)))


# --- Optuna's journal file -----------------------------------------------------------------------------------
# Why: lab's journal (sweep/journal.py) reads and writes Optuna's file itself so that a write cut short (disk
# full) leaves whole records; its records must be byte for byte what JournalFileBackend writes, and it tells a
# record's start by its first key. Public replacement: none (the format is not documented); an append that is
# whole or nothing in JournalFileBackend itself.

JOURNAL_RECORD_START = b'{"op_code":'  # every record JournalStorage writes starts with its op_code


def journal_bytes(logs: list[dict]) -> bytes:
    """The lines JournalFileBackend.append_logs writes for logs (compact JSON, one record a line)."""
    return ("\n".join(json.dumps(r, separators=(",", ":")) for r in logs) + "\n").encode()


# --- MLflow ---------------------------------------------------------------------------------------------------


def tracking_uri_set() -> str | None:
    """The tracking URI that mlflow.set_tracking_uri set in this process, None where none was.

    Why: train/exported.py sets the global URI around log_model (which reads it from there) and puts back what
    was set before: mlflow.get_tracking_uri() gives the resolved URI ($MLFLOW_TRACKING_URI or the default), and
    setting that would pin it. Public replacement: log_model taking a tracking URI, or a getter of the set one."""
    from mlflow.tracking._tracking_service import utils

    return utils._tracking_uri
