"""The `lab` command. Argument parsing only; each subcommand hands over to the module that does the work.

`lab train` is Hydra's own command line (overrides, --cfg job, --help, -m); its config errors are turned
into one-paragraph `lab: error:` messages and exit status 2 here. The other commands are argparse
(lab/arguments.py). usage() is what `lab`, `lab -h` and `lab --help` print.
"""
import contextlib
import importlib
import logging
import os
import re
import sys
import warnings
from pathlib import Path

from lab import arguments, interrupts
from lab.errors import (
    DISK_FULL,
    Interrupted,
    LabError,
    close_matches,
    disk_full,
    user_error,
)

EXIT_USER_ERROR = 2


def quiet_libraries() -> None:
    """Hide advice aimed at other products and warnings a user cannot act on; keep real problems."""
    for pattern in (".*heartbeat_interval.*", ".*litlogger.*", ".*LeafSpec.*", ".*smaller than the logging interval.*",
                    ".*does not have many workers.*", ".*Checkpoint directory .* exists and is not empty.*"):
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage()
    )
    # CRITICAL: it logs each database error with a traceback before raising it, and lab says it once itself.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def fail(err: BaseException) -> None:
    """`lab: error: MESSAGE` on stderr, exit status 2: what every wrong input ends in, with no traceback."""
    message = str(err).strip() or type(err).__name__
    print(f"lab: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


# name, arguments, what it does: `lab --help`, and the names `lab trian` is matched against.
COMMANDS = (
    ("train", "[OVERRIDES...]", "train one model: lab train data=digits model=mlp model.optimizer.lr=0.05"),
    ("sweep", "SWEEP.yaml", "run a hyperparameter sweep on worker processes; the same command resumes it"),
    ("worker", "SWEEP.yaml", "add a worker to a running sweep, from another shell or host"),
    ("best", "SWEEP.yaml", "print a sweep's best trial and save it as an experiment config"),
    ("confirm", "SWEEP.yaml", "rerun a sweep's best trials with several seeds: mean +- std"),
    ("report", "SWEEP.yaml", "write a sweep's results as one HTML page"),
    ("predict", "MODEL IMAGES", "classify image files with a run's, a sweep's or a registered model"),
    ("ensemble", "SWEEP.yaml", "average the best trials' predictions on the test set, beside the best one"),
    ("export", "MODEL", "write a model as an ONNX file (int8, pruned), measured against the original"),
    ("data", "fetch NAME", "download a dataset: flowers, cats_dogs, mnist, fashion_mnist"),
    ("server", "", "run an MLflow tracking server to browse the results"),
)

# command -> (module, function) that runs it, imported after the arguments are read.
COMMAND_FUNCTIONS = {
    "sweep": ("lab.sweep.commands", "sweep_command"), "worker": ("lab.sweep.commands", "worker_command"),
    "best": ("lab.analysis.best", "command"), "confirm": ("lab.analysis.confirm", "command"),
    "report": ("lab.analysis.report", "command"), "predict": ("lab.analysis.predict", "command"),
    "ensemble": ("lab.analysis.ensemble", "command"), "data": ("lab.data.fetch", "data_command"),
    "server": ("lab.server", "command"), "export": ("lab.analysis.export", "command"),
}


def usage() -> str:
    rows = "\n".join(f"  {f'{name} {args}'.strip():<24}{what}" for name, args, what in COMMANDS)
    return f"""usage: lab COMMAND [ARGUMENTS...]

Train image classifiers and search their hyperparameters with Optuna; every run is logged to MLflow
($MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory).

commands:
{rows}

options:
  -h, --help              show this message; `lab COMMAND --help` shows a command's own options
  --version               print lab's version

First run: lab train data=digits model=mlp trainer.max_epochs=3"""


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lab")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


HYDRA_PLAIN = re.compile(r"[\w/.+%@-]+")  # characters a Hydra override value may hold without quotes


def expand_home(overrides: list[str]) -> list[str]:
    """key=~/path -> key=/home/me/path. A shell leaves ~ alone after `data.root=`, and Hydra's override
    grammar has no ~: the README's `data.root=~/flower_photos` failed with a lexer error."""
    out = []
    for arg in overrides:
        key, eq, value = arg.partition("=")
        if eq and re.fullmatch(r"[+~]{0,2}\w[\w.@/-]*", key) and re.fullmatch(r"~[\w.-]*(/.*)?", value):
            path = os.path.expanduser(value)
            if path != value:  # ~unknown_user stays as it is, and Hydra's message says how to quote it
                if not HYDRA_PLAIN.fullmatch(path):
                    path = f"'{path}'" if "'" not in path else f'"{path}"'
                arg = f"{key}={path}"
        out.append(arg)
    return out


def with_overrides(argv: list[str], extra: list[str]) -> list[str]:
    """extra placed among the user's overrides: Hydra's argparse takes its overrides as one run of
    positionals, so `--cfg job a=1 EXTRA` works and `a=1 --cfg job EXTRA` would not."""
    first = next((i for i, a in enumerate(argv) if "=" in a and not a.startswith("-")), len(argv))
    return [*argv[:first], *extra, *argv[first:]]


def prepare() -> None:
    """Before a command creates anything: every LAB_* variable checked, and the working folder (and that of a
    user conf/) importable, for a `_target_` in the user's own files."""
    from lab import config, settings

    settings.check()
    config.make_importable()


def train_command(argv: list[str]) -> None:
    import hydra

    from lab import config

    try:
        prepare()
        config.check_groups(expand_home(argv))  # optimizer=null: Hydra's answer is a ValueError traceback
    except LabError as err:
        fail(err)

    started = {}  # client and run_id once job.run has created the run

    def refuse(err: BaseException) -> None:
        if "run_id" not in started:
            remove_refused_outputs()
        fail(err)

    @hydra.main(config_path=str(config.conf_dir()), config_name="train", version_base="1.3")
    def main(cfg) -> None:
        from lab import config_schema

        try:
            config_schema.check_rules(cfg)  # a bad number is said in 0.3 s, not after seconds of imports
        except LabError as err:
            refuse(err)
        train(cfg, started, refuse)

    sys.argv = ["lab train", *with_overrides(expand_home(argv), config.search_path_override())]
    interrupts.install()  # the run ends KILLED, the exit status says so (not Lightning's SystemExit(1))
    run_hydra(main, started)


def remove_refused_outputs() -> None:
    """Refused before its MLflow run exists: the outputs/<date>/<time> folder Hydra made holds only Hydra's copy
    of the refused config and its log (libraries' start-up lines), so it goes. Its files only, and the log only
    from a folder that is not the working one (hydra.run.dir=. appends to one log)."""
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    here = Path.cwd().resolve()
    ours = [f for f in (run_dir / ".hydra", run_dir, run_dir.parent, run_dir.parent.parent)  # outputs/<date>
            if f.resolve() != here and f.resolve() not in here.parents]
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (run_dir / ".hydra" / name).unlink(missing_ok=True)
    log = run_dir / f"{HydraConfig.get().job.name}.log"
    if log.is_file() and (run_dir in ours or log.stat().st_size == 0):
        log.unlink()
    for folder in ours:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty


def train(cfg, started: dict, refuse) -> None:
    """job.run in Hydra's output folder, then the run's summary. started gets the client and run id once the run
    exists; refuse(err) ends the command on a user's error (one sentence, exit 2)."""
    from hydra.core.hydra_config import HydraConfig

    from lab.train import job, tracking  # Lightning, MLflow: seconds, not for --help or a composing mistake

    try:
        job.run(cfg, HydraConfig.get().runtime.output_dir, run_name=cfg.mlflow.run_name,
                tags={"lab.command": "lab train " + " ".join(HydraConfig.get().overrides.task)},
                on_run=lambda client, run_id: started.update(client=client, run_id=run_id))
    except (KeyboardInterrupt, SystemExit) as stop:
        # Lightning turns Ctrl-C inside fit into SystemExit(1) (and prints its own words); outside fit it is a
        # KeyboardInterrupt. The run was ended KILLED either way (tracking.run).
        if "run_id" not in started:
            raise
        raise Interrupted("Ctrl-C" if isinstance(stop, KeyboardInterrupt) or stop.code == 1 else str(stop)) from stop
    except Exception as err:  # only user errors are shortened; the rest re-raise
        if user_error(err) is None:
            raise
        refuse(user_error(err))
    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri)
    print(tracking.summary(started["client"], uri, started["run_id"]), flush=True)


def run_hydra(main, started: dict) -> None:
    """main() (a @hydra.main function) with Hydra's errors reaching lab's one-sentence messages, and an
    interrupt said with what became of the run (exit status 130)."""
    from lab.train import compose_errors

    # Without HYDRA_FULL_ERROR, Hydra prints its own errors and exits 1; with it, they reach the except below.
    # Whoever set it already wants full tracebacks, and keeps them.
    traces = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except Interrupted as stop:
        by = "Ctrl-C (SIGINT)" if str(stop) in ("SIGINT", "Ctrl-C") else stop
        what = f"the MLflow run {started['run_id']} was marked KILLED" if started else "no MLflow run had started"
        print(f"lab: interrupted by {by}; {what}", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # only config errors are shortened; the rest re-raise
        message = None if traces else compose_errors.sentence(err)
        if message is None:
            raise
        fail(LabError(message))
    finally:
        if not traces:
            os.environ.pop("HYDRA_FULL_ERROR", None)


def main(argv: list[str] | None = None) -> None:
    try:
        run_command(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:  # Ctrl-C before a command installed its handlers (Hydra's, torch's imports)
        print("lab: interrupted by Ctrl-C before anything had started", file=sys.stderr)
        sys.exit(130)


def run_command(argv: list[str]) -> None:
    quiet_libraries()
    if argv and argv[0] == "train":
        return train_command(argv[1:])
    if not argv:  # no command: the usage, and the status of a missing argument
        print(usage(), file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    if argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv[0] in ("-V", "--version"):
        print(f"lab {version()}")
        return
    names = [name for name, _, _ in COMMANDS]
    if argv[0] not in names:  # before argparse, whose message lists neither train nor a likely meaning
        close = close_matches(argv[0], names, n=1)
        hint = f"; did you mean {close[0]}?" if close else "."
        what = "option" if argv[0].startswith("-") else "command"
        fail(LabError(f"unknown {what} {argv[0]!r}{hint} The commands are {', '.join(names)}; "
                      f"`lab --help` says what each does."))
    args = arguments.parse(argv)
    if getattr(args, "overrides", None):
        args.overrides = expand_home(args.overrides)
    module, function = COMMAND_FUNCTIONS[args.command]
    try:
        prepare()
        command = getattr(importlib.import_module(module), function)  # only now: torch, Lightning, MLflow load
        command(args)
    except (Interrupted, KeyboardInterrupt) as stop:  # outside a sweep's orderly stop: at start, while plotting
        print(f"lab: interrupted by {str(stop) or 'Ctrl-C'}", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        full = disk_full(err)
        if full is not None:
            where = f" ({full.filename})" if getattr(full, "filename", None) else ""
            print(f"lab: error: {DISK_FULL.format(where=where)}", file=sys.stderr)
            sys.exit(1)
        if user_error(err) is None:
            raise
        fail(user_error(err))


if __name__ == "__main__":
    main()
