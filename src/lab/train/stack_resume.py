"""A stacked member's last.ckpt: what a retried member resumes from after its worker died.

The stacked loop is lab's own (stack_run.train), not Lightning's, so a member's resume state is lab's own
file, not a Lightning checkpoint: its Classifier state dict (weights, batch-norm statistics), its optimizer
param group and per-parameter state, the epochs it finished, its best-so-far value, checkpoint and patience
count, its last epoch's metrics, and the RNG states its next epoch draws from (its shuffling generator, the
global stream its dropout masks come from). Written as checkpoints.LastCheckpoint writes a lone run's: in its
checkpoint folder as last.ckpt (where budget.retry looks), at an epoch end at most once per
checkpoint.last_every_s, to a temporary name first, then renamed over. A retry resumes it as a stack of one.
"""
import os
import shutil
import warnings
from pathlib import Path

import torch

from lab.train.checkpoints import NAME

FORMAT = "lab.stack_member"  # key (and format version) that tells this file from a Lightning checkpoint


def _cpu(value):
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value


def write(stack, m, i: int, epochs: int) -> Path:
    """Member i's state after `epochs` finished epochs (its scheduler stepped), atomically."""
    group = next(g for g in stack.optimizer.param_groups if g["member"] == i)
    state = {
        FORMAT: 1, "epoch": epochs,
        "state_dict": {k: _cpu(v) for k, v in stack.models[i].state_dict().items()},
        "optimizer": {"group": {k: v for k, v in group.items() if k != "params"},
                      "state": [{k: _cpu(v) for k, v in stack.optimizer.state.get(p, {}).items()}
                                for p in stack.params[i]]},
        "generator": stack.generators[i].get_state(), "rng": torch.get_rng_state(),
        "best": list(m.best) if m.best else None, "wait": m.wait, "trained": dict(m.trained),
    }
    if stack.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(stack.device)
    path = m.out_dir / "checkpoints" / NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{NAME}.partial")
    torch.save(state, partial)
    os.replace(partial, path)  # atomic on POSIX: the old file or the new one, never half of one
    return path


def read(path: str | Path) -> dict | None:
    """The member state in path; None when it is not one (a lone run's Lightning checkpoint) or cannot be read
    (a torn file: the retry then goes the lone way, which starts afresh and says so)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: a lone run's is not copied
    except Exception:  # noqa: BLE001 - missing, truncated, not a checkpoint
        return None
    return state if isinstance(state, dict) and state.get(FORMAT) == 1 else None


def restore(stack, members) -> int:
    """Each member with a resume state (m.resume) continues from it; returns the epoch the loop starts at.
    Members resume in a stack of their own (stack_run.run): every one from the same epoch."""
    starts = {int(m.resume["epoch"]) if m.resume else 0 for m in members}
    if len(starts) > 1:
        raise ValueError(f"members resume from different epochs ({sorted(starts)}): resume each in a stack of one")
    (start,) = starts
    if not start:
        return 0
    if stack.scheduler is not None:
        # The scheduler is rebuilt and stepped once per finished epoch; the lr it sets is then overwritten by
        # the saved group's (the same value). It warns that no optimizer step came first: none is due here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(start):
                stack.scheduler.step()
    saved_rng = None
    for i, m in enumerate(members):
        state = m.resume
        stack.models[i].load_state_dict(state["state_dict"])  # copies into the member's own leaf tensors
        with torch.no_grad():
            for j, b in enumerate(stack.models[i].net.buffers()):
                stack.buffers[stack.buffer_names[j]][i].copy_(b)
        whole = stack.optimizer.state_dict()
        n = next(g for g, group in enumerate(stack.optimizer.param_groups) if group["member"] == i)
        ids = whole["param_groups"][n]["params"]
        whole["param_groups"][n] = {**state["optimizer"]["group"], "member": i, "params": ids}
        whole["state"].update({pid: s for pid, s in zip(ids, state["optimizer"]["state"]) if s})
        stack.optimizer.load_state_dict(whole)
        stack.generators[i].set_state(state["generator"])
        m.epochs, m.wait, m.trained = start, int(state["wait"]), dict(state["trained"])
        if state["best"]:
            value, path = float(state["best"][0]), str(state["best"][1])
            if path and Path(path).is_file():  # the earlier attempt's best epoch, taken into this run's folder
                own = m.out_dir / "checkpoints" / Path(path).name
                own.parent.mkdir(parents=True, exist_ok=True)
                if own.resolve() != Path(path).resolve():
                    shutil.copyfile(path, own)
                path = str(own)
            else:
                path = ""  # gone: a later better epoch replaces it; else the final weights are tested
            m.best = (value, path)
        saved_rng = state
    torch.set_rng_state(saved_rng["rng"])
    if "cuda_rng" in saved_rng and stack.device.type == "cuda":
        torch.cuda.set_rng_state(saved_rng["cuda_rng"], stack.device)
    return start


def stopped(m) -> bool:
    """Whether the member had stopped early (its patience spent) when its state was written."""
    patience = m.cfg.early_stopping.get("patience")
    return bool(patience and m.wait >= int(patience))
