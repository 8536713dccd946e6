"""Every device path of `lab` once, as a user runs it, each checked through MLflow's and Optuna's own clients:
`lab train` (resident data, the precision auto chose, the cost measurement), streamed data, a 2-epoch sweep of
4 trials (--workers-per-gpu auto on a GPU, 2 workers on a CPU), the same sweep stacked (stack: 4), `lab predict`
on image files and `lab ensemble` of the top 3.

    python3 bench/gpu_smoke.py [--images N]       (bench/gpu.sh runs it first on a GPU machine)

Data: Debian's Fashion-MNIST where it is installed, else Fashion-MNIST-shaped synthetic files (a bare GPU
image has neither the package nor the internet). One line per check, "ok" or "FAILED: why", with its seconds;
the whole log and gpu_smoke.json land in $OUT when it is set. Exit status 1 when a check failed.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import optuna
import torch
from mlflow.tracking import MlflowClient
from torchvision.io import write_png

import fixtures
from lab.data.idx import read_idx
from lab.train import precision

HERE = Path(__file__).resolve().parent
LAB = [sys.executable, "-m", "lab.cli"]  # no console script where the wheels went in by --target
QUIET = ["trainer.enable_progress_bar=false"]


class Smoke:
    def __init__(self, tmp: Path, cuda: bool, root: Path):
        self.tmp, self.cuda, self.root = tmp, cuda, root
        self.uri = f"sqlite:///{tmp / 'mlflow.db'}"
        self.env = {**os.environ, "MLFLOW_TRACKING_URI": self.uri, "PYTHONUNBUFFERED": "1"}
        self.results: list[dict] = []
        self.log_path = tmp / "gpu_smoke.log"

    def note(self, text: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(text)

    def lab(self, *args: str, timeout: int = 300) -> str:
        """Runs `lab ARGS` in tmp; its output (stdout and stderr), or AssertionError with its last lines."""
        self.note(f"\n$ lab {' '.join(args)}\n")
        done = subprocess.run([*LAB, *args], cwd=self.tmp, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        out = done.stdout + done.stderr
        self.note(out)
        assert done.returncode == 0, f"lab {args[0]} exited {done.returncode}: " + " | ".join(out.splitlines()[-4:])
        return out

    def check(self, name: str, fn) -> None:
        start = time.time()
        try:
            detail = fn() or ""
            status = "ok"
        except Exception as err:  # noqa: BLE001 - every check runs; the summary says which failed and why
            status, detail = "FAILED", f"{type(err).__name__}: {err}"
            self.note(traceback.format_exc())
        seconds = time.time() - start
        self.results.append({"check": name, "status": status, "seconds": round(seconds, 1), "detail": detail})
        print(f"{name:<22} {status:<6} {seconds:6.1f} s  {detail}", flush=True)

    def run(self, name: str):
        client = MlflowClient(self.uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  f"attributes.run_name = '{name}'")
        assert runs, f"no MLflow run named {name}"
        return runs[0]

    def want_precision(self) -> str:
        return precision.resolve("auto", "cuda" if self.cuda else "cpu")


def train(s: Smoke) -> str:
    s.lab("train", "experiment=fashion_mnist_cnn", "trainer.max_epochs=2", f"data.root={s.root}",
          "mlflow.run_name=smoke-train", f"hydra.run.dir={s.tmp / 'train'}", *QUIET)
    run = s.run("smoke-train")
    tags, metrics = run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED", run.info.status
    assert tags["lab.precision"] == s.want_precision(), (tags["lab.precision"], s.want_precision())
    if s.cuda:
        assert tags["lab.data_placement"] == "resident", tags["lab.data_placement_reason"]
    for key in ("test/acc", "model/latency_ms", "model/throughput"):
        assert key in metrics, f"{key} not logged"
    assert metrics["test/acc"] > 0.5, metrics["test/acc"]
    assert "lab.model_uri" in tags, "no model logged"
    return (f"test/acc {metrics['test/acc']:.3f}, {tags['lab.precision']}, data {tags['lab.data_placement']}, "
            f"latency {metrics['model/latency_ms']:.2f} ms, {metrics['model/throughput']:,.0f} img/s")


def stream(s: Smoke) -> str:
    s.lab("train", "experiment=fashion_mnist_cnn", "trainer.max_epochs=1", f"data.root={s.root}",
          "data.placement=stream", "mlflow.log_model=false", "mlflow.run_name=smoke-stream",
          f"hydra.run.dir={s.tmp / 'stream'}", *QUIET)
    run = s.run("smoke-stream")
    assert run.info.status == "FINISHED", run.info.status
    assert run.data.tags["lab.data_placement"] == "stream", run.data.tags["lab.data_placement"]
    return f"test/acc {run.data.metrics['test/acc']:.3f}"


def sweep_file(s: Smoke, study: str, extra: str = "", precision_: str = "auto") -> Path:
    path = s.tmp / f"{study}.yaml"
    path.write_text(f"""study: {study}
experiment: fashion_mnist_cnn
overrides: [trainer.max_epochs=2, "data.root={s.root}", trainer.enable_progress_bar=false, trainer.precision={precision_}]
metric: val/acc
direction: maximize
n_trials: 4
sampler: {{name: random, seed: 0}}
pruner: {{name: none}}
{extra}params:
  model.optimizer.lr: {{type: float, low: 5.0e-4, high: 5.0e-3, log: true}}
  model.net.dropout: {{type: float, low: 0.0, high: 0.4}}
""")
    return path


def sweep(s: Smoke, study: str, extra: str = "", precision_: str = "auto") -> str:
    path = sweep_file(s, study, extra, precision_)
    workers = ["--workers-per-gpu", "auto"] if s.cuda else ["--workers", "2"]
    out = s.lab("sweep", str(path), "--storage", str(s.tmp / f"{study}.journal"), "--no-live", *workers, timeout=480)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(s.tmp / f"{study}.journal")))
    trials = optuna.load_study(study_name=study, storage=storage).trials
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == 4, states
    client = MlflowClient(s.uri)
    experiment = client.get_experiment_by_name(study)  # a sweep's runs go to the experiment named as its study
    assert experiment is not None, f"no MLflow experiment {study}"
    (parent,) = client.search_runs([experiment.experiment_id], f"attributes.run_name = 'sweep-{study}'")
    children = client.search_runs([experiment.experiment_id], "tags.`trial.number` != ''")
    assert len(children) == 4, f"{len(children)} trial runs in MLflow"
    assert {r.data.tags.get("mlflow.parentRunId") for r in children} == {parent.info.run_id}, "not nested"
    precisions = {r.data.tags.get("lab.precision") for r in children}
    assert precisions == {precision.resolve(precision_, "cuda" if s.cuda else "cpu")}, precisions
    lines = [line for line in out.splitlines() if "per GPU" in line or "stack" in line or "workers" in line]
    best = max(t.value for t in trials if t.value is not None)
    return f"best val/acc {best:.3f}; " + " / ".join(line.strip()[:120] for line in lines[:2])


def stacked(s: Smoke, study: str = "smoke_stack", precision_: str = "auto") -> str:
    line = sweep(s, study, "stack: 4\n", precision_)
    client = MlflowClient(s.uri)
    experiment = client.get_experiment_by_name(study)
    members = client.search_runs([experiment.experiment_id], "tags.`lab.stacked` = 'true'")
    assert members, "no run was trained in a stack"
    return f"{len(members)} stacked member runs; {line}"


def predict(s: Smoke, n: int) -> str:
    folder = s.tmp / "images"
    folder.mkdir(exist_ok=True)
    images = read_idx(s.root / f"{fixtures.STEMS[2]}.gz")[:n]
    for i, img in enumerate(images):
        write_png(img.unsqueeze(0), str(folder / f"{i:03d}.png"))
    csv = s.tmp / "predictions.csv"
    s.lab("predict", str(s.tmp / "smoke.yaml"), str(folder), "--storage", str(s.tmp / "smoke.journal"),
          "--out", str(csv))
    rows = csv.read_text().splitlines()
    assert len(rows) == n + 1, f"{len(rows) - 1} predictions for {n} images"
    return f"{n} images predicted"


def ensemble(s: Smoke) -> str:
    out = s.lab("ensemble", str(s.tmp / "smoke.yaml"), "--storage", str(s.tmp / "smoke.journal"), "--top", "3")
    assert "test/acc" in out or "acc" in out, out[-300:]
    return [line for line in out.splitlines() if "acc" in line][-1].strip()[:140]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20, help="image files for lab predict")
    parser.add_argument("--train-images", type=int, default=None,
                        help="synthetic training images (default 60000 on a GPU, 6000 on a CPU)")
    parser.add_argument("--synthetic", action="store_true", help="synthetic images even where Debian's are installed")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    tmp = Path(tempfile.mkdtemp(prefix="lab-smoke-"))
    root = tmp / "fashion"
    if not args.synthetic and all((fixtures.FASHION_GZ / f"{stem}.gz").is_file() for stem in fixtures.STEMS):
        root.mkdir()
        for stem in fixtures.STEMS:
            shutil.copy(fixtures.FASHION_GZ / f"{stem}.gz", root)
        source = "Fashion-MNIST (Debian)"
    else:
        n = args.train_images or (60000 if cuda else 6000)
        fixtures.fashion_like(root, n_train=n, n_test=n // 6)
        source = f"synthetic, Fashion-MNIST-shaped ({n} training images)"
    s = Smoke(tmp, cuda, root)
    if cuda:
        name, cap = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
        print(f"{name}, capability {cap[0]}.{cap[1]}, is_bf16_supported {torch.cuda.is_bf16_supported()}, "
              f"auto precision {s.want_precision()}; torch {torch.__version__}; data: {source}; temp {tmp}", flush=True)
    else:
        print(f"no GPU: the same commands on the CPU; data: {source}; temp {tmp}", flush=True)
    s.check("lab train", lambda: train(s))
    s.check("lab train (stream)", lambda: stream(s))
    s.check("lab sweep", lambda: sweep(s, "smoke"))
    s.check("lab sweep (stack: 4)", lambda: stacked(s))
    if cuda:  # the fp16 path of a 7.x GPU (a T4, a V100): autocast under vmap, a loss scale per member
        s.check("stack: 4, 16-mixed", lambda: stacked(s, "smoke_fp16", "16-mixed"))
    s.check("lab predict", lambda: predict(s, args.images))
    s.check("lab ensemble --top 3", lambda: ensemble(s))
    summary = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
               "data": source, "checks": s.results}
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_smoke.json").write_text(json.dumps(summary, indent=1))
        Path(out, "gpu_smoke.log").write_text(s.log_path.read_text())
    failed = [r["check"] for r in s.results if r["status"] != "ok"]
    print(f"{len(s.results) - len(failed)} of {len(s.results)} checks ok" + (f"; failed: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
