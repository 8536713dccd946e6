"""Which trials are best, for every command that reads a study: single- or multi-objective, any number of seeds.

A trial's MLflow run (trial_record.run_id) holds what the sweep scored it by; the run that holds a trained
model (checkpoint tag, logged model, misclassified images) is model_run_id: the same run with one seed, the
best seed's run with several (sweep/seeds.py sets it).
"""
import optuna
from optuna.study import StudyDirection
from optuna.trial import TrialState

from lab.sweep import seeds, trial_record


def model_run_id(trial: optuna.trial.FrozenTrial) -> str | None:
    return trial.user_attrs.get(seeds.MODEL_RUN) or trial_record.run_id(trial)


def feasible(trial: optuna.trial.FrozenTrial) -> bool:
    """Every constraint holds (sweep/scores.py sets them; a trial without constraints is feasible)."""
    return all(v <= 0 for v in trial.constraints.values())


def ranked(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Completed trials, best first: by value (single objective), or the Pareto front first, each group
    ordered by the first objective (multi-objective); trials that break a constraint after every feasible
    one (Optuna's best_trial and best_trials leave them out). Ties by trial number."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    sign = -1 if study.directions[0] == StudyDirection.MAXIMIZE else 1
    front = {t.number for t in study.best_trials} if len(study.directions) > 1 and complete else set()
    return sorted(complete, key=lambda t: (not feasible(t), t.number not in front, sign * t.values[0], t.number))


def front(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials a user chooses among: the feasible Pareto front ordered by the first objective (several
    objectives), or the best feasible trial (one); empty when no completed trial is feasible."""
    best = [t for t in ranked(study) if feasible(t)]
    if len(study.directions) == 1:
        return best[:1]
    on_front = {t.number for t in study.best_trials}
    return [t for t in best if t.number in on_front]


def dominates(a: optuna.trial.FrozenTrial, b: optuna.trial.FrozenTrial, directions) -> bool:
    signs = [-1 if d == StudyDirection.MAXIMIZE else 1 for d in directions]
    pairs = [(s * x, s * y) for s, x, y in zip(signs, a.values, b.values)]
    return all(x <= y for x, y in pairs) and any(x < y for x, y in pairs)


def front_table(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The feasible front, then the trials that break a constraint but no feasible front member beats (what
    the constraints cost): each is in front(study) or not feasible."""
    members = front(study)
    outside = [t for t in ranked(study) if not feasible(t)
               and not any(dominates(m, t, study.directions) for m in members)]
    return members + outside


def values_text(names: list[str], trial: optuna.trial.FrozenTrial) -> str:
    """"val/acc=0.91, model/params=1.2e+05" for a trial with values, else its state."""
    if not trial.values:
        return trial.state.name
    return ", ".join(f"{n}={v:.6g}" for n, v in zip(names, trial.values))


def best(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The one trial `lab best` exports by default and the report details: the best feasible trial, or with
    several objectives the front's member best in the first."""
    members = front(study)
    return members[0] if members else None
