"""Training throughput in one process: plain loop (the limit) vs tutorial DataLoader vs lab's train path,
plus `lab sweep` vs the tutorial run trial after trial.   .venv/bin/python bench/run.py [--gpu]

img/s = training images of one epoch / wall seconds of that epoch, from the fastest epoch after the first
(warm-up) one; img/CPU-s divides by the CPU seconds of this process and its reaped DataLoader workers instead,
which other processes on a shared machine disturb less (not nothing: they still evict our caches). lab's epochs
exclude its validation loop (the other pipelines do not validate); its checkpoint + MLflow gap between epochs
is shown in the note. bench/overhead.py breaks lab's extra time down with paired, steadier measurements.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torchmetrics
from hydra.utils import instantiate

import fixtures
import plain
import sweep_vs_tutorial
import through_lab
import tutorial
from lab import config

HERE = Path(__file__).resolve().parent
PARTS = ("cnn", "mlp", "resnet", "sweep")

# Everything that scales with the machine. cpu: 2 cores, the whole run in ~8 minutes when the machine is
# otherwise idle; cuda: the sizes of docs/design.md section 2 (full Fashion-MNIST epochs, 224 px).
SIZES = {
    "cpu": dict(cnn=dict(epochs=5, images=2048, batches=(64, 512)), val_fraction=0.02,
                mlp=dict(epochs=4, images={16: 64, 256: 512}, size=224),
                resnet=dict(epochs=4, files=200, size=64, batch=32),
                sweep=dict(lrs=[3e-4, 1e-3, 2e-3, 5e-3], epochs=2, batches=24, batch=128, args=["--workers", "2"]),
                loader_workers=2),
    "cuda": dict(cnn=dict(epochs=4, images=None, batches=(64, 512)), val_fraction=0.1,
                 mlp=dict(epochs=4, images={16: 4096, 256: 4096}, size=224),
                 resnet=dict(epochs=4, files=3670, size=224, batch=128),
                 # the 16-trial sweep: learning rates log-spaced over 1e-4..1e-2
                 sweep=dict(lrs=[round(1e-4 * 100 ** (i / 15), 7) for i in range(16)], epochs=2, batches=None,
                            batch=64, args=["--workers-per-gpu", "4"]),
                 loader_workers=4),
}


def rates(images: int, epochs: list[dict]) -> dict[str, float]:
    timed = epochs[1:] or epochs  # the first epoch pays for allocation, cudnn plans, lazy imports, forks
    tick = 0.01  # os.times() resolution: an epoch shorter than that would divide by zero
    return {"wall": images / min(e["wall"] for e in timed), "cpu": images / max(tick, min(e["cpu"] for e in timed))}


class Table:
    def __init__(self):
        self.rows: list[dict] = []
        print(f"  {'workload':14} {'pipeline':30} {'batch':>5} {'img/s':>9} {'ratio':>6} {'img/CPU-s':>9} "
              f"{'ratio':>6}  note")

    def add(self, workload: str, pipeline: str, batch: int, rate: dict, note: str = "", ref: dict | None = None,
            unit: str = "img/s") -> dict:
        ratio = {k: rate[k] / ref[k] if ref and ref.get(k) else 1.0 for k in rate}
        row = {"workload": workload, "pipeline": pipeline, "batch": batch, "unit": unit, "note": note,
               **{f"rate_{k}": round(v, 1) for k, v in rate.items()},
               **{f"ratio_{k}": round(v, 3) for k, v in ratio.items()}}
        self.rows.append(row)
        cpu = f"{rate['cpu']:>9.1f} {ratio['cpu']:>6.2f}" if "cpu" in rate else f"{'':>9} {'':>6}"
        note = note if unit == "img/s" else f"{unit}; {note}"
        print(f"  {workload:14} {pipeline:30} {batch:>5} {rate['wall']:>9.1f} {ratio['wall']:>6.2f} {cpu}  {note}",
              flush=True)
        return rate


class Bench:
    def __init__(self, device: torch.device, size: dict, tmp: Path):
        self.device, self.size, self.tmp = device, size, tmp
        self.table = Table()

    def plain(self, workload, batch, epochs, net, x, y, n_batches, lr, name="plain loop (limit)"):
        torch.manual_seed(0)
        times = plain.train(net, x, y, batch, n_batches, epochs, self.device, lr)
        return self.table.add(workload, name, batch, rates(n_batches * batch, times))

    def tutorial(self, workload, batch, epochs, net, dataset, n_images, lr, ref, name="DataLoader", note=""):
        torch.manual_seed(0)
        w = self.size["loader_workers"]
        times = tutorial.train(net, dataset, batch, n_images, epochs, self.device, w, lr)
        return self.table.add(workload, f"tutorial {name}({w}w)", batch, rates(n_images, times), note, ref)

    def lab(self, workload, batch, epochs, overrides, ref, name="lab train.run", note=""):
        records = through_lab.run([*overrides, f"data.batch_size={batch}", f"trainer.max_epochs={epochs}"],
                                  self.tmp, f"{workload}-b{batch}")
        timed = records[1:] or records
        rate = {k: max(e["images"] / max(e["train"][k], 0.01) for e in timed) for k in ("wall", "cpu")}
        # ModelCheckpoint writes (best + last) only after epochs that improved val/acc: show mean and worst.
        gaps = [e["gap"]["wall"] for e in records if "gap" in e] or [0.0]
        note = (f"{note}{'; ' if note else ''}val excluded; ckpt+MLflow after epoch mean {sum(gaps) / len(gaps):.2f}s, "
                f"max {max(gaps):.2f}s")
        return self.table.add(workload, name, batch, rate, note, ref)


# The lecture CNN by its groups, not by an experiment name (experiments get renamed).
CNN = ["data=fashion_mnist", "model=cnn", "optimizer=adam", "model.optimizer.lr=2e-3", "model.net.channels=[32,64]",
       "model.net.batch_norm=true", "model.net.hidden=[128]", "model.net.dropout=0.25", "data.download=false"]


def cnn(b: Bench, root: Path, x: torch.Tensor, y: torch.Tensor) -> dict[int, dict]:
    """The lecture CNN on Fashion-MNIST; returns lab's ratios to the plain loop per batch size."""
    s, val = b.size["cnn"], b.size["val_fraction"]
    overrides = [*CNN, f"data.root={root / 'FashionMNIST' / 'raw'}", f"data.val_fraction={val}"]
    cfg = config.load(overrides)
    lr = float(cfg.model.optimizer.lr)
    net = lambda: instantiate(cfg.model.net, in_shape=[1, 28, 28], num_classes=10)  # noqa: E731
    images = s["images"] or int(len(y) * (1 - val))
    dataset, out = tutorial.fashion(root), {}
    for batch in s["batches"]:
        n_batches = images // batch
        ref = b.plain("fmnist-cnn", batch, s["epochs"], net(), x, y, n_batches, lr)
        lab = b.lab("fmnist-cnn", batch, s["epochs"], [*overrides, f"trainer.limit_train_batches={n_batches}"], ref)
        b.tutorial("fmnist-cnn", batch, s["epochs"], net(), dataset, n_batches * batch, lr, ref)
        out[batch] = {k: lab[k] / ref[k] for k in lab}
    return out


def mlp(b: Bench) -> None:
    """Lecture 4's MLP: flatten 224x224x3 -> 128 -> 5 (19.3M parameters), on synthetic RGB images."""
    s = b.size["mlp"]
    px, most = s["size"], max(s["images"].values())
    x, y = fixtures.synthetic_rgb(most, px, 5)
    overrides = ["data=synthetic", "model=mlp", "optimizer=adam", "model.net.hidden=[128]", "model.net.dropout=0.0",
                 "model.optimizer.lr=1e-3", f"data.size={px}", "data.in_channels=3", "data.classes=5",
                 f"data.n_train={most + most // 9 + 2}", "data.n_test=64"]  # lab moves 10% of n_train to validation
    cfg = config.load(overrides)
    net = lambda: instantiate(cfg.model.net, in_shape=[3, px, px], num_classes=5)  # noqa: E731
    dataset = tutorial.ArrayImages(x, y)
    for batch, n in s["images"].items():
        n_batches = n // batch
        ref = b.plain("lecture4-mlp", batch, s["epochs"], net(), x, y, n_batches, 1e-3)
        b.lab("lecture4-mlp", batch, s["epochs"], [*overrides, f"trainer.limit_train_batches={n_batches}"], ref)
        b.tutorial("lecture4-mlp", batch, s["epochs"], net(), dataset, n_batches * batch, 1e-3, ref)


def resnet(b: Bench) -> dict:
    """ResNet-18 (random init) on a JPEG folder through lab vs the same net on synthetic tensors."""
    s = b.size["resnet"]
    px, batch = s["size"], s["batch"]
    folder = fixtures.jpeg_folder(b.tmp, s["files"], 5)
    # The plain loop's optimizer, and no augmentation: the ratio is about the input path.
    overrides = ["data=image_folder", "model=resnet", "optimizer=adam", "model.net.arch=resnet18",
                 "model.net.weights=null", f"data.root={folder}", f"data.image_size={px}",
                 f"data.cache_dir={b.tmp / 'cache'}"]
    cfg = config.load(overrides)
    lr = float(cfg.model.optimizer.lr)
    n_train = int(s["files"] * (1 - cfg.data.val_fraction - cfg.data.test_fraction))
    n_batches = n_train // batch
    net = lambda: instantiate(cfg.model.net, in_shape=[3, px, px], num_classes=5)  # noqa: E731
    x, y = fixtures.synthetic_rgb(n_batches * batch, px, 5)
    ref = b.plain("resnet18", batch, s["epochs"], net(), x, y, n_batches, lr, name=f"plain loop, synthetic {px}px")
    b.tutorial("resnet18", batch, s["epochs"], net(), tutorial.image_folder(folder, px), n_batches * batch, lr, ref,
               name="ImageFolder", note="decodes every epoch")
    lab = b.lab("resnet18", batch, s["epochs"], [*overrides, f"trainer.limit_train_batches={n_batches}"], ref,
                name="lab train.run, image_folder", note="decoded once")
    return {k: lab[k] / ref[k] for k in lab}


def sweep(b: Bench, root: Path) -> float:
    """The same small CNN trials: `lab sweep` with K workers vs the tutorial, one trial after another."""
    s = b.size["sweep"]
    limit = "null" if s["batches"] is None else s["batches"]
    overrides = [*CNN, f"trainer.max_epochs={s['epochs']}", f"data.batch_size={s['batch']}",
                 f"trainer.limit_train_batches={limit}", f"+trainer.limit_test_batches={limit}",
                 f"data.val_fraction={b.size['val_fraction']}", f"data.root={root / 'FashionMNIST' / 'raw'}"]
    lab_s = sweep_vs_tutorial.run_sweep(b.tmp, s["lrs"], overrides, s["args"])
    tut_s = sweep_vs_tutorial.run_tutorial(root, s["lrs"], overrides, b.device, b.size["loader_workers"])
    n, label = len(s["lrs"]), f"cnn {len(s['lrs'])} trials"
    ref = b.table.add(label, "tutorial, one trial at a time", s["batch"], {"wall": n * 3600 / tut_s},
                      f"{tut_s:.1f}s wall", unit="trials/h")
    b.table.add(label, f"lab sweep {' '.join(s['args'])}", s["batch"], {"wall": n * 3600 / lab_s},
                f"{lab_s:.1f}s wall incl. process start-up", ref, unit="trials/h")
    return tut_s / lab_s


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{model}, {os.cpu_count()} cores"


def write_results(out: dict, command: str) -> None:
    lines = [f"\n## {out['date']}: {out['device']}\n",
             f"torch {out['torch']}, pytorch-lightning {out['lightning']}, torchmetrics {out['torchmetrics']}, "
             f"{out['torch_threads']} torch thread(s) in the bench process; "
             f"1-minute load average before/after {out['loadavg_1m']}; {out['wall_s']} s in all; data: {out['data']}. "
             f"`{command}`\n",
             "| workload | pipeline | batch | throughput | ratio | per CPU-s | ratio | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in out["rows"]:
        cpu = f"{r['rate_cpu']:,.1f} | {r['ratio_cpu']:.2f}" if "rate_cpu" in r else "| "
        lines.append(f"| {r['workload']} | {r['pipeline']} | {r['batch']} | {r['rate_wall']:,.1f} {r['unit']} | "
                     f"{r['ratio_wall']:.2f} | {cpu} | {r['note']} |")
    summary = []  # only the parts that ran (--only)
    if "lab_over_plain" in out:
        summary.append(f"lab_over_plain (CNN, batch 512) **{out['lab_over_plain']}** (per CPU-s "
                       f"{out['lab_over_plain_cpu']}), batch 64 {out['lab_over_plain_b64']} "
                       f"({out['lab_over_plain_b64_cpu']})")
    for key in ("sweep_speedup_over_tutorial", "resnet_folder_over_synthetic"):
        if key in out:
            summary.append(f"{key} **{out[key]}**")
    lines += ["", "; ".join(summary), ""]
    path = HERE / "RESULTS.md"
    if not path.exists():
        path.write_text("# bench results\n\nAppended by `bench/run.py` (see its docstring for what is measured). "
                        "Ratios: to the plain loop on the same workload and batch; sweep rows: to the tutorial "
                        "run one trial after another.\n")
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="run on CUDA with full-size workloads")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (data, checkpoints, MLflow DBs)")
    parser.add_argument("--only", action="append", choices=PARTS,
                        help="run only this part (repeatable), e.g. to fit a 10-minute GPU lease call")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads of this process (default: 1 on CPU, torch's own on GPU)")
    args = parser.parse_args()
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("bench: --gpu given but torch sees no CUDA device")
    if not args.gpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # lab's accelerator=auto and the sweep's workers stay on the CPU
    device = torch.device("cuda" if args.gpu else "cpu")
    # One thread on CPU: on a 2-core machine shared with other jobs, 2 OpenMP threads spin-wait on each other
    # (measured at load 3.8: 250 img/s with 2 threads, 850 with 1, for the same CNN loop). The sweep's CPU
    # workers run 1 thread each as well; the tutorial's DataLoader workers run beside this process as usual.
    threads = args.threads or (None if args.gpu else 1)
    if threads:
        torch.set_num_threads(threads)
    through_lab.quiet()
    started, load_before = time.time(), os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="lab-bench-"))
    print(f"bench on {device_name(device)} ({torch.get_num_threads()} torch threads), torch {torch.__version__}, "
          f"lightning {pl.__version__}, load average {load_before:.1f}; temp {tmp}")
    b = Bench(device, SIZES[device.type], tmp)
    parts, ratios = args.only or PARTS, {}
    try:
        root = fixtures.fashion_raw(tmp)
        if "cnn" in parts:
            cnn_ratio = cnn(b, root, *fixtures.fashion_tensors(root))
            ratios.update(lab_over_plain=cnn_ratio[512]["wall"], lab_over_plain_cpu=cnn_ratio[512]["cpu"],
                          lab_over_plain_b64=cnn_ratio[64]["wall"], lab_over_plain_b64_cpu=cnn_ratio[64]["cpu"])
            print(f"  ({time.time() - started:.0f} s so far)", flush=True)
        if "mlp" in parts:
            mlp(b)
            print(f"  ({time.time() - started:.0f} s so far)", flush=True)
        if "resnet" in parts:
            resnet_ratio = resnet(b)
            ratios.update(resnet_folder_over_synthetic=resnet_ratio["wall"],
                          resnet_folder_over_synthetic_cpu=resnet_ratio["cpu"])
            print(f"  ({time.time() - started:.0f} s so far)", flush=True)
        if "sweep" in parts:
            ratios["sweep_speedup_over_tutorial"] = sweep(b, root)
    finally:
        if not args.keep:  # about 1.3 GB of checkpoints and data on the CPU sizes
            shutil.rmtree(tmp, ignore_errors=True)

    out = {
        **{k: round(v, 3) for k, v in ratios.items()},
        "data": fixtures.source, "device": device_name(device), "torch": torch.__version__, "lightning": pl.__version__,
        "torchmetrics": torchmetrics.__version__, "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "wall_s": round(time.time() - started, 1), "rows": b.table.rows,
    }
    python = os.path.relpath(sys.executable) if sys.prefix != sys.base_prefix else Path(sys.executable).name
    write_results(out, " ".join([python, "bench/run.py", *sys.argv[1:]]))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
