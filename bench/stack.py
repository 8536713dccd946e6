"""Stacked training (issue 24): ratios in one run, same machine, one torch thread per process.

   OMP_NUM_THREADS=1 LAB_TORCH_THREADS=1 .venv/bin/python bench/stack.py [--append] [--rows step,sweep,seeds,cnn]
       [--repeat N]   (all rows once: about 5 minutes on 2 cores)

--rows: which rows to run (default all); --repeat N: each row's two sides N times, back to back (a ratio's two
sides under the same load), the row giving the range of its N ratios.

Rows:
- digits MLP 64-128-10, 8 members: lab's Stack step (vmap over 8) against a plain PyTorch loop training the 8
  one after another, in this process, same batches per member (samples/s of all members together).
- 16-trial digits-MLP sweep (`lab sweep`, 1 worker, experiment digits_mlp: 20 epochs): `stack: 8` against
  `stack: 1`, trials per hour of the whole command (start-up, MLflow records, tests included), and in brackets of
  the trials themselves (first trial's start to last trial's end, from the study). Target >= 2x.
- one `seeds: 5` trial: stacked (the default) against `stack_seeds: false` (one seed after another), the whole
  command and in brackets the trial itself. Target >= 2x.
- Fashion-MNIST CNN (2x conv-BN-ReLU-pool, dense 128, batch 128), 8 members: Stack step against the plain loop,
  in process, 30 steps each; no target on a CPU (its convolutions are compute-bound here).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# The lecture's digits MLP (conf/experiment/digits_mlp.yaml: hidden 128, dropout 0.1, 20 epochs, batch 64).
# threads=1: a sweep's pool gives each worker cores/workers torch threads (LAB_TORCH_THREADS=2 for 1 worker on
# 2 cores, whatever this process's environment says); the user's threads= override wins. Two threads on 2 cores
# that others share made every small op wait for the slower thread (the stacked side the more).
DIGITS = ["experiment=digits_mlp", "trainer.enable_progress_bar=false", "threads=1"]
LR = {"model.optimizer.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
      "model.net.dropout": {"type": "float", "low": 0.0, "high": 0.3}}


def sweep_seconds(body: dict) -> tuple[float, float]:
    """(seconds of the whole `lab sweep`, seconds from its first trial's start to its last trial's end): the
    second leaves out what a sweep pays once whatever its size (imports, MLflow's schema, the study, the best
    model's logging), that a 16-trial sweep of 2-second trials is mostly made of."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.yaml"
        path.write_text(json.dumps({"study": "bench", "metric": "val/acc", "overrides": DIGITS,
                                    "sampler": {"name": "random", "seed": 0}, "log_models": "best", **body}))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LAB_"))}
        env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db", LAB_TORCH_THREADS="1")
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "lab.cli", "sweep", str(path), "--workers", "1", "--no-live"],
                              cwd=tmp, env=env, capture_output=True, text=True, timeout=1800)
        took = time.perf_counter() - start
        if done.returncode or "one at a time" in done.stdout + done.stderr:
            sys.exit(f"sweep {body}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        storage = optuna.storages.JournalStorage(JournalFileBackend(str(Path(tmp) / "runs" / "bench" / "study.journal")))
        trials = optuna.load_study(study_name="bench", storage=storage).trials
        span = (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()
    return took, span


def in_process(overrides: list[str], k: int, steps: int) -> tuple[float, float]:
    """(plain loop samples/s, Stack samples/s), k members, `steps` batches each."""
    from lab.config import load
    from lab.train import job, stack

    cfg = load([*overrides, "threads=1"])
    dm = job.instantiate(cfg.data)
    dm.setup("fit")
    cfgs = [cfg] * k
    models, gens = stack.build_members(cfgs, dm)
    s = stack.Stack(cfgs, models, gens, dm, torch.device("cpu"))
    batches = [b for _, b in zip(range(steps), s.epoch_batches())]
    nets = [m.net for m in stack.build_members(cfgs, dm)[0]]
    opts = [torch.optim.Adam(n.parameters(), lr=1e-3) for n in nets]

    def plain():
        for j, (net, opt) in enumerate(zip(nets, opts)):
            net.train()
            for x, y in batches:
                loss = torch.nn.functional.cross_entropy(net(x[j]), y[j])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    def stacked():
        for x, y in batches:
            s.train_step(x, y)

    samples = k * sum(y.shape[1] for _, y in batches)
    rates = []
    for fn in (plain, stacked):
        fn()  # warm-up
        start = time.perf_counter()
        fn()
        rates.append(samples / (time.perf_counter() - start))
    return rates[0], rates[1]


def pairs(name: str) -> tuple[str, str, float]:
    """(row, what was measured, ratio) of one run of the row's two sides, back to back."""
    if name == "step":
        plain, stacked = in_process(["data=digits", "model=mlp", "model.net.hidden=[128]"], 8, 20)
        return ("digits MLP 64-128-10, 8 members, in process: Stack vs plain loop one after another",
                f"{stacked:,.0f} vs {plain:,.0f} samples/s", stacked / plain)
    if name == "cnn":
        cnn = ["experiment=fashion_mnist_cnn", "model.net.dropout=0", "data.root=/usr/share/datasets/fashion-mnist",
               "data.download=false"]
        plain, stacked = in_process(cnn, 8, 30)
        return ("Fashion-MNIST CNN (BN, batch 128), 8 members, in process: Stack vs plain loop (no target on CPU)",
                f"{stacked:,.0f} vs {plain:,.0f} samples/s", stacked / plain)
    if name == "sweep":
        one, one_span = sweep_seconds({"n_trials": 16, "stack": 1, "params": LR})
        eight, eight_span = sweep_seconds({"n_trials": 16, "stack": 8, "params": LR})
        return ("16-trial digits-MLP sweep (digits_mlp, 20 epochs, lr and dropout searched), 1 worker: stack: 8 vs "
                "stack: 1, the whole command [first trial's start to last trial's end]",
                f"{16 * 3600 / eight:,.0f} vs {16 * 3600 / one:,.0f} trials/h ({eight:.1f} s vs {one:.1f} s) "
                f"[{eight_span:.1f} s vs {one_span:.1f} s: {one_span / eight_span:.2f}x]", one / eight)
    stacked, stacked_span = sweep_seconds({"n_trials": 1, "seeds": 5, "params": LR})
    one_by_one, one_by_one_span = sweep_seconds({"n_trials": 1, "seeds": 5, "stack_seeds": False, "params": LR})
    return ("one seeds: 5 trial: stacked vs one seed after another, the whole command [the trial itself]",
            f"{stacked:.1f} s vs {one_by_one:.1f} s [{stacked_span:.1f} s vs {one_by_one_span:.1f} s: "
            f"{one_by_one_span / stacked_span:.2f}x]", one_by_one / stacked)


ROWS = ("step", "sweep", "seeds", "cnn")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--append", action="store_true", help="append the table to bench/RESULTS.md")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--repeat", type=int, default=1, help="each row's two sides this many times")
    parser.add_argument("--at", help="the code measured, for the table (default: this checkout's commit); for "
                                     "a lab imported from elsewhere (PYTHONPATH=<a git archive>/src)")
    args = parser.parse_args()
    names = args.rows.split(",")
    if any(n not in ROWS for n in names) or args.repeat < 1:
        sys.exit(f"--rows takes {', '.join(ROWS)}; --repeat a whole number >= 1")
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    rows = []
    for name in names:
        runs = [pairs(name) for _ in range(args.repeat)]
        ratios = [r for _, _, r in runs]
        ratio = f"{ratios[0]:.2f}x" if len(runs) == 1 else f"{min(ratios):.2f}-{max(ratios):.2f}x"
        rows.append((runs[0][0], "; ".join(what for _, what, _ in runs), ratio))
    after = os.getloadavg()[0]
    commit = args.at or subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                       capture_output=True, text=True).stdout.strip()
    lines = [f"## Stacked training (issue 24), {date.today()}, {platform.machine()} {os.cpu_count()} CPU cores, "
             f"torch {torch.__version__}, 1 thread, load average {load:.1f} before, {after:.1f} after",
             "", f"`OMP_NUM_THREADS=1 LAB_TORCH_THREADS=1 .venv/bin/python bench/stack.py --rows {args.rows} "
             f"--repeat {args.repeat}` at {commit or 'an unknown commit'}", "",
             "| row | measured | ratio |", "| --- | --- | --- |"]
    lines += [f"| {name} | {what} | {ratio} |" for name, what, ratio in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.append:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
