"""`lab.train(overrides)` in Python (a notebook): what `lab train OVERRIDES` does, returning the metrics.

The same checks (LAB_* variables, groups, RULES, every key against what it builds) and the same records (one
MLflow run, tagged with the `lab train ...` command that replays it), in outputs/<date>/<time>/ as Hydra's
app writes; a bad value raises LabError with the sentence the command prints.
"""
import shlex
import signal
import threading
import time
from pathlib import Path


class Metrics(dict):
    """The run's metrics (train/*, val/* of the last epoch, test/* of the tested weights, model/*), by name;
    run_id: its MLflow run."""

    def __init__(self, metrics: dict[str, float], run_id: str):
        super().__init__(metrics)
        self.run_id = run_id


def as_list(overrides) -> list[str]:
    return shlex.split(overrides) if isinstance(overrides, str) else [str(o) for o in overrides]


def output_dir(root: Path | None = None) -> Path:
    """outputs/<date>/<time> as `lab train` (Hydra) names it, made unique when two runs start in one second."""
    base = (root or Path("outputs")) / time.strftime("%Y-%m-%d") / time.strftime("%H-%M-%S")
    folder, n = base, 1
    while folder.exists():
        folder, n = base.with_name(f"{base.name}-{n}"), n + 1
    return folder.resolve()


def compose(overrides: list[str]):
    """The checked config, or LabError with the sentence `lab train` prints."""
    from lab import config, config_schema, settings
    from lab.errors import LabError
    from lab.train import compose_errors

    settings.check()
    config.make_importable()
    try:
        cfg = config.load(overrides)
    except LabError:
        raise
    except Exception as err:  # Hydra's composing errors as lab's sentence; the rest re-raise
        message = compose_errors.sentence(err)
        if message is None:
            raise
        raise LabError(message) from None
    config_schema.check_rules(cfg)
    return cfg


def train(overrides=(), out_dir: str | Path | None = None, quiet: bool = False) -> Metrics:
    """overrides as `lab train` takes them (a list, or one string): `lab.train(["data=digits", "model=mlp"])`.
    out_dir: the run's folder (checkpoints), default outputs/<date>/<time>. quiet: no progress bar or summary."""
    from lab.errors import user_error
    from lab.train import job, tracking  # Lightning, MLflow: seconds, only when a run is asked for

    overrides = as_list(overrides)
    cfg = compose([*overrides, *(["trainer.enable_progress_bar=false"] if quiet else [])])
    started: dict = {}
    sigint = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    try:
        metrics = job.run(cfg, Path(out_dir) if out_dir else output_dir(), run_name=cfg.mlflow.run_name,
                          tags={"lab.command": "lab train " + shlex.join(overrides), "lab.api": "lab.train"},
                          on_run=lambda client, run_id: started.update(client=client, run_id=run_id))
    except SystemExit as stop:  # Lightning's answer to Ctrl-C inside fit; the run was ended KILLED
        raise KeyboardInterrupt("training was interrupted") from stop
    except Exception as err:
        found = user_error(err)
        if found is None or found is err:
            raise
        raise found from err  # what constructors raised inside Hydra's instantiate, as lab's sentence
    finally:
        if sigint is not None:  # Lightning ignores Ctrl-C after catching one: give it back to the notebook
            signal.signal(signal.SIGINT, sigint)
    if not quiet:
        print(tracking.summary(started["client"], tracking.tracking_uri(cfg.mlflow.tracking_uri), started["run_id"]))
    return Metrics(metrics, started["run_id"])
