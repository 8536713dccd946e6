"""Where a dataset's uint8 store lives while training: resident (on the training device, batches gathered there)
or streamed (on the host, gathered one batch ahead and copied). Chosen from measured sizes unless the config
forces it (data.placement)."""
import os
from dataclasses import dataclass

import torch

from lab.errors import LabError

MODES = ("auto", "resident", "stream")
RESIDENT_FRACTION = 0.5  # of the memory measured free: the rest is for weights, activations and other processes
SLOTS_ENV = "LAB_GPU_SLOTS"  # set by the sweep's pool: how many workers share this process's GPU


@dataclass(frozen=True)
class Decision:
    resident: bool
    device: str
    why: str

    @property
    def name(self) -> str:
        return "resident" if self.resident else "stream"


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise LabError(f"data.placement={mode!r} is not valid: use one of {', '.join(MODES)} (auto chooses from the "
                       "data's size and the free memory of the training device).")
    return mode


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (free plus reclaimable page cache), else free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def gpu_slots() -> int:
    try:
        return max(1, int(os.environ.get(SLOTS_ENV, "1")))
    except ValueError:
        return 1


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def decide(mode: str, nbytes: int, device: torch.device, max_gb: float | None = None) -> Decision:
    if mode != "auto":
        return Decision(mode == "resident", str(device), f"data.placement={mode}")
    if max_gb is not None:
        limit, source = max_gb * 1e9, "data.resident_max_gb"
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        slots = gpu_slots()
        limit = RESIDENT_FRACTION * free / slots
        source = f"{RESIDENT_FRACTION:g} x {_gb(free)} free on {device} / {slots} slot(s)"
    else:
        available = host_available_bytes()
        limit, source = RESIDENT_FRACTION * available, f"{RESIDENT_FRACTION:g} x {_gb(available)} host memory available"
    resident = nbytes <= limit
    return Decision(resident, str(device), f"{_gb(nbytes)} of data {'<=' if resident else '>'} {_gb(limit)} ({source})")
