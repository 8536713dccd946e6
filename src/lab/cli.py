"""The `lab` command. Argument parsing only; each subcommand hands over to the module that does the work.

    lab train [hydra overrides...]          one run (Hydra's own flags work: --cfg job, --help, -m)
    lab sweep SWEEP.yaml [options] [overrides...]
    lab worker SWEEP.yaml --storage URL     join a running study from another shell or host
    lab best SWEEP.yaml [--export PATH]
    lab confirm SWEEP.yaml [--top K] [--seeds S] [--storage URL] [--out DIR]
    lab report SWEEP.yaml [--storage URL] [--out DIR]
    lab data fetch NAME [--root data] [--url URL] [--sha256 HEX] [--force]
    lab server [--backend-store-uri URI] [--artifacts DIR] [--host 127.0.0.1] [--port 5000]
"""
import argparse
import logging
import os
import signal
import sys
import warnings

from lab.errors import Interrupted, raise_interrupted, user_error

EXIT_USER_ERROR = 2


def quiet_libraries() -> None:
    """Hide advice aimed at other products and warnings a user cannot act on; keep real problems."""
    for pattern in (".*heartbeat_interval.*", ".*litlogger.*", ".*LeafSpec.*", ".*smaller than the logging interval.*",
                    ".*does not have many workers.*", ".*Checkpoint directory .* exists and is not empty.*"):
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage()
    )
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def fail(err: BaseException) -> None:
    message = str(err).strip() or type(err).__name__
    print(f"lab: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def train_command(argv: list[str]) -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from lab import config, train

    @hydra.main(config_path=str(config.conf_dir()), config_name="train", version_base="1.3")
    def main(cfg) -> None:
        try:
            train.run(cfg, HydraConfig.get().runtime.output_dir, run_name=cfg.mlflow.run_name,
                      tags={"lab.command": "lab train " + " ".join(HydraConfig.get().overrides.task)})
        except Exception as err:  # noqa: BLE001 - only user errors are shortened; the rest re-raise
            if user_error(err) is None:
                raise
            fail(user_error(err))

    sys.argv = ["lab train", *argv]
    signal.signal(signal.SIGTERM, raise_interrupted)  # the run ends KILLED, the exit status says so
    try:
        main()
    except Interrupted as stop:
        print(f"lab: interrupted by {stop}; the MLflow run was marked KILLED", file=sys.stderr)
        sys.exit(130)


def sweep_parser() -> argparse.ArgumentParser:
    from lab import confirm, fetch, report, server  # mlflow, sklearn, matplotlib: seconds, not for `lab --help`

    parser = argparse.ArgumentParser(prog="lab", description="Hyperparameter sweeps with Optuna, tracked in MLflow.")
    sub = parser.add_subparsers(dest="command", required=True)

    sweep = sub.add_parser("sweep", help="create or resume a study and run its trials on a pool of workers")
    sweep.add_argument("sweep_file")
    sweep.add_argument("--gpus", default=None, help="comma-separated GPU ids (default: all visible GPUs)")
    sweep.add_argument("--workers-per-gpu", default="1", help="trials packed on each GPU: an integer or 'auto'")
    sweep.add_argument("--workers", type=int, default=None, help="worker processes when no GPU is used")
    sweep.add_argument("--n-trials", type=int, default=None, help="total trials for the study (overrides the file)")
    sweep.add_argument("--storage", default=None, help="Optuna storage: journal file path or RDB URL")
    sweep.add_argument("--out", default=None, help="output folder (default: runs/<study>)")
    sweep.add_argument("--no-live", action="store_true", help="print one line per change instead of a live view")
    sweep.add_argument("--prepare", action="store_true",
                       help="create the study and its MLflow parent run, start no worker (then `lab worker` joins)")
    sweep.add_argument("overrides", nargs="*", help="Hydra overrides applied to every trial")

    worker = sub.add_parser("worker", help="run trials of an existing study until its budget is spent")
    worker.add_argument("sweep_file")
    worker.add_argument("--storage", default=None)
    worker.add_argument("--out", default=None)
    worker.add_argument("--n-trials", type=int, default=None)
    worker.add_argument("--worker-id", default=None, help="a name for this worker in logs and trial records")
    worker.add_argument("overrides", nargs="*")

    best = sub.add_parser("best", help="print the best trial and export it as an experiment config")
    best.add_argument("sweep_file")
    best.add_argument("--storage", default=None)
    best.add_argument("--out", default=None)
    best.add_argument("--export", default=None, help="write the experiment YAML here (default: conf/experiment/)")
    server.add_parser(sub)
    fetch.add_parser(sub)
    confirm.add_parser(sub)
    report.add_parser(sub)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Hydra overrides may stand anywhere after the sweep file, options too: `--workers 2 lr=0.1 --no-live`.
    (argparse alone stops filling a nargs='*' positional at the first option after it.)"""
    parser = sweep_parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    quiet_libraries()
    if argv and argv[0] == "train":
        return train_command(argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    args = parse_args(argv)
    from lab import confirm, fetch, report, server, sweep

    commands = {"sweep": sweep.sweep_command, "worker": sweep.worker_command, "best": sweep.best_command,
                "server": server.command, "data": fetch.data_command, "confirm": confirm.command,
                "report": report.command}
    try:
        commands[args.command](args)
    except Exception as err:  # noqa: BLE001
        if user_error(err) is None:
            raise
        fail(user_error(err))


if __name__ == "__main__":
    main()
