"""Running out of memory, said in one sentence: what ran out, how much was asked for, what to lower.

torch's CPU allocator raises a RuntimeError (`DefaultCPUAllocator: can't allocate memory: you tried to allocate
N bytes`), numpy a MemoryError (`Unable to allocate 1.75 GiB for an array ...`), CUDA an OutOfMemoryError; each
used to end `lab train` in a ~90-line traceback. guard() turns them into OutOfMemory, a LabError, where a run
or a trial fails: the MLflow run ends FAILED with the sentence, a sweep trial fails with it as its reason.
"""
import contextlib
import re

import torch
from omegaconf import DictConfig, OmegaConf

from lab.errors import LabError

TORCH_CPU = re.compile(r"DefaultCPUAllocator: can't allocate memory: you tried to allocate (\d+) bytes")
NUMPY = re.compile(r"Unable to allocate ([\d.]+ [KMGTP]?i?B)")
CUDA = re.compile(r"Tried to allocate ([\d.]+ [KMGTP]?i?B)")


class OutOfMemory(LabError):
    """A run ran out of memory (CPU or GPU); the message is the whole story."""


def gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**28 else f"{n_bytes / 2**20:.0f} MiB"


def asked(err: BaseException) -> tuple[str, str] | None:
    """(what ran out, how much was asked for) when err is an out-of-memory error, else None."""
    text = str(err)
    if isinstance(err, torch.cuda.OutOfMemoryError):
        found = CUDA.search(text)
        return "GPU memory", found.group(1) if found else "an unknown amount"
    if isinstance(err, MemoryError):
        found = NUMPY.search(text)
        return "CPU memory", found.group(1) if found else "an unknown amount"
    if isinstance(err, RuntimeError) and (found := TORCH_CPU.search(text)):
        return "CPU memory", gib(int(found.group(1)))
    return None


def sentence(what: str, amount: str, cfg: DictConfig | None) -> str:
    def now(key: str) -> str:
        value = OmegaConf.select(cfg, key, default=None) if cfg is not None else None
        return f"{key}" + (f" (now {value})" if value is not None else "")

    return (f"out of memory: an allocation of {amount} of {what} failed (the machine's, or this process's limit: "
            f"ulimit -v); lower {now('data.batch_size')} or {now('data.image_size')}, or run fewer sweep workers "
            "at once (--workers: each holds its own data and model), or choose a smaller model.")


@contextlib.contextmanager
def guard(cfg: DictConfig | None = None):
    """Out-of-memory errors raised inside become OutOfMemory (the original is its cause)."""
    try:
        yield
    except (MemoryError, RuntimeError) as err:
        found = asked(err)
        if found is None:
            raise
        raise OutOfMemory(sentence(*found, cfg)) from err
