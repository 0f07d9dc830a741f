"""The loss curve of log.csv as a PNG, drawn with pillow (log-scale loss over steps)."""
from __future__ import annotations

import csv
import math
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = (640, 400)
MARGIN = (60, 20, 20, 40)  # left, top, right, bottom


def read_log(path: Path) -> tuple[list[int], list[float]]:
    steps, values = [], []
    if not Path(path).is_file():
        return steps, values
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            loss = float(row["loss"])
            if math.isfinite(loss) and loss > 0:
                steps.append(int(row["step"]))
                values.append(loss)
    return steps, values


def smooth(values: list[float], window: int) -> list[float]:
    """Running mean over the last ``window`` values."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_loss_curve(log: Path, png: Path) -> Path | None:
    """Draw ``log``'s loss (grey) and its running mean (blue) against the step, loss on a log axis."""
    steps, values = read_log(log)
    if not steps:
        return None
    W, H = SIZE
    left, top, right, bottom = MARGIN
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    lo, hi = math.log10(min(values)), math.log10(max(values))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    s0, s1 = steps[0], max(steps[-1], steps[0] + 1)

    def xy(step: int, value: float) -> tuple[float, float]:
        x = left + (step - s0) / (s1 - s0) * (W - left - right)
        y = top + (hi - math.log10(value)) / (hi - lo) * (H - top - bottom)
        return x, y

    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    for decade in range(math.floor(lo), math.ceil(hi) + 1):  # grid lines at powers of ten
        if lo <= decade <= hi:
            y = xy(s0, 10.0**decade)[1]
            draw.line([left, y, W - right, y], fill=(220, 220, 220))
            draw.text((4, y - 6), f"1e{decade}", fill="black")
    draw.text((4, top - 6 if top > 6 else 0), f"{10 ** hi:.3g}", fill="black")
    draw.text((4, H - bottom - 6), f"{10 ** lo:.3g}", fill="black")
    draw.text((left, H - bottom + 6), f"step {s0}", fill="black")
    draw.text((W - right - 80, H - bottom + 6), f"step {steps[-1]}", fill="black")
    draw.text((W // 2 - 40, H - 16), "loss (log scale)", fill="black")
    if len(steps) > 1:
        draw.line([xy(s, v) for s, v in zip(steps, values)], fill=(170, 170, 170), width=1)
        window = max(1, len(values) // 50)
        draw.line([xy(s, v) for s, v in zip(steps, smooth(values, window))], fill=(30, 80, 200), width=2)
    else:
        x, y = xy(steps[0], values[0])
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(30, 80, 200))
    png = Path(png)
    tmp = png.with_name(png.name + ".tmp")
    image.save(tmp, format="PNG")
    tmp.replace(png)
    return png
