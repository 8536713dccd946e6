"""Worker processes on GPU slots (or CPU cores): placement, start, restart after a crash, stop on a signal.

One process per slot, pinned with CUDA_VISIBLE_DEVICES, all sharing one Optuna storage (Optuna's advice
for several GPUs); K slots per GPU pack small trials onto one device.
"""
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lab.data import placing
from lab.errors import LabError
from lab.sweep import liveness

EXIT_HALTED = 3  # a worker that stopped because the sweep's failure limit was reached: done, not crashed
MAX_RESTARTS = 3  # per slot, deaths not explained by a trial: a worker that keeps dying is left dead
STOP_GRACE_S = 20
PARENT_ENV = "LAB_PARENT_PID"  # a pool worker stops when this process is gone


@dataclass
class Slot:
    name: str  # gpu<id>.<k> or cpu<k>
    device: str  # what the worker sees as its device, for the live view
    env: dict[str, str] = field(default_factory=dict)


def parse_gpus(arg: str | None, visible: int) -> list[int]:
    """--gpus: None = every visible GPU; 'none' or '' = CPU only; '0,2' = those ids."""
    if arg is None:
        return list(range(visible))
    if arg.strip().lower() in ("", "none", "cpu"):
        return []
    try:
        ids = [int(x) for x in arg.split(",") if x.strip()]
    except ValueError as err:
        raise LabError(f"--gpus={arg!r} is not valid: give comma-separated GPU ids such as 0,1, or 'none'.") from err
    bad = [i for i in ids if not 0 <= i < visible]
    if bad:
        raise LabError(f"--gpus={arg!r}: GPU id(s) {bad} do not exist; this machine has {visible} visible GPU(s)"
                       f"{' (ids 0..' + str(visible - 1) + ')' if visible else ''}.")
    return sorted(set(ids))


def auto_per_gpu(n_params: int, gpu_memory_bytes: int, data_bytes: int = 0) -> int:
    """Trials to pack per GPU. A small model leaves the GPU launch-bound (docs/design.md: 8 processes on one H100
    gave 6.8x one process for the 0.4M-parameter CNN), so pack until the rough memory estimate of a trial
    (weights + grads + two Adam moments, fp32, times 4 for activations and the CUDA context's share, plus its
    own copy of the dataset on the card) would fill half the card, and never more than 8. Data too large for
    one slot's share is streamed from the host instead (lab.data.placing), and costs the card nothing."""
    per_trial = max(n_params * 4 * 4 * 4, 1 << 30)  # at least 1 GiB: context + workspace
    with_data = per_trial + data_bytes
    if with_data * placing.RESIDENT_FRACTION ** -1 <= gpu_memory_bytes:
        per_trial = with_data
    return int(max(1, min(8, (gpu_memory_bytes // 2) // per_trial)))


def describe_exit(code: int) -> str:
    """A worker's exit code as words: -9 is SIGKILL (the kernel's OOM killer, or kill -9)."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = {"SIGKILL": ": out of memory (the kernel's OOM killer) or kill -9",
                "SIGSEGV": ": a segmentation fault", "SIGABRT": ": aborted"}.get(name, "")
        return f"killed by {name}{hint}"
    return f"exit status {code}"


def placement(gpus: list[int], per_gpu: int, cpu_workers: int, cpu_count: int, threads: int = 0) -> list[Slot]:
    """threads: the user's $LAB_TORCH_THREADS for every worker; 0 gives each worker its share of the cores."""
    if per_gpu < 1:
        raise LabError(f"--workers-per-gpu={per_gpu} is not valid: it must be at least 1 (or 'auto').")
    if gpus:
        n = len(gpus) * per_gpu
        share = str(threads or max(1, cpu_count // n))
        return [Slot(f"gpu{g}.{k}", f"cuda:{g}", {"CUDA_VISIBLE_DEVICES": str(g), "LAB_TORCH_THREADS": share,
                                                        placing.SLOTS_ENV: str(per_gpu)})
                for g in gpus for k in range(per_gpu)]
    if cpu_workers < 1:
        raise LabError(f"--workers={cpu_workers} is not valid: it must be at least 1.")
    share = str(threads or max(1, cpu_count // cpu_workers))
    return [Slot(f"cpu{k}", "cpu", {"CUDA_VISIBLE_DEVICES": "", "LAB_TORCH_THREADS": share})
            for k in range(cpu_workers)]


class Pool:
    """Starts `lab worker` processes, restarts crashed ones, and stops them all on request."""

    def __init__(self, slots: list[Slot], worker_args: list[str], log_dir: Path, env: dict[str, str] | None = None):
        self.slots, self.worker_args, self.log_dir = slots, worker_args, log_dir
        self.env = {**os.environ, **(env or {})}  # taken once: what this pool's workers see besides their slot's
        self.procs: dict[str, subprocess.Popen] = {}
        self.restarts = {s.name: 0 for s in slots}
        self.finished: set[str] = set()  # slots whose worker exited 0 (the budget is spent) or gave up
        self.dead: set[str] = set()  # crashed, not yet restarted

    def _start(self, slot: Slot) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        beat = self.beat_file(slot.name)
        beat.unlink(missing_ok=True)  # a new process: its silence counts from its own first beat
        env = {**self.env, **slot.env, "PYTHONUNBUFFERED": "1", liveness.ENV: str(beat),
               PARENT_ENV: str(os.getpid())}
        cmd = [sys.executable, "-m", "lab.cli", "worker", *self.worker_args, "--worker-id", slot.name]
        # Own session: a Ctrl-C in the terminal reaches the parent only, which stops workers in order.
        with open(self.log_dir / f"{slot.name}.log", "a") as log:  # the worker holds its own copy
            self.procs[slot.name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def start(self) -> None:
        for slot in self.slots:
            self._start(slot)

    def poll(self) -> dict[str, tuple[int, int]]:
        """{slot name: (exit code, pid)} of the workers that crashed since the last poll; each waits for
        restart()."""
        crashed = {}
        for slot in self.slots:
            proc = self.procs.get(slot.name)
            if proc is None or slot.name in self.finished or slot.name in self.dead:
                continue
            code = proc.poll()
            if code is None:
                continue
            if code in (0, EXIT_HALTED):
                self.finished.add(slot.name)
                continue
            crashed[slot.name] = (code, proc.pid)
            self.dead.add(slot.name)
        return crashed

    def restart(self, name: str, charged: bool = True) -> bool:
        """Start a crashed slot's worker again. charged=False: the death is blamed on the trial it ran (whose
        retries are limited on their own), so the slot stays alive for other trials. Returns whether it did."""
        self.dead.discard(name)
        if charged:
            if self.restarts[name] >= MAX_RESTARTS:
                self.finished.add(name)
                return False
            self.restarts[name] += 1
        self._start(next(s for s in self.slots if s.name == name))
        return True

    def beat_file(self, name: str) -> Path:
        return self.log_dir / f"{name}.beat"

    def kill_hung(self, grace_s: float) -> dict[str, float]:
        """SIGKILL (it works on a stopped process too) every worker silent for grace_s seconds; returns
        {slot name: seconds silent}. poll() then reports them as crashed."""
        hung = {}
        for name, proc in self.procs.items():
            quiet = liveness.quiet_for(self.beat_file(name))
            if proc.poll() is None and quiet > grace_s:
                proc.kill()
                proc.wait()
                hung[name] = quiet
        return hung

    @property
    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs.values())

    def alive(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def stop(self, grace_s: float = STOP_GRACE_S, sig: int = signal.SIGTERM) -> None:
        """sig (the one the sweep got, so a trial's record says what happened) to every worker (each marks its
        trial and ends its MLflow run KILLED), SIGKILL after grace."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(sig)
        end = time.time() + grace_s
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, end - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
