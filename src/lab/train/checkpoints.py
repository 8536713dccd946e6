"""last.ckpt: what a retried sweep trial resumes from after its worker died.

Lightning's ModelCheckpoint(save_last=True) rewrites last.ckpt only in epochs where the best improved
(2.6), and writes in place, so a kill mid-write leaves a torn file. This writes at an epoch end once
`every_s` seconds have passed since the last write, to a temporary name first, then renames it over.
The rule bounds both costs: at most `every_s` of training is lost, and the write (~1 s and 230 MB for
the lecture-4 MLP with its Adam state) happens at most once per `every_s`, however short GPU epochs are.
"""
import math
import os
import time
from pathlib import Path

from pytorch_lightning.callbacks import Callback

from lab.errors import LabError

NAME = "last.ckpt"


def interval(every_s) -> float:
    """checkpoint.last_every_s as seconds, or a LabError naming it (also read by the stacked loop's members)."""
    try:
        seconds = float(every_s)
    except (TypeError, ValueError):
        seconds = math.nan
    if not seconds >= 0:  # also refuses NaN
        raise LabError(f"checkpoint.last_every_s={every_s} is not valid: use seconds >= 0 (0: every epoch).")
    return seconds


class LastCheckpoint(Callback):
    def __init__(self, dirpath: str | Path, every_s: float):
        self.path, self.every_s = Path(dirpath) / NAME, interval(every_s)
        self.written_at = time.monotonic()

    def on_fit_start(self, trainer, pl_module):
        self.written_at = time.monotonic()

    def on_train_epoch_end(self, trainer, pl_module):
        if time.monotonic() - self.written_at < self.every_s:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{NAME}.partial")
        trainer.save_checkpoint(partial)
        os.replace(partial, self.path)  # atomic on POSIX: the old file or the new one, never half of one
        self.written_at = time.monotonic()


def resumable(path: str) -> tuple[str | None, str]:
    """(the checkpoint to resume from, or None to start afresh; what happened, for the run's lab.resume tag).
    A checkpoint torn by a kill mid-write (one not written through LastCheckpoint, or a disk that filled)
    cannot be resumed: the retry trains from scratch instead of failing like the attempt before it."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: no copy of the tensors
        epoch = int(state["epoch"])
    except Exception as err:  # noqa: BLE001 - missing, truncated, not a Lightning checkpoint
        return None, f"started afresh: {path} cannot be read ({type(err).__name__}: {str(err)[:200]})"
    return path, f"resumed after epoch {epoch} from {path}"


def best_or_last(best_path: str) -> tuple[str | None, str]:
    """(ckpt_path for trainer.test, which weights it means). A last.ckpt is written at an epoch's end, before
    that epoch's better checkpoint replaces the best one, so a run resumed from it can name a file that is
    gone: the checkpoint that replaced it (ModelCheckpoint keeps one, save_top_k=1) is the best; without one,
    the final weights are tested."""
    if best_path and Path(best_path).is_file():
        return best_path, f"best epoch: {best_path}"
    if not best_path:
        return None, "final weights"
    newer = sorted(Path(best_path).parent.glob("epoch=*.ckpt"), key=lambda p: p.stat().st_mtime)
    if newer:
        return str(newer[-1]), f"best epoch: {newer[-1]} (it replaced {Path(best_path).name})"
    return None, f"final weights (the best checkpoint {best_path} no longer exists)"
