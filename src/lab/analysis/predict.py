"""`lab predict MODEL IMAGE_OR_FOLDER...`: classify image files with a trained model.

Images are decoded as training decodes an image folder (lab.data.decode.decode: the model's channels, resized
to its input side, antialiased), then /255 and (x - mean) / std with the training set's statistics.
"""
import csv
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS

from lab.analysis import models
from lab.data.decode import decode
from lab.errors import LabError
from lab.train import metrics


def image_files(inputs: list[str]) -> list[Path]:
    """Files as given (any extension: the user named them), folders walked recursively for image extensions."""
    files = []
    for given in inputs:
        path = Path(given).expanduser()
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        elif path.exists():
            files.append(path)
        else:
            raise LabError(f"{given} does not exist: give image files or folders of images "
                           f"({', '.join(IMG_EXTENSIONS)}).")
    return files


def read(files: list[Path], shape: list[int]) -> tuple[torch.Tensor, list[Path], list[Path]]:
    """(uint8 (N, C, H, W) of the readable files, those files, the unreadable ones)."""
    channels, side = int(shape[0]), int(shape[1])  # lab's datasets are square: data.image_size is one side
    threads = min(16, os.cpu_count() or 1)  # libjpeg decoding releases the GIL
    with ThreadPoolExecutor(threads) as pool:
        images = list(pool.map(lambda f: decode(str(f), side, channels), files))
    good = [(f, img) for f, img in zip(files, images) if img is not None]
    bad = [f for f, img in zip(files, images) if img is None]
    x = torch.stack([img for _, img in good]) if good else torch.zeros(0, channels, side, side, dtype=torch.uint8)
    return x, [f for f, _ in good], bad


def top_k(probs: torch.Tensor, class_names: list[str], k: int) -> list[list[tuple[str, float]]]:
    values, idx = probs.topk(min(k, probs.shape[1]), dim=1)
    return [[(class_names[i], float(v)) for v, i in zip(vs, ix)] for vs, ix in zip(values.tolist(), idx.tolist())]


def write_csv(path: Path, files: list[Path], tops: list[list[tuple[str, float]]], k: int) -> None:
    """file, predicted, probability, then top1, p1 ... topK, pK."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "w", newline="")  # noqa: SIM115 - closed by the with below
    except (IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError) as err:
        raise LabError(f"--out {path} cannot be written ({err.strerror}): give a CSV file path in a folder you "
                       "can write to.") from err
    with f:
        writer = csv.writer(f)
        writer.writerow(["file", "predicted", "probability", *[c for i in range(1, k + 1) for c in (f"top{i}", f"p{i}")]])
        for file, top in zip(files, tops):
            writer.writerow([str(file), top[0][0], f"{top[0][1]:.6f}", *[v for name, p in top for v in (name, f"{p:.6f}")]])


def folder_accuracy(files: list[Path], probs: torch.Tensor, class_names: list[str]) -> tuple[int, float, int] | None:
    """Over the files that lie in a folder named after a class (a test set laid out as training reads one):
    (those files, their accuracy against the folder names as a run's test computes it, files left out); None
    when there are none. probs: (N, K), a row per file."""
    index = {name: i for i, name in enumerate(class_names)}
    rows = [(i, index[f.parent.name]) for i, f in enumerate(files) if f.parent.name in index]
    if not rows:
        return None
    kept, labels = (torch.tensor(column) for column in zip(*rows))
    values, _ = metrics.scores(probs[kept], labels, class_names)
    return len(rows), values["acc"], len(files) - len(rows)


def command(args) -> None:
    if args.top < 1:
        raise LabError(f"--top={args.top} is not valid: give how many classes to list per image, 1 or more.")
    files = image_files(args.images)
    if not files:
        raise LabError(f"no image files in {' '.join(args.images)} (extensions {', '.join(IMG_EXTENSIONS)}).")
    if args.out and Path(args.out).is_dir():  # before minutes of loading and predicting
        raise LabError(f"--out {args.out} is a folder: give the CSV file to write, e.g. {Path(args.out) / 'predictions.csv'}.")
    model = models.load(args.model, args.storage, args.sweep_out, args.study)
    started = time.perf_counter()
    x, files, bad = read(files, model.meta["input_shape"])
    decoded = time.perf_counter()
    if not files:
        raise LabError(f"none of the {len(bad)} file(s) given is a readable image: {', '.join(map(str, bad[:5]))}"
                       f"{' ...' if len(bad) > 5 else ''}.")
    probs = model.probabilities(x)
    done = time.perf_counter()
    tops = top_k(probs, model.class_names, args.top)
    width = max(len(str(f)) for f in files)
    print(f"{'file':<{width}}  {'predicted':<12} {'prob':>6}  top {args.top}")
    for file, top in zip(files, tops):
        rest = ", ".join(f"{name} {p:.3f}" for name, p in top)
        print(f"{str(file):<{width}}  {top[0][0]:<12} {top[0][1]:>6.3f}  {rest}")
    print(f"model: {model.source}" + (f" (run {model.run_id})" if model.run_id and model.run_id not in model.source else ""))
    print(f"{len(files)} image(s) in {done - started:.2f} s (decoding {decoded - started:.2f} s, "
          f"model {done - decoded:.2f} s on {model.device_name})")
    scored = folder_accuracy(files, probs, model.class_names)
    if scored:
        left = f"; {scored[2]} not in a class folder, not counted" if scored[2] else ""
        print(f"accuracy against the class folders the files are in: {scored[1]:.4f} ({scored[0]} images{left})")
    if args.out:
        write_csv(Path(args.out), files, tops, min(args.top, len(model.class_names)))
        print(f"wrote {args.out}")
    if bad:
        print(f"{len(bad)} file(s) could not be read as images and were left out:", file=sys.stderr)
        for f in bad:
            print(f"  {f}", file=sys.stderr)
