"""confusion_matrix.png drawn as one image with Pillow (matplotlib's font and Blues colours): every run logs one,
and matplotlib's version (sklearn's ConfusionMatrixDisplay, a Text artist per cell, tight_layout drawing it all
twice) took 0.3-0.6 s for 10 classes on this 2-core machine, a quarter of a stacked digits member's whole
run; this one takes ~10 ms.

Input: the (K, K) confusion matrix as lists of ints (rows: true class, columns: predicted) and the K class names.
"""
from functools import cache

from matplotlib import colormaps, font_manager
from PIL import Image, ImageDraw, ImageFont

TITLE = "Test confusion matrix (rows: true class)"
PAD = 8  # px between the parts


@cache
def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


def text_box(draw: ImageDraw.ImageDraw, text: str, size: int) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font(size))
    return right - left, bottom - top


def turned(text: str, size: int, angle: float) -> Image.Image:
    """The text in black on a transparent image, turned by angle degrees (counter-clockwise)."""
    w, h = text_box(ImageDraw.Draw(Image.new("L", (1, 1))), text, size)
    tile = Image.new("RGBA", (w + 4, h + 6), (255, 255, 255, 0))
    ImageDraw.Draw(tile).text((2, 0), text, font=font(size), fill="black")
    return tile.rotate(angle, expand=True, resample=Image.Resampling.BICUBIC)


def image(confusion: list[list[int]], classes: list[str]) -> Image.Image:
    """The matrix as an RGB image: one coloured cell per count with the count in it, class names along both
    axes (the predicted ones turned 45 degrees), axis labels and the title."""
    k = len(classes)
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    counts = [[int(v) for v in row] for row in confusion]
    high = max((v for row in counts for v in row), default=0)
    low = min((v for row in counts for v in row), default=0)
    cell = max(36, max((text_box(probe, str(v), 13)[0] for row in counts for v in row), default=0) + 12)
    names = [turned(c, 12, 45) for c in classes]
    true_label, predicted_label = turned("True label", 13, 90), turned("Predicted label", 13, 0)
    left = true_label.width + PAD + max((text_box(probe, c, 12)[0] for c in classes), default=0) + PAD
    top = text_box(probe, TITLE, 14)[1] + 2 * PAD
    below = max((n.height for n in names), default=0) + predicted_label.height + 2 * PAD
    width = max(left + k * cell + 2 * PAD, text_box(probe, TITLE, 14)[0] + 2 * PAD)
    canvas = Image.new("RGB", (width, top + k * cell + below), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((width // 2, PAD), TITLE, font=font(14), fill="black", anchor="mt")
    blues = colormaps["Blues"]
    middle = (high + low) / 2
    for i, row in enumerate(counts):
        for j, v in enumerate(row):
            x, y = left + j * cell, top + i * cell
            shade = blues((v - low) / (high - low) if high > low else 0.0)
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=tuple(round(255 * c) for c in shade[:3]))
            draw.text((x + cell // 2, y + cell // 2), str(v), font=font(13), anchor="mm",
                      fill="white" if v > middle else "black")
    for i, name in enumerate(classes):  # true classes down the left, right-aligned against the cells
        draw.text((left - PAD, top + i * cell + cell // 2), name, font=font(12), fill="black", anchor="rm")
    for j, name in enumerate(names):  # predicted classes below, each ending under its column's centre
        canvas.paste(name, (left + j * cell + cell // 2 - name.width + 6, top + k * cell + PAD), name)
    canvas.paste(true_label, (PAD // 2, top + (k * cell - true_label.height) // 2), true_label)
    canvas.paste(predicted_label, (left + (k * cell - predicted_label.width) // 2,
                                   canvas.height - predicted_label.height - PAD // 2), predicted_label)
    return canvas
