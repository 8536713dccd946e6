"""The terminal view of a running sweep: counts, best so far, one line per worker. Redrawn in place on a
terminal; elsewhere (logs, CI) a line is printed only when something changed."""
import json
import shutil
import sys
import time

import optuna
from optuna.trial import TrialState

from lab.sweep import budget, ranking, seeds
from lab.sweep import stop as stop_rules
from lab.sweep.pool import Pool
from lab.sweep.spec import Sweep


def lines(sweep: Sweep, study: optuna.Study, pool: Pool, started: float) -> list[str]:
    trials = study.get_trials(deepcopy=False)
    n = budget.counts(trials)  # a trial cut off and queued again counts once, as its retry
    elapsed = time.strftime("%H:%M:%S", time.gmtime(time.time() - started))
    out = [f"{sweep.spec.study}  complete {n['complete']}  running {n['running']}  pruned {n['pruned']}"
           f"  failed {n['failed']}" + (f"  queued again {n['retried']}" if n["retried"] else "")
           + (f"  stopped after fewer seeds {cut}" if (cut := sum(seeds.PRUNED in t.user_attrs for t in trials)) else "")
           + f"  of {sweep.spec.n_trials}  [{elapsed}]"]
    if n["complete"] and len(study.directions) > 1:
        out.append(f"Pareto front: trials {[t.number for t in ranking.front(study)]}")
    elif n["complete"] and ranking.best(study) is not None:  # None: no trial meets the constraints yet
        best = ranking.best(study)
        out.append(f"best {sweep.spec.metric}={best.value:.4f} (trial {best.number}) {json.dumps(best.params)}")
    why = stop_rules.reason(sweep.spec.stop, sweep.spec.metric, study)
    if why:
        out.append(f"stopping: {why}; running trials finish, no new ones start")
    running = {t.user_attrs.get("worker"): t for t in trials if t.state == TrialState.RUNNING}
    for slot in pool.slots:
        trial = running.get(slot.name)
        if trial is not None:
            step = max(trial.intermediate_values, default=None)  # an epoch, or with seeds: K a seed index
            if sweep.spec.seeds > 1:
                where = f"trial {trial.number} seed {len(trial.intermediate_values) + 1}/{sweep.spec.seeds}"
            else:
                where = f"trial {trial.number}" + (f" epoch {step + 1}" if step is not None else "")
        else:
            where = "running" if pool.alive(slot.name) else "done"
        out.append(f"  {slot.name:<8} {slot.device:<7} {where}")
    return out


SAID = ("best", "stopping", "tracking server")  # the lines a log gets besides the counts, each time they change


def fitted(text: list[str], columns: int, rows: int) -> tuple[list[str], int]:
    """(the lines to draw, the terminal rows they take): a line longer than the terminal is as wide takes
    more than one row, and what does not fit above the cursor's row becomes one '... N more' line: the
    cursor cannot move back up into the scrollback to redraw it."""
    need = [max(1, -(-len(line) // columns)) for line in text]
    if sum(need) < rows:
        return text, sum(need)
    kept, used = [], 1  # a row for the '... N more' line
    for line, n in zip(text, need):
        if used + n >= rows:
            break
        kept.append(line)
        used += n
    return [*kept, f"... {len(text) - len(kept)} more lines: a taller terminal shows them"[:columns]], used


class LiveView:
    """notes(): lines shown below the rest while they last (reachability.TrackingWatch.notes)."""

    def __init__(self, stream=sys.stdout, live: bool | None = None, notes=list):
        self.stream = stream
        self.live = stream.isatty() if live is None else live
        self.notes = notes
        self.shown = 0
        self.last: list[str] = []

    def show(self, text: list[str]) -> None:
        text = [*text, *self.notes()]
        if self.live:
            up = f"\x1b[{self.shown}F\x1b[J" if self.shown else ""  # to the first row drawn, clear to the end
            drawn, self.shown = fitted(text, *shutil.get_terminal_size())
            self.stream.write(up + "\n".join(drawn) + "\n")
        elif self.changed(text):
            said = [line for line in text[1:] if line.startswith(SAID)]
            self.stream.write("  ".join([text[0], *said]) + "\n")
        self.stream.flush()
        self.last = text

    def changed(self, text: list[str]) -> bool:
        counts = lambda t: t[0].rsplit("  [", 1)[0] if t else ""  # noqa: E731 - the first line less its clock
        best = lambda t: [line for line in t[1:] if line.startswith(SAID)]  # noqa: E731
        return counts(text) != counts(self.last) or best(text) != best(self.last)
