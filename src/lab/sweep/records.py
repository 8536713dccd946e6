"""The sweep's parent MLflow run: created once per study, kept current with the best trial, and given
the trials table and Optuna's plots at the end. Trials are child runs (tag mlflow.parentRunId)."""
import csv
import io
import json
import logging
import time
import warnings

import optuna
from mlflow.entities import Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from lab.errors import LabError
from lab.sweep import budget, patience, ranking, trial_record
from lab.sweep import study as studies
from lab.sweep.spec import Sweep
from lab.train import tracking
from lab.uris import sqlite_path

log = logging.getLogger(__name__)
PARENT_ATTR = "mlflow_parent_run_id"
STORE_ATTR = "lab.mlflow_uri"  # study attr: the tracking URI (password masked) its parent run was created in
PRUNED_SUFFIX = " (pruned)"
STORAGE_LOST = patience.reason("")[:-1]  # "storage unreachable (": the start of the reason patience.reason() gives


def check_store(study: optuna.Study, uri: str, resuming: bool = True) -> None:
    """A resumed sweep logs into the MLflow store it started in, and the commands that read it afterwards read
    from there: its parent run must be there. Checked before anything touches the store (a sqlite:/// path that
    does not exist is not created)."""
    run_id = study.user_attrs.get(PARENT_ATTR)
    if not run_id:
        return
    path = sqlite_path(uri)
    if path is None or path.exists():
        try:
            MlflowClient(uri).get_run(run_id)
            return
        except MlflowException:
            pass
    started = study.user_attrs.get(STORE_ATTR)
    was = f" It was started with MLFLOW_TRACKING_URI={started}." if started else ""
    fresh = ", or start a new study with --study NAME" if resuming else ""
    raise LabError(f"study {study.study_name!r} logs to MLflow parent run {run_id}, which is not in "
                   f"{tracking.mask_password(uri)}.{was} Set MLFLOW_TRACKING_URI back to the store the sweep started "
                   f"in{fresh}.")


def parent_run(study: optuna.Study, sweep: Sweep, uri: str, storage: str) -> str:
    """The study's parent run id, created on first launch and reopened (RUNNING) on resume. Under the study's
    budget lock: two launches of one study at once found no parent yet and each created one."""
    with budget.budget_lock(storage, sweep.spec.study):
        return _parent_run(study, sweep, uri, storage)


def _parent_run(study: optuna.Study, sweep: Sweep, uri: str, storage: str) -> str:
    client = MlflowClient(uri)
    run_id = study.user_attrs.get(PARENT_ATTR)
    if run_id:
        client.update_run(run_id, status="RUNNING")
        return run_id
    exp_id = tracking.experiment_id(uri, sweep.mlflow_experiment)
    # A launch that died between creating the run and recording it on the study left one behind: reuse it.
    uid = study.user_attrs.get(studies.UID_ATTR, "")
    same = client.search_runs([exp_id], f"tags.`lab.study_uid` = '{uid}'", max_results=1) if uid else []
    if same:
        run_id = same[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        study.set_user_attr(PARENT_ATTR, run_id)
        return run_id
    tags = {**tracking.environment_tags(), **tracking.git_state(), "lab.sweep": "true", "study": sweep.spec.study,
            "lab.study_uid": uid}
    run_id = client.create_run(exp_id, run_name=f"sweep-{sweep.spec.study}", tags=tags).info.run_id
    spec = sweep.spec
    params = {"study": spec.study, "experiment": spec.experiment, "overrides": json.dumps(sweep.base_overrides),
              "metric": spec.metric, "direction": spec.direction, "n_trials": spec.n_trials,
              "sampler": json.dumps(spec.sampler), "pruner": json.dumps(spec.pruner),
              "storage": tracking.mask_password(storage), "search_space": sweep.space_json(),
              "seeds": spec.seeds, "aggregate": spec.aggregate}
    if spec.objectives or spec.constraints:  # several objectives: metric/direction name the first only
        params["objectives"] = studies.identity(sweep)["lab.objectives"]
        params["constraints"] = studies.identity(sweep)["lab.constraints"]
    client.log_batch(run_id, params=[Param(k, str(v)[: tracking.MAX_PARAM_CHARS]) for k, v in params.items()])
    client.log_text(run_id, sweep.path.read_text(), "sweep.yaml")
    study.set_user_attr(STORE_ATTR, tracking.mask_password(uri))
    study.set_user_attr(PARENT_ATTR, run_id)
    return run_id


def tag_run(uri: str, trial: optuna.trial.FrozenTrial | optuna.Trial, state: str, reason: str | None) -> None:
    run_id = trial_record.run_id(trial)
    if not run_id:
        return
    client = MlflowClient(uri)
    trial_record.mark(client, run_id, state, reason)
    if state == "PRUNED":  # the runs table shows names, not tags: a pruned trial's FINISHED run reads as one
        name = client.get_run(run_id).info.run_name or f"trial-{trial.number}"
        if not name.endswith(PRUNED_SUFFIX):
            client.update_run(run_id, name=name + PRUNED_SUFFIX)


def end_if_running(uri: str, trial: optuna.trial.FrozenTrial | optuna.Trial, status: str) -> None:
    """A signal can land before tracking.run's own handler is in place, or inside its last write (a slow SQLite
    under load): the trial's run must not stay RUNNING for ever."""
    run_id = trial_record.run_id(trial)
    if run_id:
        client = MlflowClient(uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status)


def end_failed(uri: str, trial: optuna.trial.FrozenTrial, reason: str) -> None:
    """The run of a trial that another process failed ends FAILED too, whatever its worker made of it."""
    run_id = trial_record.run_id(trial)
    if run_id:
        tag_run(uri, trial, "FAIL", reason)
        MlflowClient(uri).set_terminated(run_id, "FAILED")


def end_parent(client: MlflowClient, run_id: str, reason: str) -> None:
    """The parent run of a sweep that cannot go on (its storage is gone): FAILED, saying why."""
    client.set_tag(run_id, "lab.end", reason[:5000])
    client.set_terminated(run_id, "FAILED")


def abandoner(uri: str, max_retries: int):
    """abandon(study, trial, reason) for a trial whose worker is gone: fail it, queue it again within
    max_retries, and end its MLflow run FAILED (nobody else will)."""

    def abandon(study: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str) -> None:
        run_id = trial_record.run_id(trial)
        said = trial_record.said(MlflowClient(uri).get_run(run_id).data.tags) if run_id else ""
        if said.startswith(STORAGE_LOST):  # its worker stopped because the storage was away (worker.storage_lost)
            reason = said
        again = budget.retry(study, trial, reason, max_retries)
        if run_id and MlflowClient(uri).get_run(run_id).info.status == "RUNNING":
            tag_run(uri, trial, "RETRIED" if again else "FAIL", reason)
            MlflowClient(uri).set_terminated(run_id, "FAILED")
            end_seed_runs(MlflowClient(uri), run_id)

    return abandon


def end_seed_runs(client: MlflowClient, trial_run_id: str) -> None:
    """A seeded trial's seed run that was training when its worker died (seeds: K nests them under the
    trial's run); the seeds it finished stay FINISHED, and its retry carries them."""
    exp = client.get_run(trial_run_id).info.experiment_id
    for run in client.search_runs([exp], f"tags.mlflow.parentRunId = '{trial_run_id}' and attributes.status = 'RUNNING'"):
        client.set_tag(run.info.run_id, "lab.end", "closed by lab: its worker died")
        client.set_terminated(run.info.run_id, "FAILED")


def end_orphaned_runs(client: MlflowClient, parent: str, study: optuna.Study) -> int:
    """End the trial runs left RUNNING by trials that ended without them (a full disk refused the run's last
    write; a kill before it): each as its trial ended. Call where no worker of this study runs a trial that
    is not RUNNING in the study (launch, finish). Returns how many it ended."""
    exp = client.get_run(parent).info.experiment_id
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    ended = 0
    for run in client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'RUNNING'",
                                  max_results=10_000):
        trial = trials.get(trial_record.number(run.data.tags))
        if trial is not None and trial.state == TrialState.RUNNING:
            continue  # a live trial (its worker may be on another host)
        own = trial is not None and trial_record.run_id(trial) == run.info.run_id
        finished = own and trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
        client.set_tag(run.info.run_id, "lab.end", f"closed by lab: its trial ended {trial.state.name if own else 'without it'}")
        client.set_terminated(run.info.run_id, "FINISHED" if finished else "FAILED")
        ended += 1
    return ended


def update_best(client: MlflowClient, run_id: str, study: optuna.Study, attempts: int = 3) -> None:
    """The parent run's best-so-far. Workers finishing together write the same tags, and MLflow's SQL store
    inserts a new tag after looking for it, so one of two racing writes fails (UNIQUE constraint): try again,
    and at worst leave it to the next trial or the summary."""
    for attempt in range(1, attempts + 1):
        try:
            return _write_best(client, run_id, study)
        except MlflowException as err:
            if attempt == attempts:
                log.warning("best-so-far of parent run %s not updated: %s", run_id, str(err).splitlines()[0])
            time.sleep(0.2 * attempt)


def _write_best(client: MlflowClient, run_id: str, study: optuna.Study) -> None:
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    counts = budget.counts(trials)  # a trial cut off and queued again counts once, as its retry
    for metric, key in (("trials_complete", "complete"), ("trials_pruned", "pruned"), ("trials_fail", "failed"),
                        ("trials_retried", "retried")):
        client.log_metric(run_id, metric, counts[key], step=len(trials))
    if not done:
        return
    if len(study.directions) > 1:  # no single best: the front's size and members
        members = ranking.front(study)
        client.log_metric(run_id, "pareto_size", len(members), step=len(trials))
        client.set_tag(run_id, "pareto_size", str(len(members)))
        client.set_tag(run_id, "pareto_trials", json.dumps([t.number for t in members]))
        return
    best = ranking.best(study)
    if best is None:  # every completed trial breaks a constraint
        client.set_tag(run_id, "best_trial", "none feasible")
        return
    client.log_metric(run_id, "best_value", best.value, step=len(trials))
    client.set_tag(run_id, "best_trial", str(best.number))
    client.set_tag(run_id, "best_params", json.dumps(best.params))
    client.set_tag(run_id, "best_value", f"{best.value:.6g}")
    if trial_record.run_id(best):
        client.set_tag(run_id, "best_run_id", trial_record.run_id(best))


def log_summary(client: MlflowClient, run_id: str, study: optuna.Study) -> list[str]:
    """trials.csv and one PNG per Optuna plot on the parent run; returns the names of plots that could not
    be drawn (parameter importances need two completed trials with differing values, for example)."""
    rows = studies.trial_table(study)
    if rows:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        client.log_text(run_id, buf.getvalue(), "trials.csv")
    from lab import figures  # matplotlib (0.4 s of import): only a sweep's parent draws, not every worker

    skipped = []
    for name in figures.plots_for(study):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "experimental" notices on every matplotlib plot
                fig = figures.study_figure(name, study)
        except (ValueError, RuntimeError, ZeroDivisionError) as err:
            log.info("plot %s skipped: %s", name, err)
            skipped.append(name)
            continue
        client.log_figure(run_id, fig, f"plots/{name}.png")
    update_best(client, run_id, study)
    return skipped


def log_best_model(client: MlflowClient, uri: str, sweep: Sweep, study: optuna.Study) -> None:
    """log_models: best: no trial logged its model, so the winner's is logged from its checkpoint as the sweep
    ends (`lab best` would too). A failure is said, not raised: the sweep's results stand without it."""
    best = ranking.best(study) if sweep.spec.log_models == "best" else None
    run_id = ranking.model_run_id(best) if best is not None else None
    if not run_id:
        return
    from lab.train import exported, rebuild  # Lightning's imports, only for this

    if tracking.MODEL_TAG in client.get_run(run_id).data.tags:
        return
    try:
        module, datamodule = rebuild.rebuild(client, run_id, uri)
        exported.log(run_id, module, datamodule, uri)
    except Exception as err:  # noqa: BLE001 - a model that cannot be logged must not fail a finished sweep
        print(f"warning: the best trial's model (trial {best.number}, run {run_id}) was not logged: "
              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}")
        return
    print(f"logged the best trial's model (trial {best.number}) on its run {run_id}")
