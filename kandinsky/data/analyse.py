"""A small deterministic analyser of shapes pictures: what does this picture show?

    pixels  -> nearest palette colour each (kandinsky.data.shapes.COLOURS)
    background = the most common colour of the border (2-pixel frame)
    mask       = pixels whose colour is not the background's
    colour     = the most common colour under the mask
    position   = the mask's centroid: "center" when within 0.1 W of the middle on both axes,
                 else the side of the larger offset (left / right / top / bottom)
    shape      = how much of its bounding box the mask fills: triangle 0.5 (0.54..0.65 once
                 drawn in pixels), circle 0.785, square 1.0 (boundaries 0.7 and 0.89)
    size       = the mask's area: small below 0.1 W^2 (between the biggest small shape, a
                 square 0.275 W wide: 0.076 W^2 (0.088 drawn), and the smallest large one, a
                 triangle 0.45 W wide: 0.10 W^2 (0.117 drawn))

``analyse(image) -> Analysis``; ``judge(analysis, stated) -> {attribute: correct}``.
The bounding box ignores rows and columns holding fewer than 2 mask pixels (stray pixels
of a generated picture do not stretch it). A picture with no mask pixels is "empty":
every attribute but the background is None (wrong).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import PIL.Image

from kandinsky.data.shapes import ATTRIBUTES, COLOURS

PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)  # (8, 3)
NAMES = list(COLOURS)
BORDER = 2  # pixels of the frame that decide the background
CENTER_BOX = 0.1  # |offset| below this on both axes (fraction of the side) = "center"
FILL_TRIANGLE_CIRCLE = 0.7  # fill ratio boundaries
FILL_CIRCLE_SQUARE = 0.89
LARGE_AREA = 0.1  # area / side^2 above which a shape is "large"


@dataclasses.dataclass
class Analysis:
    background: str
    colour: str | None
    shape: str | None
    size: str | None
    position: str | None
    centroid: tuple[float, float] | None  # (x, y), fractions of the side
    fill: float | None  # mask pixels / bounding-box pixels
    area: float  # mask pixels / all pixels

    def attributes(self) -> dict[str, str | None]:
        return {name: getattr(self, name) for name in ATTRIBUTES}


def to_array(image) -> np.ndarray:
    """PIL image, (H, W, 3) uint8 array or (3, H, W) float tensor in [-1, 1] or [0, 1] -> (H, W, 3) float32 0..255."""
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    array = np.asarray(image.detach().cpu().float() if hasattr(image, "detach") else image)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"image must be RGB (H, W, 3) or (3, H, W); got shape {array.shape}.")
    if array.dtype == np.uint8:
        return array.astype(np.float32)
    if array.min() < 0:  # [-1, 1]
        array = (array + 1) / 2
    return np.clip(array * 255, 0, 255).astype(np.float32)


def palette_indices(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) 0..255 -> (H, W) index of the nearest palette colour."""
    d = ((pixels[:, :, None, :] - PALETTE[None, None]) ** 2).sum(-1)  # (H, W, 8)
    return d.argmin(-1)


def classify_position(cx: float, cy: float) -> str:
    dx, dy = cx - 0.5, cy - 0.5
    if max(abs(dx), abs(dy)) < CENTER_BOX:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def classify_fill(fill: float) -> str:
    if fill < FILL_TRIANGLE_CIRCLE:
        return "triangle"
    return "circle" if fill < FILL_CIRCLE_SQUARE else "square"


def analyse(image) -> Analysis:
    """Classify the picture's background, shape colour, shape, size and position."""
    index = palette_indices(to_array(image))  # (H, W)
    H, W = index.shape
    frame = np.ones_like(index, dtype=bool)
    frame[BORDER:-BORDER, BORDER:-BORDER] = False
    background = int(np.bincount(index[frame], minlength=len(NAMES)).argmax())
    mask = index != background
    area = float(mask.sum())
    if area == 0:
        return Analysis(NAMES[background], None, None, None, None, None, None, 0.0)
    colour = int(np.bincount(index[mask], minlength=len(NAMES)).argmax())
    ys, xs = np.nonzero(mask)
    centroid = ((xs.mean() + 0.5) / W, (ys.mean() + 0.5) / H)
    rows = np.nonzero(mask.sum(1) >= 2)[0]
    cols = np.nonzero(mask.sum(0) >= 2)[0]
    if len(rows) and len(cols):
        box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
        fill = float(mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].sum() / box)
    else:  # a scatter of single pixels: no shape
        fill = 0.0
    return Analysis(
        background=NAMES[background],
        colour=NAMES[colour],
        shape=classify_fill(fill),
        size="large" if area / (H * W) > LARGE_AREA else "small",
        position=classify_position(*centroid),
        centroid=(float(centroid[0]), float(centroid[1])),
        fill=fill,
        area=area / (H * W),
    )


def judge(analysis: Analysis, stated: dict[str, str]) -> dict[str, bool]:
    """{attribute: the analysis agrees} for each attribute ``stated`` names."""
    found = analysis.attributes()
    return {name: found[name] == value for name, value in stated.items()}
