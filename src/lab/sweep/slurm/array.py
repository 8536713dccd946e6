"""The worker array on the cluster: submitted through submitit's AutoExecutor, watched with squeue, cancelled
with scancel; and Task, what each array task runs (`lab worker` on the sweep's study).

Task states come from `squeue --states=all`, which lists a task until MinJobAge (300 s by default) after it ended;
submitit's own watcher reads sacct, which needs SLURM's accounting database (slurmdbd) that many clusters, and
Debian's plain slurm-wlm, do not run. A task squeue no longer lists has ended.
"""
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lab.errors import LabError
from lab.sweep import liveness, pool
from lab.sweep.slurm.settings import Settings, run, sbatch_options

PENDING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED"}
RUNNING = {"RUNNING", "CONFIGURING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING", "STOPPED"}
ENDED = "ENDED"  # no longer listed by squeue


def task_name(array_id: str, index: str | int) -> str:
    """The worker id of array task INDEX (what trials record as their worker, and the name of its beat file)."""
    return f"slurm{array_id}_{index}"


@dataclass
class Task:
    """What an array task runs: `lab worker` as a child process, exactly as the local pool starts it, with this
    task's name, its share of threads and a beat file the parent watches. Signals: SLURM sends its own (scancel's
    SIGTERM, the configured one before the time limit) to every process of the task, the child included. The
    child handles SIGTERM itself; another stop signal is ignored by the child and turned into SIGTERM for it
    here, since the child's only other choice would be to die of it without marking its trial."""

    argv: list[str]
    env: dict[str, str]
    log_dir: str
    stop: str = "TERM"
    follow: bool = True  # a parent in the foreground closes the sweep; else (--detach) the last worker does

    def __call__(self, index: int) -> int:
        name = task_name(os.environ.get("SLURM_ARRAY_JOB_ID", "0"), os.environ.get("SLURM_ARRAY_TASK_ID", index))
        beat = Path(self.log_dir) / f"{name}.beat"
        beat.unlink(missing_ok=True)  # a requeued task: its silence counts from its own first beat
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1", liveness.ENV: str(beat),
               "LAB_TORCH_THREADS": os.environ.get("SLURM_CPUS_PER_TASK", "1")}
        if self.follow:  # the child stops when this process goes, and leaves closing the sweep to the parent
            env[pool.PARENT_ENV] = str(os.getpid())
        sig = signal.Signals[f"SIG{self.stop}"]
        if sig != signal.SIGTERM:
            signal.signal(sig, signal.SIG_IGN)  # inherited by the child across exec
        child = subprocess.Popen([sys.executable, "-m", "lab.cli", "worker", *self.argv, "--worker-id", name], env=env)
        if sig != signal.SIGTERM:
            signal.signal(sig, lambda *_: child.send_signal(signal.SIGTERM))
        code = child.wait()
        if code not in (0, pool.EXIT_HALTED):
            sys.exit(code if code > 0 else 128 - code)  # SLURM records the task FAILED, with the worker's status
        return code


@dataclass
class Array:
    """The tasks this launch submitted (one array, and any submitted again after all had ended)."""

    settings: Settings
    hosts: list[str]
    folder: Path  # submitit's scripts and the tasks' logs
    beat_dir: Path
    ids: list[str] = field(default_factory=list)  # array job ids, first the original
    size: int = 0
    states: dict[str, tuple[str, str]] = field(default_factory=dict)  # worker id -> (state, node)

    def submit(self, task: Task, n: int, name: str) -> str:
        import submitit  # here: its imports are not needed to check a sweep

        s = self.settings
        executor = submitit.AutoExecutor(folder=self.folder, cluster="slurm")
        params = {"timeout_min": s.time_min, "cpus_per_task": s.cpus_per_task, "slurm_signal_delay_s": s.signal_delay_s,
                  "name": name, "slurm_setup": list(s.setup), "slurm_stderr_to_stdout": True,
                  "slurm_additional_parameters": {**sbatch_options(s), "signal": f"{s.signal}@{s.signal_delay_s}"}}
        optional = {"slurm_partition": s.partition, "mem_gb": s.mem_gb, "slurm_account": s.account,
                    "slurm_qos": s.qos, "slurm_gpus_per_task": s.gpus_per_task or None,
                    "slurm_array_parallelism": s.array_parallelism}
        executor.update_parameters(**params, **{k: v for k, v in optional.items() if v is not None})
        try:
            jobs = executor.map_array(task, range(n))
        except Exception as err:  # sbatch's refusal (bad account, partition limits) in its words
            raise LabError(f"SLURM refused the worker array: {str(err).strip().splitlines()[-1]}") from err
        array_id = jobs[0].job_id.split("_")[0]
        self.ids.append(array_id)
        self.size += n
        self.states.update({task_name(array_id, i): ("PENDING", "") for i in range(n)})
        return array_id

    def poll(self) -> dict[str, tuple[str, str]]:
        """Every task's (state, node), from one squeue call."""
        listed = run("squeue", "-h", "-r", "--states=all", "-j", ",".join(self.ids), "-o", "%i|%T|%N")
        seen = {}
        for line in listed.splitlines():
            job, state, node = (line.split("|") + ["", ""])[:3]
            if "_" in job and not job.endswith("]"):
                seen[task_name(*job.split("_", 1))] = (state, node)
        for name in self.states:
            self.states[name] = seen.get(name) or ((ENDED, self.states[name][1]) if self.states[name][0] != ENDED
                                                    else self.states[name])
        return dict(self.states)

    def active(self) -> list[str]:
        return [n for n, (state, _) in self.states.items() if state in PENDING | RUNNING]

    def cancel(self, task: str | None = None, sig: str | None = None) -> None:
        """scancel the whole array (SIGTERM to every task, SIGKILL after the cluster's KillWait), or one task."""
        targets = [task.removeprefix("slurm")] if task else self.ids
        if targets:
            run("scancel", *([f"--signal={sig}"] if sig else []), *targets)

    def beat_file(self, name: str) -> Path:
        return self.beat_dir / f"{name}.beat"

    # What the live view asks of a pool.
    @property
    def slots(self) -> list[pool.Slot]:
        return [pool.Slot(name, f"{state.lower()}{' ' + node if node and state in RUNNING else ''}")
                for name, (state, node) in self.states.items()]

    def alive(self, name: str) -> bool:
        return self.states.get(name, (ENDED, ""))[0] in PENDING | RUNNING

    def counts(self) -> str:
        pending = sum(s in PENDING for s, _ in self.states.values())
        running = sum(s in RUNNING for s, _ in self.states.values())
        return f"jobs {','.join(self.ids)}: pending {pending}  running {running}  ended {self.size - pending - running}"
