"""Memory and speed of an image folder at real size: peak resident memory of `lab train` and the summed PSS of a
2-worker `lab sweep`, each beside the decoded size and a digits baseline; decode images/s; streamed against
resident batches.        .venv/bin/python bench/data_scale.py [--images 3670] [--size 224] [--src OTHER/src]

--src runs another checkout's lab (e.g. a worktree of an older commit) with this venv, for before/after rows.
Targets (issue 22): one process <= baseline + 1.3x decoded; two workers <= 2 baselines + 1.3x decoded.
PSS (proportional set size, /proc/PID/smaps_rollup) splits a page shared by N processes N ways, so the mapped
cache counts once across the workers while RSS would count it in each.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import fixtures

GB = 1e9


def lab_cmd(src: str | None) -> tuple[list[str], dict]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if src:
        env["PYTHONPATH"] = src
    return [sys.executable, "-m", "lab.cli"], env


def descendants(pid: int) -> list[int]:
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        out += [int(k) for k in kids]
        frontier += [int(k) for k in kids]
    return out


def pss(pid: int, field: str = "Pss") -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def pss_of(pid: int, under: str) -> int:
    """PSS of the mappings of files whose path starts with `under` (the decoded cache)."""
    total, inside = 0, False
    try:
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                inside = under in line
            elif inside and line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
    except OSError:
        pass
    return total


def rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run(args: list[str], cwd: Path, src: str | None, sample_workers: bool = False, cache: str = "") -> dict:
    """Runs `lab ARGS` under /usr/bin/time -v: wall s, peak RSS of the lab process; with sample_workers, the
    largest summed PSS (and RSS) of its worker processes, sampled every 0.2 s, and the largest summed anonymous
    PSS plus PSS of the cache's files ("own": what is not shared library code, whose PSS varies with how many
    other processes on the machine map torch)."""
    cmd, env = lab_cmd(src)
    start = time.monotonic()
    proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    peak = {"pss": 0, "rss": 0, "own": 0, "workers": 0}

    def sample():
        while proc.poll() is None:
            kids = [p for p in descendants(proc.pid) if "worker" in Path(f"/proc/{p}/cmdline").read_bytes().decode(
                errors="replace")] if sample_workers else []
            if kids:
                peak["pss"] = max(peak["pss"], sum(pss(k) for k in kids))
                peak["rss"] = max(peak["rss"], sum(rss(k) for k in kids))
                own = sum(pss(k, "Pss_Anon") + (pss_of(k, cache) if cache else 0) for k in kids)
                peak["own"] = max(peak["own"], own)
                peak["workers"] = max(peak["workers"], len(kids))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.communicate()[0]
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"bench: lab {' '.join(args)} failed:\n{out[-3000:]}")
    maxrss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out).group(1)) * 1024
    decoded = re.search(r"decoded (\d+) images at \d+ px in ([\d.]+) s: (\d+) images/s on (\d+) threads", out)
    return {"wall_s": time.monotonic() - start, "max_rss": maxrss, **peak,
            "decode": decoded.groups() if decoded else None}


def stream_vs_resident(root: Path, cache: Path, size: int, batch: int) -> dict:
    """Images/s of one epoch of batches through a linear layer's forward and backward, both placements, in this
    process, same seed (their batches are equal: tests/test_data_scale.py)."""
    import torch

    from lab.data.folder import ImageFolder

    out = {}
    for mode in ("resident", "stream", "resident", "stream"):  # twice each: the first pass warms the page cache
        dm = ImageFolder(root=str(root), image_size=size, batch_size=batch, cache_dir=str(cache), placement=mode)
        dm.setup("fit")
        net = torch.nn.Linear(3 * size * size, 5)
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        torch.manual_seed(0)
        start, n = time.perf_counter(), 0
        for x, y in dm.train_dataloader():
            x = dm.prepare_batch(x, training=True).flatten(1)
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += len(y)
        out[mode] = n / (time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=3670)  # the flowers lecture's folder
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--src", default=None, help="another checkout's src/ to measure instead of this one")
    parser.add_argument("--skip-stream", action="store_true")
    parser.add_argument("--keep", default=None, help="a folder to generate the images in once and reuse after")
    args = parser.parse_args()
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lab-data-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    root = tmp / "flowers"
    if len(list(root.glob("*/*.jpg"))) != args.images:
        root = fixtures.jpeg_folder(tmp, args.images, 5)
    cache = tmp / "cache"
    shutil.rmtree(cache, ignore_errors=True)  # the first run decodes: its images/s is a row
    decoded = args.images * 3 * args.size * args.size
    folder = ["data=image_folder", f"data.root={root}", f"data.image_size={args.size}", f"data.cache_dir={cache}",
              "model=linear", "trainer.max_epochs=1", "mlflow.experiment=bench_data"]
    digits = ["data=digits", "model=linear", "trainer.max_epochs=1", "mlflow.experiment=bench_data"]
    rows = {"images": args.images, "size": args.size, "decoded_gb": decoded / GB, "src": args.src or "this checkout"}
    cold = run(["train", *folder], tmp, args.src)
    rows["decode"] = cold["decode"]
    rows["train_cold_rss_gb"] = cold["max_rss"] / GB
    rows["train_rss_gb"] = run(["train", *folder], tmp, args.src)["max_rss"] / GB
    rows["train_baseline_rss_gb"] = run(["train", *digits], tmp, args.src)["max_rss"] / GB
    sweep = tmp / "sweep.yaml"
    for name, overrides in (("folder", folder), ("digits", digits)):
        sweep.write_text(json.dumps({"study": f"bench_{name}", "overrides": overrides, "metric": "val/acc",
                                     "n_trials": 2, "sampler": {"name": "grid"},
                                     "params": {"model.optimizer.lr": {"type": "categorical",
                                                                       "choices": [0.001, 0.01]}}}))
        got = run(["sweep", str(sweep), "--workers", "2", "--no-live"], tmp, args.src, sample_workers=True,
                  cache=str(cache))
        rows[f"sweep_{name}_pss_gb"], rows[f"sweep_{name}_rss_gb"] = got["pss"] / GB, got["rss"] / GB
        rows[f"sweep_{name}_own_gb"] = got["own"] / GB
    base = rows["train_baseline_rss_gb"]
    rows["train_over_baseline_x_decoded"] = (rows["train_rss_gb"] - base) / rows["decoded_gb"]
    rows["sweep_over_baselines_x_decoded"] = ((rows["sweep_folder_pss_gb"] - rows["sweep_digits_pss_gb"])
                                              / rows["decoded_gb"])
    rows["sweep_own_over_baselines_x_decoded"] = ((rows["sweep_folder_own_gb"] - rows["sweep_digits_own_gb"])
                                                  / rows["decoded_gb"])
    if not args.skip_stream and not args.src:
        rows["batches_per_s"] = stream_vs_resident(root, cache, args.size, 32)
        rows["stream_over_resident"] = rows["batches_per_s"]["stream"] / rows["batches_per_s"]["resident"]
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
