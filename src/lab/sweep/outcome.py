"""How a sweep stands, for the commands that end or read one: the best trial or the Pareto front printed, the
stop rule recorded, and the cluster flow's parent run closed by whichever process sees the study done."""
import json
import shlex

import optuna
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from lab.sweep import budget, ranking, records, seeds, spec
from lab.sweep import stop as stop_rules
from lab.sweep import study as studies
from lab.sweep.objectives import objectives


def record_stop(client: MlflowClient, parent: str, study: optuna.Study, why: str | None) -> None:
    """The stop rule that ended this launch on the study and the parent run; a launch that ended otherwise
    clears an earlier launch's reason from the parent run."""
    if why:
        stop_rules.record(study, why)
        client.set_tag(parent, stop_rules.ATTR, why)
    elif stop_rules.ATTR in client.get_run(parent).data.tags:
        client.delete_tag(parent, stop_rules.ATTR)


def close_if_done(sweep: spec.Sweep, study: optuna.Study, uri: str, storage: str) -> str | None:
    """Cluster flow (`lab sweep --prepare`, then `lab worker`s): no parent process ends the parent run, so the
    last worker to finish, or `lab best`, does, with the summary. Returns the run id it closed."""
    parent = study.user_attrs.get(records.PARENT_ATTR)
    client = MlflowClient(uri)
    # All under the lock: of two workers finishing together, one closes the run and the other finds it closed.
    with budget.budget_lock(storage, sweep.spec.study):
        try:
            if not parent or client.get_run(parent).info.status != "RUNNING":
                return None
        except MlflowException:  # the run lives in another tracking store than this command's
            return None
        why = stop_rules.reason(sweep.spec.stop, sweep.spec.metric, study)
        if study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) or not why and (
                budget.queued_retries(study) or not budget.done(sweep, study, studies.make_sampler(sweep))):
            return None
        record_stop(client, parent, study, why)
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        records.end_orphaned_runs(client, parent, study)
        records.log_summary(client, parent, study)
        records.log_best_model(client, uri, sweep, study)
        client.set_terminated(parent, "FINISHED" if complete else "FAILED")
    return parent


def print_best(sweep: spec.Sweep, study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        print("no completed trial yet")
        return None
    names = [o.metric for o in objectives(sweep.spec)]
    if len(names) > 1:
        print_front(sweep, study, names)
    best = ranking.best(study)
    if best is None:
        print(f"no completed trial meets the constraints {format_constraints(sweep)} ({len(complete)} completed); "
              "loosen them, or export one with --trial N")
        return None
    if len(names) > 1:
        print(f"best trial {best.number} in {names[0]} on the front: {ranking.values_text(names, best)}")
    else:
        print(f"best trial {best.number}: {sweep.spec.metric}={best.value:.6g}")
    over_seeds = seeds.describe(best, sweep.spec.seeds)
    if over_seeds:
        lcb = f" (ranked by lcb = {best.value:.6g}, the cautious side of the mean)" if sweep.spec.aggregate == "lcb" else ""
        print(f"  {sweep.spec.metric} = {over_seeds}{lcb}")
    for name, value in best.params.items():
        print(f"  {name} = {value}")
    print("replay: lab train " + shlex.join(sweep.model_overrides(best)))
    return best


def format_constraints(sweep: spec.Sweep) -> str:
    return ", ".join(f"{name} {op} {v:g}" for name, b in sweep.spec.constraints.items()
                     for op, v in ((">=", b.min), ("<=", b.max)) if v is not None)


def print_front(sweep: spec.Sweep, study: optuna.Study, names: list[str]) -> None:
    """The Pareto front as a table, one row per member (and the infeasible trials it would hold otherwise)."""
    rows = ranking.front_table(study)
    n_front = sum(ranking.feasible(t) for t in rows)
    arrows = ["max" if d == optuna.study.StudyDirection.MAXIMIZE else "min" for d in study.directions]
    header = ["trial", *(f"{n} ({a})" for n, a in zip(names, arrows)), "feasible", "params"]
    cells = [[str(t.number), *(f"{v:.6g}" for v in t.values), "yes" if ranking.feasible(t) else "no",
              json.dumps(t.params)] for t in rows]
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header) - 1)]
    constraints = f"; constraints {format_constraints(sweep)}" if sweep.spec.constraints else ""
    print(f"Pareto front: {n_front} of {len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))} "
          f"completed trials{constraints}")
    for row in [header, *cells]:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    print(f"export one: lab best {sweep.typed or sweep.path} --trial N")
