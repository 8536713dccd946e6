"""A pool worker's sign of life: a file whose modification time the parent reads.

Optuna's heartbeats exist only on RDB storage, and they say nothing about a process that is alive but
stuck. Here a thread touches <workers>/<slot>.beat every EVERY_S seconds; while a trial trains, only if a
batch ended within the grace period. So a stopped process (SIGSTOP, a frozen host) and a training loop stuck
on a data read both go quiet, and the parent kills the worker and retries its trial. Outside training
(imports, data setup, MLflow logging) the beat goes on unconditionally: slow is not hung.
"""
import os
import threading
import time
from pathlib import Path

from lab import settings

ENV = "LAB_BEAT_FILE"  # set by the pool for each worker it starts
EVERY_S = 2.0


def grace_s() -> float:
    """Seconds without a sign of life after which a worker counts as hung (as RDB heartbeats: LAB_GRACE_S)."""
    return float(settings.get("LAB_GRACE_S"))


class Pulse:
    def __init__(self, path: Path, every_s: float = EVERY_S):
        self.path, self.every_s, self.grace = path, every_s, grace_s()
        self.training = False
        self.progress = time.monotonic()
        self.path.touch()
        threading.Thread(target=self._beat, name="lab-pulse", daemon=True).start()

    def _beat(self) -> None:
        while True:
            if not self.training or time.monotonic() - self.progress < self.grace:
                try:
                    os.utime(self.path)
                except OSError:
                    self.path.touch()
            time.sleep(self.every_s)


current: Pulse | None = None


def start() -> None:
    """In a worker process the pool started: beat until the process ends."""
    global current
    path = os.environ.get(ENV)
    if path and current is None:
        current = Pulse(Path(path))


def training(on: bool) -> None:
    """on: from here a trial must get through batches to count as alive; off: between trials, or testing done."""
    if current is not None:
        current.training, current.progress = on, time.monotonic()


def progressed() -> None:
    if current is not None:
        current.progress = time.monotonic()


def quiet_for(path: Path) -> float:
    """Seconds since the worker at this beat file last gave a sign of life (0 when it has not written one yet)."""
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except FileNotFoundError:
        return 0.0
