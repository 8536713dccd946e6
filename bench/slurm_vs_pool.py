"""The same 6-trial sweep through the local pool and through SLURM (a real single-node cluster on this machine,
tests/slurm_cluster.py), wall clock of the whole `lab sweep` command each, 2 workers each.
   .venv/bin/python bench/slurm_vs_pool.py        (as root: it starts slurmctld, slurmd and munged, then stops them)
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import slurm_cluster

SWEEP = {"study": "bench", "metric": "val/acc", "n_trials": 6, "sampler": {"name": "random", "seed": 0},
         "overrides": ["data=digits", "model=mlp", "model.net.hidden=[16]", "trainer.max_epochs=1",
                       "trainer.enable_progress_bar=false"],
         "params": {"model.optimizer.lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}}}
LAUNCHERS = {"local pool": ["--workers", "2"],
             "slurm": ["--workers", "2", "--launcher", "slurm", "launcher.cpus_per_task=1", "launcher.time_min=30"]}


def timed(name: str, args: list[str], env: dict) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.yaml"
        path.write_text(json.dumps(SWEEP))
        env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        start = time.time()
        done = subprocess.run([sys.executable, "-m", "lab.cli", "sweep", str(path), "--no-live", *args], cwd=tmp,
                              env=env, capture_output=True, text=True, timeout=1800)
        took = time.time() - start
        if done.returncode:
            sys.exit(f"{name}: exit status {done.returncode}\n{done.stdout}\n{done.stderr}")
    return took


def main() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LAB_"))}
    cluster = slurm_cluster.start()
    try:
        load = os.getloadavg()[0]
        times = {name: timed(name, args, {**env, **cluster}) for name, args in LAUNCHERS.items()}
    finally:
        slurm_cluster.stop()
    print(f"6 trials (digits, mlp [16], 1 epoch), 2 workers; 1-minute load average before: {load:.1f}")
    for name, took in times.items():
        print(f"  {name:<11} {took:6.1f} s")
    print(f"  slurm / local: {times['slurm'] / times['local pool']:.2f}x")


if __name__ == "__main__":
    main()
