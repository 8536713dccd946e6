"""The test images the model got most wrong: misclassified.png (a grid) and misclassified.csv on the run.

Input: Classifier.test_samples (per test image, in test-set order: loss, true, predicted, probability of the
predicted class) and the test split's uint8 images. Kept: wrong predictions, highest loss first, at most
`per_class` per true class, so one confusable class does not fill the grid.
"""
import csv
import io
import math

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

DPI = 80
COLUMNS = ("rank", "index", "path", "true", "predicted", "probability", "loss")


def select(samples: dict[str, torch.Tensor], per_class: int) -> list[int]:
    """Test-set indices of the kept misclassified images, by loss descending (ties: lower index first)."""
    wrong = torch.nonzero(samples["predicted"] != samples["true"]).flatten().tolist()
    loss = samples["loss"].tolist()
    wrong.sort(key=lambda i: (-loss[i], i))
    kept, per_true = [], {}
    for i in wrong:
        c = int(samples["true"][i])
        if per_true.get(c, 0) < per_class:
            per_true[c] = per_true.get(c, 0) + 1
            kept.append(i)
    return kept


def rows(samples: dict[str, torch.Tensor], kept: list[int], class_names: list[str],
         paths: list[str] | None) -> list[dict]:
    return [{"rank": rank, "index": i, "path": paths[i] if paths is not None else "",
             "true": class_names[int(samples["true"][i])], "predicted": class_names[int(samples["predicted"][i])],
             "probability": round(float(samples["probability"][i]), 6), "loss": round(float(samples["loss"][i]), 6)}
            for rank, i in enumerate(kept, start=1)]


def table(records: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(records)
    return buf.getvalue()


def shrink(image: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """uint8 (C, H, W) -> uint8 (C, h, w), antialiased; unchanged when it has that size already."""
    if image.shape[1:] == (h, w):
        return image
    out = F.interpolate(image[None].float(), size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)


def grid(images: torch.Tensor, records: list[dict], columns: int = 8) -> Figure:
    """A matplotlib figure: one tile per record, titled 'true -> predicted (p=0.93)'. images: uint8 (N, C, H, W)
    of the test split as stored (before normalisation: nothing to undo). One mosaic drawn by one imshow: 80
    tiles as 80 Axes took ~1 s to draw, as one image ~0.1 s."""
    n = len(records)
    cols = min(columns, n)
    nrows = math.ceil(n / cols)
    tile = 1.4  # inches per tile's width: room for "T-shirt/top -> Ankle boot" at 7 pt
    c, h, w = images.shape[1:]
    # Tiles shrunk to the pixels they are drawn at (1.4 in x 80 dpi = 112): matplotlib would resample a 224-px
    # mosaic itself, through float64 RGBA copies (~250 MB for 40 tiles, per process, at once in a sweep).
    scale = min(1.0, round(tile * DPI) / max(h, w))
    h, w = max(1, round(h * scale)), max(1, round(w * scale))
    band = max(1, round(0.5 * h))  # white space above each tile for its two-line title
    pad = max(1, w // 10)
    canvas = torch.full((nrows * (band + h), cols * (w + pad), c), 255, dtype=torch.uint8)
    for k, r in enumerate(records):
        top, left = (k // cols) * (band + h) + band, (k % cols) * (w + pad)
        canvas[top : top + h, left : left + w] = shrink(images[r["index"]].cpu(), h, w).permute(1, 2, 0)  # (H, W, C)
    fig = Figure(figsize=(tile * cols, tile * nrows * (band + h) / w + 0.4), dpi=DPI)  # no pyplot state
    ax = fig.subplots()
    gray = c == 1
    ax.imshow((canvas[:, :, 0] if gray else canvas).numpy(), cmap="gray" if gray else None, vmin=0, vmax=255,
              interpolation="nearest")
    ax.axis("off")
    for k, r in enumerate(records):
        x, y = (k % cols) * (w + pad) + w / 2, (k // cols) * (band + h) + band - 0.5
        ax.text(x, y, f"{r['true']} -> {r['predicted']}\n(p={r['probability']:.2f})", ha="center", va="bottom",
                fontsize=7)
    ax.set_title(f"Misclassified test images, highest loss first ({n}; rows of {cols})", fontsize=9)
    fig.tight_layout()
    return fig


def log(client, run_id: str, samples: dict[str, torch.Tensor] | None, images: torch.Tensor,
        class_names: list[str], paths: list[str] | None, per_class: int) -> int:
    """Logs misclassified.csv (always, header only when nothing is wrong) and misclassified.png (when there is
    something to show); returns how many images were listed. per_class 0: nothing is logged."""
    if not per_class or samples is None:
        return 0
    if len(samples["true"]) > len(images):
        raise ValueError(f"{len(samples['true'])} test predictions for {len(images)} test images")
    # Fewer predictions than images: trainer.limit_test_batches tested the first batches of the split only.
    records = rows(samples, select(samples, per_class), class_names, paths)
    client.log_text(run_id, table(records), "misclassified.csv")
    if records:
        # PNG compression level 1: 80 tiles at level 6 (the default) took 0.6 s to encode, at 1 about a third.
        client.log_figure(run_id, grid(images, records), "misclassified.png",
                          save_kwargs={"dpi": DPI, "pil_kwargs": {"compress_level": 1}})
    return len(records)
