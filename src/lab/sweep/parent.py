"""What a sweep's parent does around its workers, whatever launches them (a local pool, commands.py, or a SLURM
array, slurm/follow.py): reap the trials of workers that died, say each new failure once, and finish: the
parent run's summary and status, the best trial, and the exit status that says how the sweep ended."""
import sys

import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from lab.errors import DISK_FULL, says_disk_full
from lab.sweep import budget, outcome, records, spec
from lab.sweep import stop as stop_rules
from lab.sweep import study as studies

EXIT_INTERRUPTED = 130
POLL_S = 1.0  # how often the parent looks at its workers and the study


def reap(study: optuna.Study, sweep: spec.Sweep, uri: str, storage: str,
         dead_pid_reason: str | None = None) -> list[optuna.trial.FrozenTrial]:
    abandon = records.abandoner(uri, sweep.spec.max_retries)
    with budget.budget_lock(storage, sweep.spec.study):
        return budget.reap(study, storage, lambda trial, why: abandon(study, trial, why), dead_pid_reason)


def blamed_trial(study: optuna.Study, pid: int) -> optuna.trial.FrozenTrial | None:
    """The trial a dead worker process was running when it died (reaped by now, by us or another worker)."""
    mine = budget.trials_of_process(study, pid)
    if mine and (mine[-1].state == TrialState.RUNNING or "died" in mine[-1].user_attrs.get("fail_reason", "")):
        return mine[-1]
    return None


class Failures:
    """Prints each new reason for a failed trial once, as soon as it is seen."""

    def __init__(self, study: optuna.Study):
        self.seen = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
        self.reasons: set[str] = set()

    def report(self, study: optuna.Study) -> None:
        trials = study.get_trials(deepcopy=False)
        again = budget.retried(trials)
        for t in trials:
            if t.state != TrialState.FAIL or t.number in self.seen or t.number in again:
                continue
            self.seen.add(t.number)
            reason = budget.fail_reason(t)
            if reason not in self.reasons:
                self.reasons.add(reason)
                print(f"trial {t.number} failed: {reason}", flush=True)


def finish(sweep, study, parent: str, uri: str, interrupted, streak, deadline) -> None:
    """The parent run's summary and status, the best trial, and the exit status that says how it ended."""
    client = MlflowClient(uri)
    records.end_orphaned_runs(client, parent, study)
    skipped = records.log_summary(client, parent, study)
    if not interrupted:
        records.log_best_model(client, uri, sweep, study)
    used = budget.used_budget(study)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    why = None if interrupted or streak else stop_rules.reason(sweep.spec.stop, sweep.spec.metric, study)
    ended = budget.done(sweep, study, studies.make_sampler(sweep)) or deadline is not None or why is not None
    outcome.record_stop(client, parent, study, why)
    if interrupted:
        status = "KILLED"
    else:
        status = "FINISHED" if ended and complete and not streak else "FAILED"
    client.set_terminated(parent, status)
    if skipped and complete:
        print(f"plots not drawn yet (need more completed trials): {', '.join(skipped)}")
    outcome.print_best(sweep, study)
    if why:
        print(f"stopped: {why} ({used}/{sweep.spec.n_trials} trials used).")
    if interrupted:
        print(f"interrupted: run the same command again to resume ({used}/{sweep.spec.n_trials} trials used).")
        sys.exit(EXIT_INTERRUPTED)
    launch = study.user_attrs.get(studies.LAUNCH_ATTR, -1)
    if status == "FAILED" and any(says_disk_full(budget.fail_reason(t)) for t in
                                  study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number > launch):
        print(f"lab: error: {DISK_FULL.format(where='')}", file=sys.stderr)
    if streak:
        reasons = sorted({budget.fail_reason(t) for t in streak})
        print(f"stopped: {len(streak)} trials in a row failed (max_failures={sweep.spec.max_failures}), "
              f"{used}/{sweep.spec.n_trials} trials used. Reason(s):", file=sys.stderr)
        for reason in reasons:
            print(f"  - {reason}", file=sys.stderr)
        print("Fix the cause and run the same command again: failed trials do not use up n_trials.",
              file=sys.stderr)
        sys.exit(1)
    if not complete:
        print(f"no trial finished ({used}/{sweep.spec.n_trials} trials used); see the reasons above and the "
              "worker logs.", file=sys.stderr)
        sys.exit(1)
    if status == "FAILED":
        print(f"workers stopped before the budget was spent ({used}/{sweep.spec.n_trials}); see their logs.",
              file=sys.stderr)
        sys.exit(1)
