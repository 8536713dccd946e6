"""Every `lab` command's options except `lab train`'s (Hydra's own command line).

Only argparse and the standard library are imported here: `lab sweep --help` and an option typo are answered
before torch, Lightning or MLflow load (5-6 s of CPU when each command module brought its own parser).
"""
import argparse

from lab.data import fetch  # standard library only: its parser lists the datasets it knows

SWEEP_FILE = "a sweep YAML file, or the name of a shipped sweep (quickstart, fashion_mnist_cnn, ...: sweeps/)"
STORAGE = "Optuna storage: journal file path or RDB URL (default: runs/<study>/study.journal)"
OUT = "the sweep's output folder (default: runs/<study>)"
MODEL_FORMS = ("a run id (32 hex digits), models:/NAME@ALIAS, models:/NAME/VERSION, a sweep file (its best "
               "trial) or a checkpoint path a run recorded")


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)  # argparse: "invalid positive value: '0'"
    return value


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", default=None,
                        help="study name (default: the file's 'study'); a new name starts a separate study")
    parser.add_argument("--n-trials", type=int, default=None, help="total trials for the study (overrides the file)")
    parser.add_argument("--max-failures", type=int, default=None,
                        help="stop after this many failed trials in a row (file: max_failures, default 5; 0: never)")
    parser.add_argument("--max-retries", type=int, default=None,
                        help="runs again of a trial whose worker died (file: max_retries, default 2)")


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that find a sweep's study again: what best, confirm, report and ensemble take."""
    parser.add_argument("sweep_file", help=SWEEP_FILE)
    parser.add_argument("--storage", default=None, help=STORAGE)
    parser.add_argument("--out", default=None, help=OUT)
    parser.add_argument("--study", default=None, help="the study's name, when it was started with --study")


def add_sweep_commands(sub) -> None:
    sweep = sub.add_parser("sweep", help="create or resume a study and run its trials on a pool of workers")
    sweep.add_argument("sweep_file", help=SWEEP_FILE)
    sweep.add_argument("--gpus", default=None, help="comma-separated GPU ids (default: all visible GPUs)")
    sweep.add_argument("--workers-per-gpu", default="1", help="trials packed on each GPU: an integer or 'auto'")
    sweep.add_argument("--workers", type=int, default=None, help="worker processes when no GPU is used")
    add_budget_arguments(sweep)
    sweep.add_argument("--storage", default=None, help=STORAGE)
    sweep.add_argument("--out", default=None, help=OUT)
    sweep.add_argument("--no-live", action="store_true", help="print one line per change instead of a live view")
    sweep.add_argument("--prepare", action="store_true",
                       help="create the study and its MLflow parent run, start no worker (then `lab worker` joins)")
    sweep.add_argument("--launcher", choices=("local", "slurm"), default="local",
                       help="local: worker processes on this machine (default); slurm: --workers N SLURM array tasks "
                       "(settings: conf/launcher/slurm.yaml, the file's launcher: block, launcher.KEY=VALUE)")
    sweep.add_argument("--detach", action="store_true",
                       help="with --launcher slurm: submit and return; the last worker closes the sweep")
    sweep.add_argument("overrides", nargs="*", help="Hydra overrides applied to every trial")

    worker = sub.add_parser("worker", help="run trials of an existing study until its budget is spent")
    worker.add_argument("sweep_file", help=SWEEP_FILE)
    worker.add_argument("--storage", default=None, help=STORAGE + "; the sweep's, e.g. postgresql://...")
    worker.add_argument("--out", default=None, help=OUT)
    add_budget_arguments(worker)
    worker.add_argument("--worker-id", default=None, help="a name for this worker in logs and trial records")
    worker.add_argument("--no-check", action="store_true", help=argparse.SUPPRESS)  # the sweep parent checked
    worker.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # the parent's, epoch s
    worker.add_argument("overrides", nargs="*",
                        help="Hydra overrides; none: the ones the study was created with")


def add_analysis_commands(sub) -> None:
    best = sub.add_parser("best", help="print the best trial and export it as an experiment config")
    best.add_argument("sweep_file", help=SWEEP_FILE)
    best.add_argument("--storage", default=None, help=STORAGE)
    best.add_argument("--out", default=None, help=OUT)
    best.add_argument("--study", default=None, help="the study's name, when it was started with --study")
    best.add_argument("--export", default=None, help="write the experiment YAML here (default: conf/experiment/)")
    best.add_argument("--trial", type=int, default=None,
                      help="export this trial (a Pareto front member, a runner-up) instead of the best")

    confirm = sub.add_parser("confirm", help="rerun the best trials with several seeds: mean +- std")
    add_study_arguments(confirm)
    confirm.add_argument("--top", type=positive, default=3, help="how many of the best completed trials")
    confirm.add_argument("--seeds", type=positive, default=3,
                         help="S fresh seeds per trial, after the ones the sweep trained (at least 2 for a std)")

    report = sub.add_parser("report", help="write the study as one self-contained HTML page")
    add_study_arguments(report)

    predict = sub.add_parser("predict", help="classify image files with a trained model")
    predict.add_argument("model", help=f"the model: {MODEL_FORMS}, or an .onnx file `lab export` wrote")
    predict.add_argument("images", nargs="+", help="image files and folders (walked recursively)")
    predict.add_argument("--out", default=None, help="also write the predictions to this CSV file")
    predict.add_argument("--top", type=int, default=3, help="how many classes to list per image (default 3)")
    predict.add_argument("--storage", default=None, help="for a sweep file: its Optuna storage")
    predict.add_argument("--study", default=None, help="for a sweep file: the study's name, when started with --study")
    predict.add_argument("--sweep-out", default=None, help="for a sweep file: its output folder (lab sweep's --out)")

    add_export_command(sub)

    ensemble = sub.add_parser("ensemble", help="average the best trials' predictions on the test set")
    add_study_arguments(ensemble)
    ensemble.add_argument("--top", type=int, default=3, help="how many of the best trials to average (default 3)")
    ensemble.add_argument("--trials", default=None, help="these trial numbers instead, e.g. 3,7,12")


def add_export_command(sub) -> None:
    export = sub.add_parser("export", help="write a trained model as an ONNX file (float, int8, pruned), measured "
                            "against the original on its test split")
    export.add_argument("model", help=f"the model: {MODEL_FORMS}")
    export.add_argument("--format", choices=["onnx"], default="onnx", help="file format (default onnx)")
    export.add_argument("--input", choices=["uint8", "float"], default="uint8",
                        help="what the file's image input holds: uint8 pixels 0-255 (default) or float 0-1")
    export.add_argument("--quantize", choices=["int8"], default=None,
                        help="int8 weights: static (calibrated) for conv nets, dynamic for Linear-only nets")
    export.add_argument("--calibration", default=None, metavar="FOLDER",
                        help="for int8 of a conv net: a folder of images to calibrate on (default: the run's own)")
    export.add_argument("--calibration-size", type=int, default=None, metavar="N",
                        help="how many calibration images (default 256 of the run's training images)")
    export.add_argument("--prune", type=float, default=None, metavar="FRACTION",
                        help="fraction of weights to remove by magnitude, e.g. 0.5")
    export.add_argument("--structured", action="store_true",
                        help="with --prune: remove that fraction of each conv layer's channels instead")
    export.add_argument("--finetune-epochs", type=int, default=None, metavar="N",
                        help="with --prune: epochs of fine-tuning with the run's training config (default 1)")
    export.add_argument("--max-acc-drop", type=float, default=None, metavar="X",
                        help="refuse the export if it loses more test accuracy than this (e.g. 0.01)")
    export.add_argument("--out", default=None, metavar="FILE", help="the .onnx file to write (default: RUNNAME-VARIANT.onnx here)")
    export.add_argument("--storage", default=None, help="for a sweep file: its Optuna storage")
    export.add_argument("--study", default=None, help="for a sweep file: the study's name, when started with --study")
    export.add_argument("--sweep-out", default=None, help="for a sweep file: its output folder (lab sweep's --out)")


def add_server_command(sub) -> None:
    server = sub.add_parser("server", help="run an MLflow tracking server (127.0.0.1 unless --host)")
    server.add_argument("--backend-store-uri", default=None, help="sqlite:///PATH or postgresql://... "
                        "(default: $MLFLOW_TRACKING_URI if it is a database, else sqlite:///mlflow.db)")
    server.add_argument("--artifacts", default="mlartifacts", help="folder the server stores artifacts in")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    server.add_argument("--port", type=int, default=5000, help="TCP port (default 5000)")
    server.add_argument("--auth", action="store_true", help="MLflow basic auth (required for a non-loopback host)")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="lab", description="Hyperparameter sweeps with Optuna, tracked in MLflow.")
    sub = root.add_subparsers(dest="command", required=True)
    add_sweep_commands(sub)
    add_analysis_commands(sub)
    add_server_command(sub)
    fetch.add_parser(sub)
    return root


def parse(argv: list[str]) -> argparse.Namespace:
    """Hydra overrides may stand anywhere after the sweep file, options too: `--workers 2 lr=0.1 --no-live`.
    (argparse alone stops filling a nargs='*' positional at the first option after it.)"""
    root = parser()
    args, rest = root.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        root.error(f"unrecognized arguments: {' '.join(unknown)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    return args
