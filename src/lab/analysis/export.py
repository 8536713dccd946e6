"""`lab export MODEL --format onnx [--quantize int8] [--prune F [--structured]]`: a trained model as a file to
deploy, each variant measured against the original on the run's own test split.

The file takes raw images (uint8 0-255 or float 0-1, --input) and does the training's scaling and normalisation
itself (lab.analysis.onnx_model). Every float file is checked with ONNX Runtime against PyTorch on the whole test
split (probabilities within PROB_TOLERANCE). What it cost (test accuracy, size on disk, CPU latency at batch 1,
non-zero parameters) is printed as a table and logged to an MLflow child run `export-VARIANT` of the source run,
with the file as its artifact. All work happens in a temporary folder: a refused export writes nothing, and the
file appears at --out only once everything passed, by a rename.
"""
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lab.analysis import models, onnx_model, predict, pruning, quantize, results
from lab.errors import LabError
from lab.train import exported, measure, rebuild

PROB_TOLERANCE = 1e-4  # largest |ONNX Runtime - PyTorch| probability accepted for a float file
LATENCY_BUDGET_S = 1.0  # seconds of timed batch-1 calls per model
# Latency on one CPU thread, PyTorch and ONNX Runtime alike: at batch 1 a small net gains nothing from more, and
# on a busy 2-core machine a second thread waiting for its time slice made PyTorch's median 88-156 ms, not 0.1.
LATENCY_THREADS = 1


@dataclass
class Row:
    name: str
    acc: float
    size_mb: float | None  # MB = 10**6 bytes on disk; None: not a single file (the PyTorch model)
    latency_ms: float  # batch 1, median, CPU
    params: int
    nonzero: int


def check(args) -> None:
    """The options alone, before seconds of loading: one sentence for each bad value."""
    if args.prune is not None and not 0 < args.prune < 1:
        raise LabError(f"--prune={args.prune} is not valid: give the fraction of weights to remove, strictly "
                       "between 0 and 1 (0.5: half).")
    for flag, given in (("--structured", args.structured), ("--finetune-epochs", args.finetune_epochs is not None)):
        if given and args.prune is None:
            raise LabError(f"{flag} is an option of pruning: give --prune FRACTION with it, or leave it out.")
    if args.finetune_epochs is not None and args.finetune_epochs < 0:
        raise LabError(f"--finetune-epochs={args.finetune_epochs} is not valid: give 0 (no fine-tune) or more.")
    if args.max_acc_drop is not None and not 0 <= args.max_acc_drop <= 1:
        raise LabError(f"--max-acc-drop={args.max_acc_drop} is not valid: give the test accuracy the export may "
                       "lose, between 0 and 1 (0.01: one percentage point).")
    for flag, given in (("--calibration", args.calibration is not None),
                        ("--calibration-size", args.calibration_size is not None)):
        if given and args.quantize is None:
            raise LabError(f"{flag} is an option of --quantize int8: give both, or leave it out.")
    if args.calibration_size is not None and args.calibration_size < 0:
        raise LabError(f"--calibration-size={args.calibration_size} is not valid: give a number of training images, "
                       "1 or more.")
    if args.calibration is not None:
        path = Path(args.calibration).expanduser()
        if not path.exists():
            raise LabError(f"--calibration {args.calibration} does not exist: give a folder of training images "
                           "to calibrate int8 on, or leave it out to use the run's own training images.")
        if not predict.image_files([str(path)]):
            raise LabError(f"--calibration {args.calibration} holds no image files: give a folder of training "
                           "images to calibrate int8 on, or leave it out to use the run's own training images.")
    if args.out is not None:
        out = Path(args.out).expanduser()
        if out.is_dir() or out.suffix != ".onnx":
            raise LabError(f"--out {args.out} is not valid: give the file to write, ending in .onnx.")


def variant(args) -> str:
    """onnx, onnx-int8, onnx-pruned50, onnx-pruned50-structured-int8, ...: the run's and the file's name."""
    parts = [args.format]
    if args.prune is not None:
        parts.append(f"pruned{round(args.prune * 100):g}" + ("-structured" if args.structured else ""))
    if args.quantize:
        parts.append(args.quantize)
    if args.input != "uint8":
        parts.append(f"{args.input}-input")
    return "-".join(parts)


def load_data(cfg, run_id: str, with_module: bool):
    """(datamodule, the Classifier its config builds when with_module, else None): the test split scores the
    export, the training split calibrates and fine-tunes. Never downloads: the run's data must be on this
    machine. The Classifier (what fine-tuning trains) only when pruning: a net may load pretrained weights."""
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from lab.train import job

    with open_dict(cfg):
        if "download" in cfg.data:
            cfg.data.download = False
    try:
        if with_module:
            return job.build(cfg)
        datamodule = instantiate(cfg.data)
        datamodule.setup("fit")
        return datamodule, None
    except LabError as err:
        raise LabError(f"the data of run {run_id} (its test split scores the export; its training images "
                       f"calibrate int8 and fine-tune a pruned net) cannot be loaded: {err}") from err


def calibration_images(args, datamodule, shape: list[int]) -> torch.Tensor:
    """uint8 (N, C, H, W): --calibration's images decoded as `lab predict` decodes, else the run's first
    --calibration-size (default 256) training images (the split is a random permutation)."""
    if args.calibration is not None:
        x, _, _ = predict.read(predict.image_files([args.calibration]), shape)
        return x[: args.calibration_size] if args.calibration_size is not None else x
    n = 256 if args.calibration_size is None else args.calibration_size
    return datamodule.splits["train"].rows(slice(0, n))


def torch_probabilities(deployed: onnx_model.Deployed, x: torch.Tensor, input_type: str) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([deployed(torch.from_numpy(onnx_model.as_input(chunk, input_type)))
                          for chunk in x.split(256)]).numpy()


def torch_row(deployed: onnx_model.Deployed, x: torch.Tensor, y: torch.Tensor, input_type: str) -> Row:
    probs = torch_probabilities(deployed, x, input_type)
    one = torch.from_numpy(onnx_model.as_input(x[:1], input_type))
    threads = torch.get_num_threads()
    torch.set_num_threads(LATENCY_THREADS)
    try:
        with torch.no_grad():
            latency = measure.latency_ms(lambda: deployed(one), LATENCY_BUDGET_S)
    finally:
        torch.set_num_threads(threads)
    params, nonzero = pruning.parameter_counts(deployed.predictor)
    return Row("PyTorch (the run's model)", accuracy(probs, y), None, latency, params, nonzero)


def accuracy(probs: np.ndarray, y: torch.Tensor) -> float:
    return float((probs.argmax(1) == y.numpy()).mean())


def file_row(name: str, path: Path, x: torch.Tensor, y: torch.Tensor, input_type: str,
             net: torch.nn.Module) -> tuple[Row, np.ndarray]:
    """The file scored by ONNX Runtime on (x, y) and timed at batch 1; counts from the net it was made from."""
    sess = onnx_model.session(path)
    probs = onnx_model.probabilities(sess, x, input_type)
    one, timed = {onnx_model.INPUT: onnx_model.as_input(x[:1], input_type)}, onnx_model.session(path, LATENCY_THREADS)
    latency = measure.latency_ms(lambda: timed.run(None, one), LATENCY_BUDGET_S)
    params, nonzero = pruning.parameter_counts(net)
    return Row(name, accuracy(probs, y), path.stat().st_size / 1e6, latency, params, nonzero), probs


def float_file(name: str, deployed: onnx_model.Deployed, meta: dict, path: Path, x, y) -> tuple[Row, float]:
    """deployed written to path and checked against PyTorch on (x, y); (its row, the largest difference)."""
    onnx_model.write(deployed, meta, path)
    row, probs = file_row(name, path, x, y, meta["input_type"], deployed.predictor)
    diff = float(np.abs(probs - torch_probabilities(deployed, x, meta["input_type"])).max())
    if not diff <= PROB_TOLERANCE:
        raise LabError(f"the ONNX file's probabilities differ from PyTorch's by up to {diff:.2g} on the test split "
                       f"(more than {PROB_TOLERANCE:g}): ONNX Runtime runs this net differently; nothing was written.")
    return row, diff


def pruned_net(args, net: torch.nn.Module, cfg, datamodule, module, shape: list[int]) -> torch.nn.Module:
    """The logits net pruned as asked, fine-tuned --finetune-epochs (default 1) with the run's config."""
    cut = (pruning.structured(net, args.prune, shape) if args.structured else pruning.unstructured(net, args.prune))
    epochs = 1 if args.finetune_epochs is None else args.finetune_epochs
    if epochs:
        cut = pruning.finetune(cut, cfg, datamodule, module, epochs)
    return pruning.permanent(cut).eval()


def table(rows: list[Row]) -> str:
    """The rows, then the change from the float file (rows[1]) to the export (rows[-1])."""
    width = max(len(r.name) for r in rows) + 2
    lines = [f"{'model':<{width}}{'test acc':>9}{'size MB':>10}{'latency ms':>12}{'params':>11}{'non-zero':>11}"]
    for r in rows:
        size = f"{r.size_mb:.3f}" if r.size_mb is not None else "-"
        lines.append(f"{r.name:<{width}}{r.acc:>9.4f}{size:>10}{r.latency_ms:>12.3f}{r.params:>11,}{r.nonzero:>11,}")
    base, last = rows[1], rows[-1]
    if last is not base:
        lines.append(f"{'change':<{width}}{last.acc - base.acc:>+9.4f}{last.size_mb - base.size_mb:>+10.3f}"
                     f"{last.latency_ms - base.latency_ms:>+12.3f}{last.params - base.params:>+11,}"
                     f"{last.nonzero - base.nonzero:>+11,}")
    lines.append("latency: batch 1, median, one CPU thread (ONNX Runtime for the files); MB = 10^6 bytes on disk")
    return "\n".join(lines)


def metrics(rows: list[Row], diff: float) -> dict[str, float]:
    """export/* of the export (rows[-1]), export/original_* of the float file of the unchanged net (rows[1]),
    export/*_delta = export - original, export/torch_* of the PyTorch model."""
    base, last, torch_model = rows[1], rows[-1], rows[0]
    out = {"export/max_prob_diff": diff, "export/torch_acc": torch_model.acc,
           "export/torch_latency_ms": torch_model.latency_ms}
    for key, attr in (("acc", "acc"), ("size_mb", "size_mb"), ("latency_ms", "latency_ms"), ("params", "params"),
                      ("nonzero_params", "nonzero")):
        out[f"export/{key}"] = float(getattr(last, attr))
        out[f"export/original_{key}"] = float(getattr(base, attr))
        out[f"export/{key}_delta"] = float(getattr(last, attr) - getattr(base, attr))
    return out


def log(source, args, name: str, file: Path, rows: list[Row], diff: float, params: dict, text: str) -> str:
    """The export as a child run `export-NAME` of the source run (same experiment): metrics, params, the file
    and the comparison table as artifacts. Returns its run id."""
    from mlflow.entities import Metric, Param

    from lab.train import tracking

    uri = results.mlflow_uri()
    experiment = results.client().get_experiment(source.info.experiment_id).name
    tags = {"lab.command": "lab export " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["export"] else []),
            "lab.export.source_run": source.info.run_id, "lab.export.variant": name}
    with tracking.run(uri, experiment, f"export-{name}", source.info.run_id, tags) as (client, run_id):
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics(rows, diff).items()],
                         params=[Param(k, str(v)) for k, v in params.items()], synchronous=True)
        client.log_artifact(run_id, str(file))
        client.log_text(run_id, text + "\n", "export_comparison.txt")
    return run_id


def place(file: Path, out: Path) -> None:
    """file at out, whole or not at all: copied next to it under a hidden name, then renamed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.{os.getpid()}.partial"
    try:
        shutil.copyfile(file, partial)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)


def command(args) -> None:
    check(args)
    model = models.load(args.model, args.storage, args.sweep_out, args.study)
    if isinstance(model, onnx_model.OnnxModel):
        raise LabError(f"MODEL {args.model} is an exported file already: give the run it came from "
                       f"({model.run_id or 'its run id'}), which holds the weights and the data to score it on.")
    if not model.run_id:
        raise LabError(f"MODEL {args.model} names no MLflow run, so its data is unknown: give {models.VALID}.")
    mlflow_client = results.client()
    source = mlflow_client.get_run(model.run_id)
    cfg = rebuild.run_config(model.run_id, results.mlflow_uri())
    datamodule, module = load_data(cfg, model.run_id, with_module=args.prune is not None)
    name = variant(args)
    out = Path(args.out or f"{source.info.run_name or model.run_id}-{name}.onnx").expanduser()
    test = datamodule.splits["test"]
    x, y = test.x, test.y
    loss, shape, input_type = model.meta.get("loss", "cross_entropy"), list(model.meta["input_shape"]), args.input
    net = exported.logits_net(model.net).to("cpu").eval()
    meta = {**{k: model.meta[k] for k in ("class_names", "input_shape", "mean", "std", "loss", "data")},
            "input_type": input_type, "input_layout": "NCHW", "run_id": model.run_id, "variant": name,
            "net": source.data.tags.get("model", type(net).__name__)}

    def deployed(logits: torch.nn.Module) -> onnx_model.Deployed:
        return onnx_model.Deployed(exported.portable(logits, loss), meta["mean"], meta["std"], input_type).eval()

    with tempfile.TemporaryDirectory(prefix="lab-export-") as tmp:
        work = Path(tmp)
        original = deployed(net)
        rows = [torch_row(original, x, y, input_type)]
        row, diff = float_file("ONNX float", original, meta, work / "float.onnx", x, y)  # the rest: temporary
        rows.append(row)
        last = work / "float.onnx"
        params = {"format": args.format, "input": input_type, "quantize": args.quantize, "prune": args.prune,
                  "structured": args.structured, "finetune_epochs": None, "quantization": None,
                  "calibration_images": None}
        if args.prune is not None:
            cut = pruned_net(args, net, cfg, datamodule, module, shape)
            kind = "structured " if args.structured else ""
            row, diff = float_file(f"ONNX pruned {args.prune:.0%} {kind}".strip(), deployed(cut), meta,
                                   work / "pruned.onnx", x, y)
            rows.append(row)
            last = work / "pruned.onnx"
            params["finetune_epochs"] = 1 if args.finetune_epochs is None else args.finetune_epochs
        if args.quantize:
            how = quantize.method(last)
            calibration = calibration_images(args, datamodule, shape) if how == "static" else None
            quantize.int8(last, work / "int8.onnx", calibration, input_type, work)
            params["quantization"] = how
            params["calibration_images"] = len(calibration) if calibration is not None else None
            before = deployed(cut).predictor if args.prune is not None else original.predictor
            row, _ = file_row(f"{rows[-1].name.replace(' float', '')} int8 ({how})", work / "int8.onnx", x, y,
                              input_type, before)
            rows.append(row)
            last = work / "int8.onnx"
        drop = rows[1].acc - rows[-1].acc
        if args.max_acc_drop is not None and drop > args.max_acc_drop:
            raise LabError(f"the {name} export loses {drop:.4f} test accuracy ({rows[1].acc:.4f} -> "
                           f"{rows[-1].acc:.4f}), more than --max-acc-drop {args.max_acc_drop:g}: nothing was written; raise "
                           "--max-acc-drop, fine-tune longer (--finetune-epochs) or prune less.")
        final = work / out.name
        os.replace(last, final)
        text = table(rows)
        run_id = log(source, args, name, final, rows, diff, params, text)
        place(final, out)
    print(text)
    print(f"test split: {len(y)} images of run {model.run_id} (its test/acc: "
          f"{source.data.metrics.get('test/acc', float('nan')):.4f})")
    print(f"wrote {out}; logged as MLflow run {run_id} (export-{name}, a child of {model.run_id})")
