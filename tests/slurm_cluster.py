"""A real single-node SLURM cluster on this machine, from Debian's `slurm-wlm` and `munge` (.ci/run installs them).

Everything lives in one state folder (its own munge key and socket, slurm.conf, spool, logs, pid files), so the
system's /etc/slurm and /etc/munge stay untouched; clients find it through SLURM_CONF. start() first stops what an
earlier session may have left running from the same folder, so a second session starts cleanly; stop() ends the
daemons and cancels every job. The node advertises this machine's real CPUs and memory.

Besides the real node, a partition `wide` also names a node `ghost` that never comes up: a partition of two
nodes, for the check that refuses storage which several nodes could not share.

    python tests/slurm_cluster.py start    # prints `export SLURM_CONF=...`
    python tests/slurm_cluster.py stop
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

STATE = Path(os.environ.get("LAB_SLURM_STATE", "/tmp/lab-slurm"))
BINARIES = ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "scancel", "sinfo")
PORTS = (6817, 6818)  # slurmctld, slurmd (SLURM's own defaults)
UP_TIMEOUT_S = 60


def missing() -> list[str]:
    """The binaries this cluster needs that are not installed."""
    return [name for name in BINARIES if shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin") is None]


def conf_path() -> Path:
    return STATE / "slurm.conf"


def env() -> dict[str, str]:
    """What a client command (sbatch, squeue, lab) needs to reach this cluster."""
    return {"SLURM_CONF": str(conf_path())}


def _exe(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin") or name


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 - 512  # leave the OS some (SLURM refuses a node with less)
    return 1024


def _conf(host: str) -> str:
    s = STATE
    return f"""ClusterName=lab
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={PORTS[0]}
SlurmdPort={PORTS[1]}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={s}/munge.socket
StateSaveLocation={s}/ctld
SlurmdSpoolDir={s}/d
SlurmctldPidFile={s}/slurmctld.pid
SlurmdPidFile={s}/slurmd.pid
SlurmctldLogFile={s}/slurmctld.log
SlurmdLogFile={s}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait=30
MinJobAge=300
SlurmdTimeout=60
InactiveLimit=0
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} RealMemory={_memory_mb()} State=UNKNOWN
NodeName=ghost NodeAddr=127.0.0.2 CPUs=1 State=DOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
PartitionName=wide Nodes={host},ghost MaxTime=INFINITE State=UP
"""


def _pid(name: str) -> int | None:
    try:
        pid = int((STATE / f"{name}.pid").read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return None
    return pid if name.encode() in cmdline else None  # a recycled pid is someone else's process


def _end(name: str, timeout: float = 15) -> None:
    pid = _pid(name)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    end = time.time() + timeout
    while time.time() < end and _pid(name) == pid:
        time.sleep(0.2)
    if _pid(name) == pid:
        os.kill(pid, signal.SIGKILL)


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([_exe(cmd[0]), *cmd[1:]], env={**os.environ, **env()}, capture_output=True, text=True,
                          timeout=60)
    if check and done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()}")
    return done


def stop() -> None:
    """Cancel every job of this cluster and end its daemons (those started from STATE only)."""
    if _pid("slurmctld"):
        _run("scancel", "--full", "--user", str(os.getuid()), check=False)
        _run("scancel", "--user", str(os.getuid()), check=False)
    for name in ("slurmd", "slurmctld", "munged"):
        _end(name)
    # What a job of this cluster left running when slurmd went (slurmstepd, the job's own processes): nothing may
    # keep running after the session. Only processes of jobs, not a shell that merely exported SLURM_CONF.
    ours = f"SLURM_CONF={conf_path()}".encode()
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0") if proc.name.isdigit() else []
            cmdline = (proc / "cmdline").read_bytes() if environ else b""
        except OSError:
            continue
        job = any(v.startswith(b"SLURM_JOB_ID=") for v in environ) or cmdline.startswith(b"slurmstepd")
        if ours in environ and job and int(proc.name) != os.getpid():
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                pass


def start() -> dict[str, str]:
    """A fresh cluster with its node idle; returns env(). Stops an earlier session's daemons first."""
    if os.geteuid() != 0:
        raise RuntimeError("this test cluster runs SLURM as root (SlurmUser=root): run the tests as root")
    stop()
    for name in ("ctld", "d"):
        shutil.rmtree(STATE / name, ignore_errors=True)
    STATE.mkdir(parents=True, exist_ok=True)
    STATE.chmod(0o755)  # munged: its socket's folder must be searchable by all
    for name in ("ctld", "d"):
        (STATE / name).mkdir()
    key = STATE / "munge.key"
    if not key.is_file():
        key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    conf_path().write_text(_conf(host))
    for port in PORTS:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                raise RuntimeError(f"port {port} is taken by another process: is another SLURM running here?")
    _run("munged", f"--key-file={key}", f"--socket={STATE}/munge.socket", f"--pid-file={STATE}/munged.pid",
         f"--log-file={STATE}/munged.log", f"--seed-file={STATE}/munged.seed")
    _run("slurmctld", "-f", str(conf_path()))
    _run("slurmd", "-f", str(conf_path()))
    end = time.time() + UP_TIMEOUT_S
    state = ""
    while time.time() < end:
        state = _run("sinfo", "-h", "-n", host, "-o", "%T", check=False).stdout.strip()
        if state.startswith("idle"):
            return env()
        time.sleep(0.5)
    logs = "".join((STATE / f).read_text()[-2000:] for f in ("slurmctld.log", "slurmd.log") if (STATE / f).is_file())
    stop()
    raise RuntimeError(f"the SLURM node did not come up idle within {UP_TIMEOUT_S} s (state {state!r}):\n{logs}")


if __name__ == "__main__":
    if sys.argv[1:] == ["start"]:
        print(f"export SLURM_CONF={start()['SLURM_CONF']}")
    elif sys.argv[1:] == ["stop"]:
        stop()
    else:
        sys.exit("usage: python tests/slurm_cluster.py start|stop")
