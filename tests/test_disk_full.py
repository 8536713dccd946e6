"""A disk that fills up mid-sweep, for real: a small tmpfs holds the study, the checkpoints and the MLflow DB."""
import os
import subprocess
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(disk)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a small file system needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk):
    """Fill the disk to its last byte; returns the filler file."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: nothing left to flush (and fail) on close
        for block in (1 << 20, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * block)
            except OSError:
                pass
    return filler


def test_a_full_disk_ends_every_run_and_is_said_in_a_sentence(workdir, lab, start_lab, slow_sweep_file, small_disk):
    tmp, env = workdir
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{small_disk / 'mlflow.db'}"}
    path = slow_sweep_file(tmp / "full.yaml", "full", 3)
    out_dir = small_disk / "runs"

    def study():  # as plain Optuna reads the journal (it creates the file when missing: only once it exists)
        if not (out_dir / "study.journal").exists():
            raise KeyError("no journal yet")
        return optuna.load_study(study_name="full", storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(out_dir / "study.journal"))))

    proc = start_lab("sweep", path, "--workers", "1", "--no-live", "--out", out_dir, env=env)
    end = time.time() + 300
    while time.time() < end:
        assert proc.poll() is None, proc.stdout.read()
        try:
            running = study().get_trials(states=(TrialState.RUNNING,))
        except KeyError:
            running = []
        if any(t.intermediate_values for t in running):
            break
        time.sleep(0.3)
    filler = fill(small_disk)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out
    assert "the disk is full" in out and "Traceback" not in out, out

    filler.unlink()  # space freed: the same command resumes
    again = lab("sweep", path, "--workers", "1", "--no-live", "--out", out_dir, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    trials = study().get_trials()
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("full").experiment_id
    assert not client.search_runs([exp], "attributes.status = 'RUNNING'")
    assert client.get_run(study().user_attrs["mlflow_parent_run_id"]).info.status == "FINISHED"
