"""The LAB_* environment variables: what each means, its check, and its value. Every reader goes through get(),
and check() runs before a command creates anything (an output folder, a study, an MLflow run), so that a bad
value is one sentence, not a traceback after a parent run was left RUNNING."""
import os
from dataclasses import dataclass
from pathlib import Path

from lab.errors import LabError

MIN_GRACE_S = 5  # a pool worker's pulse touches its beat file every 2 s (sweep/liveness.py): leave a margin


@dataclass(frozen=True)
class Setting:
    name: str
    meaning: str  # what the value is, for the sentence that refuses a bad one
    kind: str  # "whole", "seconds" (a number), "folder", "file"
    minimum: float | None = None
    default: object = None


SETTINGS = {s.name: s for s in (
    Setting("LAB_CONF_DIR", "your own config folder (holding data/, model/... or a whole tree with train.yaml)",
            "folder"),
    Setting("LAB_TORCH_THREADS", "the CPU threads torch uses for training (0: torch's default)", "whole", 0, 0),
    Setting("LAB_HEARTBEAT_S", "seconds between a database-stored trial's Optuna heartbeats", "whole", 1, 30),
    Setting("LAB_GRACE_S", "seconds without a sign of life after which a sweep worker counts as hung and its "
            "trial is retried", "whole", MIN_GRACE_S, 120),
    Setting("LAB_STORAGE_OUTAGE_S", "seconds a sweep waits for an unreachable Optuna database before it gives up "
            "(0: at once)", "seconds", 0, 600),
    # Set by `lab sweep` for the workers it starts; checked all the same (a shell may carry a stale one).
    Setting("LAB_PARENT_PID", "the process id of the `lab sweep` that started this worker", "whole", 1),
    Setting("LAB_BEAT_FILE", "the file a pool worker touches as its sign of life", "file"),
    Setting("LAB_GPU_SLOTS", "how many sweep workers share this worker's GPU (lab.data.placing)", "whole", 1, 1),
)}


def _parse(s: Setting, text: str):
    if s.kind in ("whole", "seconds"):
        try:
            value = int(text) if s.kind == "whole" else float(text)
        except ValueError:
            return None
        if value != value or value in (float("inf"), float("-inf")):  # nan, inf
            return None
        return value if s.minimum is None or value >= s.minimum else None
    path = Path(text).expanduser()
    if s.kind == "folder":
        return path.resolve() if path.is_dir() or not path.exists() else None  # `lab best` creates it
    return path if path.parent.is_dir() else None


def valid(s: Setting) -> str:
    if s.kind == "whole":
        what = f"a whole number >= {s.minimum:g}"
    elif s.kind == "seconds":
        what = f"a number of seconds >= {s.minimum:g}"
    elif s.kind == "folder":
        what = "a folder (or the path of one to create), not a file"
    else:
        what = "a file path whose folder exists"
    return what + (f" (default {s.default})" if s.default is not None else "")


def refuse(s: Setting, text: str) -> LabError:
    return LabError(f"{s.name}={text} is not valid: it is {s.meaning}, and must be {valid(s)}; set a valid value "
                    "or unset it.")


def get(name: str):
    """The variable's value, parsed (its default when unset or empty); a bad value raises check()'s LabError."""
    s = SETTINGS[name]
    text = os.environ.get(name, "").strip()
    if not text:
        return s.default
    value = _parse(s, text)
    if value is None:
        raise refuse(s, text)
    return value


def check() -> None:
    """Every LAB_* variable lab reads, each refused in one sentence; and the ones that must agree."""
    for name in SETTINGS:
        get(name)
    grace, beat = get("LAB_GRACE_S"), get("LAB_HEARTBEAT_S")
    if grace < 2 * beat and os.environ.get("LAB_HEARTBEAT_S", "").strip():
        # Both given: on PostgreSQL every trial would be taken for dead between two of its own heartbeats.
        raise LabError(f"LAB_GRACE_S={grace} is not valid with LAB_HEARTBEAT_S={beat}: the grace period must be at "
                       "least twice the heartbeat interval, or a trial on a database storage is taken for dead "
                       "between two heartbeats.")


def rdb_timing() -> dict[str, int]:
    """Optuna RDBStorage's heartbeat_interval and grace_period. A grace below twice the heartbeat (LAB_GRACE_S set
    alone, for a pool's hang detection) would fail live trials: the heartbeat is shortened to fit it."""
    grace, beat = get("LAB_GRACE_S"), get("LAB_HEARTBEAT_S")
    return {"heartbeat_interval": min(beat, max(1, grace // 2)), "grace_period": grace}
