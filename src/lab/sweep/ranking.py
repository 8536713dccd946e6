"""Which trials are best, for every command that reads a study: single- or multi-objective, any number of seeds.

A trial's MLflow run (user attr mlflow_run_id) holds what the sweep scored it by; the run that holds a trained
model (checkpoint tag, logged model, misclassified images) is model_run_id: the same run with one seed, the
best seed's run with several (sweep/seeds.py sets it).
"""
import optuna
from optuna.study import StudyDirection
from optuna.trial import TrialState


def model_run_id(trial: optuna.trial.FrozenTrial) -> str | None:
    return trial.user_attrs.get("model_run_id") or trial.user_attrs.get("mlflow_run_id")


def ranked(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Completed trials, best first: by value (single objective), or the Pareto front first, each group
    ordered by the first objective (multi-objective). Ties by trial number."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    sign = -1 if study.directions[0] == StudyDirection.MAXIMIZE else 1
    front = {t.number for t in study.best_trials} if len(study.directions) > 1 and complete else set()
    return sorted(complete, key=lambda t: (t.number not in front, sign * t.values[0], t.number))
