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
from PIL import Image, ImageDraw

from lab.train import confusion

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


TILE = 112  # px, a tile's longer side
FONT = 10  # px, the tiles' titles


def tile(image: torch.Tensor, h: int, w: int) -> Image.Image:
    """uint8 (C, H, W) as a Pillow image h x w: shrunk antialiased (224-px photos), or enlarged with square
    pixels (8-px digits), as matplotlib's imshow(interpolation="nearest") showed them."""
    small = image.shape[1] > h or image.shape[2] > w
    pixels = (shrink(image, h, w) if small else image).permute(1, 2, 0).contiguous().numpy()  # (H, W, C)
    picture = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    return picture if picture.size == (w, h) else picture.resize((w, h), Image.Resampling.NEAREST)


def grid(images: torch.Tensor, records: list[dict], columns: int = 8) -> Image.Image:
    """One image: a tile per record, titled 'true -> predicted' and '(p=0.93)' above it, rows of `columns`.
    images: uint8 (N, C, H, W) of the test split as stored (before normalisation: nothing to undo). Drawn with
    Pillow (matplotlib's font): as a matplotlib figure, a text artist per tile took 0.15-0.35 s per run to lay
    out and render on this 2-core machine, as many as a stack of 8 digits MLPs spent on 50 of its steps."""
    n = len(records)
    cols = min(columns, n)
    nrows = math.ceil(n / cols)
    c, h, w = images.shape[1:]
    scale = TILE / max(h, w)
    h, w = max(1, round(h * scale)), max(1, round(w * scale))
    font = confusion.font(FONT)
    titles = [(f"{r['true']} -> {r['predicted']}", f"(p={r['probability']:.2f})") for r in records]
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    widest = max(probe.textbbox((0, 0), line, font=font)[2] for t in titles for line in t)
    column = max(w, widest) + 10  # px per column, tile and title
    band = 2 * FONT + 8  # px above each tile for its two-line title
    heading = f"Misclassified test images, highest loss first ({n}; rows of {cols})"
    top = FONT + 16
    mode = "L" if c == 1 else "RGB"
    canvas = Image.new(mode, (max(cols * column, probe.textbbox((0, 0), heading, font=confusion.font(FONT + 2))[2] + 10),
                              top + nrows * (band + h) + 4), 255 if c == 1 else (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((canvas.width // 2, 4), heading, font=confusion.font(FONT + 2), fill=0 if c == 1 else "black",
              anchor="mt")
    for k, (r, (first, second)) in enumerate(zip(records, titles)):
        x, y = (k % cols) * column, top + (k // cols) * (band + h)
        canvas.paste(tile(images[r["index"]].cpu(), h, w), (x + (column - w) // 2, y + band))
        ink = 0 if c == 1 else "black"
        draw.text((x + column // 2, y + band - 2), f"{first}\n{second}", font=font, fill=ink, anchor="md",
                  align="center")
    return canvas


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
        client.log_image(run_id, grid(images, records), artifact_file="misclassified.png")
    return len(records)
