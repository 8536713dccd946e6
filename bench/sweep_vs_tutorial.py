"""The same N small trials two ways: `lab sweep` (a subprocess, K workers) vs the tutorial loop, one by one."""
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from hydra.utils import instantiate
from torch.utils.data import Subset

import tutorial
from lab import config


def lab_command() -> list[str]:
    script = Path(sys.executable).parent / "lab"
    return [str(script)] if script.exists() else [sys.executable, "-m", "lab.cli"]


def write_sweep(path: Path, lrs: list[float], overrides: list[str]) -> None:
    # Every trial is enqueued, so both sides run exactly the same learning rates.
    spec = {
        "study": "bench_sweep", "overrides": overrides,
        "metric": "val/acc", "direction": "maximize", "n_trials": len(lrs),
        "sampler": {"name": "random", "seed": 0}, "pruner": {"name": "none"},
        "params": {"model.optimizer.lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True}},
        "enqueue": [{"model.optimizer.lr": lr} for lr in lrs],
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))


def run_sweep(tmp: Path, lrs: list[float], overrides: list[str], worker_args: list[str]) -> float:
    """Wall seconds of the whole `lab sweep` command: start-up, workers, MLflow, plots, all of it."""
    work = tmp / "sweep"
    work.mkdir(exist_ok=True)
    write_sweep(work / "bench.yaml", lrs, overrides)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    cmd = [*lab_command(), "sweep", str(work / "bench.yaml"), *worker_args, "--no-live", "--out", str(work / "runs")]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd)} failed ({done.returncode}):\n"
                         f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return wall


def run_tutorial(root: Path, lrs: list[float], overrides: list[str], device: torch.device, workers: int) -> float:
    """Wall seconds of the same trials the tutorial way, in this (already warm) process: data as lab splits it
    (validation carved from train) and train/test subsets as large as lab's limit_train/test_batches."""
    cfg = config.load(overrides)
    batch, epochs = int(cfg.data.batch_size), int(cfg.trainer.max_epochs)
    limit = cfg.trainer.limit_train_batches
    n_train = 10**9 if limit is None else int(limit) * batch  # None: the whole split
    n_test = 10**9 if cfg.trainer.get("limit_test_batches") is None else int(cfg.trainer.limit_test_batches) * batch
    start = time.perf_counter()
    for lr in lrs:
        full = tutorial.fashion(root, train=True)
        order = torch.randperm(len(full)).tolist()
        n_val = round(len(full) * float(cfg.data.val_fraction))
        val, train = Subset(full, order[:n_val]), Subset(full, order[n_val : n_val + n_train])
        net = instantiate(cfg.model.net, in_shape=[1, 28, 28], num_classes=10)
        test = tutorial.fashion(root, train=False)
        test = Subset(test, range(min(n_test, len(test))))
        tutorial.trial(net, train, val, test, batch, epochs, device, workers, lr)
    return time.perf_counter() - start
