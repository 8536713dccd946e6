"""A worker survives a trial that runs out of memory (the exception injected on the CPU): the trial is
FAIL with its reason, uses none of the budget, and the next trials run in the same process."""
import optuna
import pytest
import torch
from optuna.trial import TrialState

from lab.sweep import objective, spec, worker
from lab.sweep import study as studies
from lab.train import tracking

SWEEP = """study: oom
overrides: [data=synthetic, model=mlp, data.n_train=96, data.n_test=32, "model.net.hidden=[8]", trainer.max_epochs=1]
n_trials: 2
params:
  model.optimizer.lr: {type: float, low: 1.0e-3, high: 1.0e-1, log: true}
"""


def test_out_of_memory_fails_the_trial_and_the_worker_goes_on(tmp_path, mlflow_uri, monkeypatch):
    (tmp_path / "s.yaml").write_text(SWEEP)
    sweep = spec.load(tmp_path / "s.yaml")
    real, calls = objective.run_trial, []

    def first_one_runs_out_of_memory(sweep_, trial, parent):
        calls.append(trial.number)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(sweep_, trial, parent)

    monkeypatch.setattr(objective, "run_trial", first_one_runs_out_of_memory)
    studies.create_or_resume(sweep, str(tmp_path / "study.journal"))  # as `lab sweep` does before its workers
    ran = worker.work(sweep, str(tmp_path / "study.journal"), tmp_path, "w0")
    study = optuna.load_study(study_name="oom", storage=studies.open_storage(str(tmp_path / "study.journal")))
    trials = study.get_trials()
    assert ran == 3 and calls == [0, 1, 2]  # n_trials=2 counts the two that finished
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["fail_reason"].startswith("out of memory")
    assert [t.state for t in trials[1:]] == [TrialState.COMPLETE] * 2


@pytest.mark.parametrize("text, shown", [
    ("postgresql://lab:s3cret@db:5432/optuna", "postgresql://lab:***@db:5432/optuna"),
    ("http://user:pa55@mlflow.local/", "http://user:***@mlflow.local/"),
    ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
])
def test_passwords_are_masked(text, shown):
    assert tracking.mask_password(text) == shown
    assert tracking.flatten({"mlflow": {"tracking_uri": text}}) == {"mlflow.tracking_uri": shown}
