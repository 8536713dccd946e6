"""The launcher settings (conf/launcher/slurm.yaml <- the sweep file's `launcher:` <- `launcher.KEY=VALUE` on the
command line) and what must hold before an array is submitted: SLURM's commands present, the partition known,
and storage that every node of the partition can reach."""
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lab import config
from lab.errors import LabError, close_matches
from lab.uris import is_rdb, mask_password, sqlite_path

PREFIX = "launcher."  # command-line overrides that set the launcher, not the trials
COMMANDS = ("sbatch", "squeue", "scancel", "sinfo")
# Folders that are each node's own by convention (and RAM file systems): a journal there is not shared.
NODE_LOCAL = (Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"), Path("/run"))
STOP_SIGNALS = ("TERM", "INT", "USR1", "USR2", "HUP")  # ones a worker can catch; SIGKILL would lose the trial


@dataclass
class Settings:
    partition: str | None
    time_min: int
    cpus_per_task: int
    gpus_per_task: int
    mem_gb: float | None
    account: str | None
    qos: str | None
    signal: str
    signal_delay_s: int
    array_parallelism: int | None
    sbatch_lines: list[str]
    setup: list[str]


def defaults_file() -> Path:
    return config.conf_dir() / "launcher" / "slurm.yaml"


def take_overrides(args) -> list[str] | None:
    """With --launcher slurm: the launcher.KEY=VALUE overrides, taken out of args.overrides (the rest are the
    trials'); None for the local pool, which refuses them and --detach. Refuses local-pool options with slurm."""
    overrides = getattr(args, "overrides", None) or []
    ours = [o for o in overrides if o.startswith(PREFIX)]
    args.overrides = [o for o in overrides if not o.startswith(PREFIX)]
    if getattr(args, "launcher", "local") != "slurm":
        given = ours[:1] or (["--detach"] if getattr(args, "detach", False) else [])
        if given:
            raise LabError(f"{given[0]} is an option of --launcher slurm; this sweep runs on the local pool "
                           "(--launcher local). Add --launcher slurm, or leave it out.")
        return None
    for option, value in (("--gpus", args.gpus), ("--workers-per-gpu", args.workers_per_gpu != "1" or None)):
        if value is not None:
            raise LabError(f"{option} places workers on this machine's GPUs; with --launcher slurm each array "
                           "task asks SLURM for its own: use launcher.gpus_per_task=N (and --workers for the tasks).")
    if args.workers is not None and args.workers < 1:
        raise LabError(f"--workers={args.workers} is not valid: give the number of SLURM array tasks, 1 or more.")
    return ours


def load(block: dict, overrides: list[str], where: str) -> Settings:
    """The shipped defaults, the sweep file's `launcher:` block (from WHERE), then the command line's."""
    base = OmegaConf.load(defaults_file())
    OmegaConf.set_struct(base, True)
    layers = [(block or {}, f"{where}: launcher")]
    for item in overrides:
        key, eq, value = item.removeprefix(PREFIX).partition("=")
        if not eq:
            raise LabError(f"{item} is not valid: give launcher.KEY=VALUE, e.g. launcher.partition=gpu.")
        layers.append((OmegaConf.from_dotlist([f"{key}={value}"]), "launcher"))
    for layer, what in layers:
        for key in layer:
            if key not in base:
                close = close_matches(str(key), list(base), n=1)
                raise LabError(f"{what}.{key} is not a launcher setting." + (f" Did you mean {close[0]}?" if close else "")
                               + f" Valid: {', '.join(base)}.")
        try:
            base = OmegaConf.merge(base, layer)
        except OmegaConfBaseException as err:
            raise LabError(f"{what}: {str(err).splitlines()[0]}") from err
    settings = Settings(**OmegaConf.to_container(base, resolve=True))
    check(settings)
    return settings


def check(s: Settings) -> None:
    def whole(name: str, low: int) -> None:
        value = getattr(s, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise LabError(f"launcher.{name}={value!r} is not valid: give a whole number, {low} or more.")

    for name, low in (("time_min", 1), ("cpus_per_task", 1), ("gpus_per_task", 0), ("signal_delay_s", 0)):
        whole(name, low)
    if s.array_parallelism is not None:
        whole("array_parallelism", 1)
    if s.mem_gb is not None and (isinstance(s.mem_gb, bool) or not isinstance(s.mem_gb, (int, float)) or s.mem_gb <= 0):
        raise LabError(f"launcher.mem_gb={s.mem_gb!r} is not valid: give the memory per task in GB, or null.")
    name = str(s.signal).upper().removeprefix("SIG")
    if name not in STOP_SIGNALS:
        raise LabError(f"launcher.signal={s.signal!r} is not valid: choose one of {', '.join(STOP_SIGNALS)} (a signal "
                       "the worker catches to mark its trial before the time limit).")
    s.signal = name
    if s.signal_delay_s >= s.time_min * 60:
        raise LabError(f"launcher.signal_delay_s={s.signal_delay_s} is not valid: it must be shorter than the time "
                       f"limit (launcher.time_min={s.time_min} minutes = {s.time_min * 60} s).")
    for line in s.sbatch_lines:
        if not str(line).startswith("--"):
            raise LabError(f"launcher.sbatch_lines: {line!r} is not valid: give sbatch options such as "
                           "--constraint=a100 or --exclusive.")


def sbatch_options(s: Settings) -> dict[str, str | bool]:
    """sbatch_lines as submitit's additional parameters ({"constraint": "a100", "exclusive": True})."""
    out: dict[str, str | bool] = {}
    for line in s.sbatch_lines:
        key, eq, value = str(line)[2:].partition("=")
        out[key.replace("-", "_")] = value if eq else True
    return out


def run(*cmd: str) -> str:
    """A SLURM client command's output; its own words when it fails."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as err:
        raise LabError(f"`{' '.join(cmd)}` did not answer within 60 s: is slurmctld reachable?") from err
    if done.returncode:
        raise LabError(f"`{' '.join(cmd)}` failed (exit status {done.returncode}): "
                       f"{(done.stderr or done.stdout).strip() or 'no message'}")
    return done.stdout


def nodes(partition: str | None) -> list[str]:
    """The nodes the array's tasks may run on: those of the partition (the default one when None)."""
    missing = [c for c in COMMANDS if shutil.which(c) is None]
    if missing:
        raise LabError(f"--launcher slurm needs SLURM's commands, and these are not on the PATH: {', '.join(missing)}; "
                       "run `lab sweep` on the cluster's login node, or use --launcher local.")
    listed = run("sinfo", "-h", "-o", "%R %P")
    names = {line.split()[0]: line.split()[1].endswith("*") for line in listed.splitlines() if line.strip()}
    if partition is None:
        partition = next((p for p, default in names.items() if default), None)
        if partition is None:
            raise LabError("this cluster has no default partition: set launcher.partition=NAME, one of "
                           f"{', '.join(names)}.")
    elif partition not in names:
        raise LabError(f"launcher.partition={partition} is not a partition of this cluster: choose one of "
                       f"{', '.join(names) or '(none listed by sinfo)'}.")
    return sorted(set(run("sinfo", "-h", "-N", "-p", partition, "-o", "%N").split()))


def node_local(path: Path) -> bool:
    path = path.resolve()
    return any(path == d or d in path.parents for d in NODE_LOCAL)


def check_storage(storage: str, out_dir: Path, tracking_uri: str, hosts: list[str], partition: str | None) -> None:
    """Storage every node can reach: an RDB server, or a journal (and --out) on a shared file system. A single
    node shares everything with itself, so there anything goes."""
    if len(hosts) < 2:
        return
    where = f"the {len(hosts)} nodes of partition {partition or '(default)'}"
    db = sqlite_path(storage)
    if db is not None:
        raise LabError(f"--storage {mask_password(storage)} is SQLite, whose file locks do not hold across {where}: "
                       "use a postgresql:// URL, or a journal file on a shared file system.")
    if not is_rdb(storage) and node_local(Path(storage)):
        raise LabError(f"the study's journal {storage} is in a folder each node has its own of, so {where} could not "
                       "share it: put --out (or --storage) on a shared file system such as your NFS home, or use a "
                       "postgresql:// URL.")
    if node_local(out_dir):
        raise LabError(f"--out {out_dir} is in a folder each node has its own of: a retried trial on another node "
                       "would not find its checkpoints; put --out on a shared file system.")
    tracked = sqlite_path(tracking_uri)
    if tracked is not None:
        raise LabError(f"MLFLOW_TRACKING_URI={mask_password(tracking_uri)} is a SQLite file, which {where} cannot "
                       "write safely: start `lab server` and set MLFLOW_TRACKING_URI=http://HOST:PORT.")
