"""`lab.sweep(sweep_file, overrides, workers=N)` in Python (a notebook): `lab sweep` itself, returning the result.

It runs the command's own code (lab.sweep.commands) on the options as `lab sweep` reads them, so the checks,
the worker pool, the study and the MLflow records are the command's. A bad option or value raises LabError with
the command's sentence; a sweep that ran returns its Result, however it ended (status, and exit_status: what
the command would have exited with). The signal handlers the command installs are put back afterwards.
"""
import contextlib
import io
import signal
import threading
from dataclasses import dataclass

import optuna

from lab.errors import LabError


@dataclass
class Result:
    study: optuna.Study
    best: optuna.trial.FrozenTrial | None  # the best completed (feasible) trial; None if none or several objectives
    parent_run_id: str | None  # the sweep's MLflow parent run; its child runs are the trials
    status: str | None  # the parent run's status: FINISHED, FAILED, KILLED
    exit_status: int  # what `lab sweep` would have exited with: 0, 1 (trials failed), 130 (interrupted)

    @property
    def best_params(self) -> dict | None:
        return self.best.params if self.best is not None else None

    @property
    def best_value(self) -> float | None:
        return self.best.value if self.best is not None else None


def argv(sweep_file, overrides, options: dict) -> list[str]:
    """sweep("s.yaml", ["lr=0.1"], workers=2, n_trials=8, no_live=True) -> `lab sweep` arguments."""
    out = ["sweep", str(sweep_file)]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not None and value is not False:
            out += [flag, str(value)]
    return [*out, *([overrides] if isinstance(overrides, str) else map(str, overrides))]


def parse(arguments: list[str]):
    from lab import arguments as options

    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            return options.parse(arguments)
    except SystemExit:
        lines = [line for line in said.getvalue().splitlines() if line.strip()]
        raise LabError(lines[-1].split("error: ", 1)[-1] if lines else "not valid options for `lab sweep`") from None


def sweep(sweep_file, overrides=(), workers: int | None = None, live: bool = False, **options) -> Result:
    """options: those of `lab sweep` with _ for - (n_trials=8, max_failures=3, storage=..., out=..., gpus=...)."""
    from mlflow.tracking import MlflowClient

    from lab import config, settings
    from lab.errors import user_error
    from lab.sweep import commands, ranking, records, spec
    from lab.sweep import study as studies
    from lab.train import tracking

    settings.check()
    config.make_importable()
    args = parse(argv(sweep_file, overrides, {"workers": workers, "no_live": not live, **options}))
    main = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)} if main else {}
    exit_status = 0
    try:
        commands.sweep_command(args)
    except SystemExit as stop:
        exit_status = stop.code if isinstance(stop.code, int) else 1
    except Exception as err:
        found = user_error(err)
        if found is None or found is err:
            raise
        raise found from err
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    sweep_spec = spec.from_args(args, check=False)
    _, storage = studies.locate(sweep_spec, args.storage, args.out)
    study = studies.load(sweep_spec, storage)
    parent = study.user_attrs.get(records.PARENT_ATTR)
    status = MlflowClient(tracking.tracking_uri()).get_run(parent).info.status if parent else None
    best = ranking.best(study) if len(study.directions) == 1 else None
    return Result(study, best, parent, status, exit_status)
