"""Seconds each of a run's MLflow views adds to it: dataset input, misclassified images, cost metrics, model.
   LAB_TORCH_THREADS=1 .venv/bin/python bench/views_cost.py [RUNS] [OVERRIDES...]
   e.g. bench/views_cost.py 3 data=digits model=mlp trainer.max_epochs=1
        bench/views_cost.py 3 data=fashion_mnist model=cnn trainer.max_epochs=1 trainer.limit_train_batches=20

Runs `lab train`'s job.run RUNS times in one process (the first pays the imports) into a throwaway SQLite
store and prints each view's seconds per run, timed around the function that makes it.
"""
import sys
import tempfile
import time
from pathlib import Path

from lab.config import load
from lab.train import exported, job, measure, misclassified, tracking

TIMED = {"dataset input": (tracking, "log_dataset"), "misclassified": (misclassified, "log"),
         "cost metrics": (measure, "cost"), "model": (exported, "log"), "test report (before them)": (tracking, "log_test_report")}


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    overrides = sys.argv[2:] or ["data=digits", "model=mlp", "trainer.max_epochs=1"]
    times: dict[str, list[float]] = {}
    for key, (module, name) in TIMED.items():
        def timed(*args, _orig=getattr(module, name), _key=key, **kwargs):  # noqa: B008 - the wrapped function, bound now
            start = time.perf_counter()
            try:
                return _orig(*args, **kwargs)
            finally:
                times.setdefault(_key, []).append(time.perf_counter() - start)
        setattr(module, name, timed)
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        for i in range(runs):
            start = time.perf_counter()
            job.run(load([f"mlflow.tracking_uri={uri}", "trainer.enable_progress_bar=false", *overrides]),
                    Path(tmp) / f"out{i}")
            times.setdefault("whole run", []).append(time.perf_counter() - start)
    print(" ".join(overrides))
    for key, values in times.items():
        print(f"  {key:<28}" + "  ".join(f"{v:6.3f}" for v in values) + "  s")


if __name__ == "__main__":
    main()
