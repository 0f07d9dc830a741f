"""The studio's picture logic, without Gradio: uploads read safely, masks from brush strokes, feathering,
"only the masked area" (crop around the mask, paste back) and outpainting.

    image = open_upload(path, "image")                    # refuses non-pictures and decompression bombs
    mask = mask_from_layers(layers, image.size)           # L, 255 where any painted layer is opaque
    box = crop_box(mask, padding=32, aspect=1.0)          # (left, top, right, bottom) around the mask
    out = paste_back(image, generated, feather(mask, 4), box)   # the rest of `image` kept exactly
    bigger, new_area = outpaint(image, left=32, right=0, top=0, bottom=0)

Masks follow the Python API: an ``L`` picture, white (255) = repaint, black (0) = keep. Compositing is
``PIL.Image.composite``: where the (feathered) mask is 0 the original pixel is kept bit for bit.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageFilter
import PIL.ImageOps

MAX_PIXELS = 4096 * 4096  # the default upload limit (--max-pixels): larger pictures are refused before decoding


class UploadError(ValueError):
    """An upload the studio refuses (not a picture, too many pixels, a mask of another size)."""


def open_upload(path, what: str = "image", max_pixels: int = MAX_PIXELS) -> PIL.Image.Image:
    """The uploaded picture, decoded and turned upright by its EXIF orientation. Its size is read from the
    header and checked against ``max_pixels`` BEFORE the pixels are decoded (a decompression bomb never
    unpacks); the message names the upload (``what``), never a server path."""
    if path is None or path == "":
        raise UploadError(f"no {what} given: upload a picture (PNG, JPEG, WebP, ...)")
    name = Path(str(path)).name
    try:
        with PIL.Image.open(path) as header:
            width, height = header.size
            if width * height > max_pixels:
                raise UploadError(
                    f"the {what} is {width} x {height} = {width * height:,} pixels, more than this studio reads "
                    f"({max_pixels:,}, kandinsky serve --max-pixels): make it smaller first")
            header.load()
            image = PIL.ImageOps.exif_transpose(header)
    except UploadError:
        raise
    except PIL.Image.DecompressionBombError as e:  # PIL's own limit, met before ours when ours is higher
        raise UploadError(f"the {what} has more pixels than this studio reads ({max_pixels:,}, kandinsky serve "
                          f"--max-pixels), and more than is safe to decode ({e}): make it smaller first") from None
    except PIL.UnidentifiedImageError:
        raise UploadError(f"the {what} ({name}) is not a picture this studio can read: upload a PNG, JPEG, "
                          "WebP, BMP or TIFF file") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt files
        raise UploadError(f"the {what} ({name}) cannot be decoded: {e}") from None
    return image


def mask_from_layers(layers, size: tuple[int, int]) -> PIL.Image.Image:
    """The repaint mask of an image editor's painted layers: 255 wherever any layer is not fully
    transparent (whatever the brush colour), else 0; ``size`` (W, H) is the picture's (layers of another
    size are scaled to it, nearest)."""
    mask = np.zeros(size[::-1], dtype=bool)  # (H, W)
    for layer in layers or ():
        if layer is None:
            continue
        layer = layer if isinstance(layer, PIL.Image.Image) else PIL.Image.fromarray(np.asarray(layer))
        alpha = layer.getchannel("A") if "A" in layer.getbands() else layer.convert("L")
        if alpha.size != tuple(size):
            alpha = alpha.resize(size, PIL.Image.NEAREST)
        mask |= np.asarray(alpha) > 0
    return PIL.Image.fromarray(mask.astype(np.uint8) * 255)


def binary_mask(mask: PIL.Image.Image) -> PIL.Image.Image:
    """An uploaded mask read as the Python API reads masks (kandinsky.pipelines.images.load_masks: any mode,
    16-bit, transparency = keep, colour by its brightest channel, binarised at one half): L, 255 = repaint."""
    from kandinsky.pipelines.images import load_masks

    repaint = load_masks(mask, mask.height, mask.width)[0, 0].numpy()  # (H, W) in {0, 1}
    return PIL.Image.fromarray((repaint * 255).astype(np.uint8))


def feather(mask: PIL.Image.Image, radius: float) -> PIL.Image.Image:
    """The mask with soft edges: a Gaussian blur of ``radius`` pixels (0: unchanged)."""
    if radius < 0:
        raise UploadError(f"mask blur must be 0 or more pixels, got {radius}")
    return mask.filter(PIL.ImageFilter.GaussianBlur(radius)) if radius > 0 else mask


def crop_box(mask: PIL.Image.Image, padding: int = 32, aspect: float | None = None) -> tuple[int, int, int, int]:
    """(left, top, right, bottom): the mask's bounding box grown by ``padding`` pixels on each side and,
    given ``aspect`` (width / height of the generation), widened or heightened to that shape, all within the
    picture. An empty mask is an error."""
    bbox = mask.getbbox()
    if bbox is None:
        raise UploadError("the mask is empty: paint over the area to repaint (or upload a mask, white = repaint)")
    W, H = mask.size
    left, top, right, bottom = bbox[0] - padding, bbox[1] - padding, bbox[2] + padding, bbox[3] + padding
    if aspect is not None:
        w, h = right - left, bottom - top
        if w / h < aspect:  # too tall: widen
            grow = round(h * aspect) - w
            left, right = left - grow // 2, right + grow - grow // 2
        else:  # too wide: heighten
            grow = round(w / aspect) - h
            top, bottom = top - grow // 2, bottom + grow - grow // 2
    # slide back inside the picture, then clip what still sticks out
    dx = max(0, -left) - max(0, right - W)
    dy = max(0, -top) - max(0, bottom - H)
    left, right, top, bottom = left + dx, right + dx, top + dy, bottom + dy
    return max(0, left), max(0, top), min(W, right), min(H, bottom)


def paste_back(original: PIL.Image.Image, generated: PIL.Image.Image, mask: PIL.Image.Image,
               box: tuple[int, int, int, int] | None = None) -> PIL.Image.Image:
    """``generated`` (the whole picture, or the crop ``box``, at any size: scaled back with Lanczos) over
    ``original`` through ``mask`` (L, the original's size; feathered or not): the original's pixels are kept
    exactly where the mask is 0."""
    original = original.convert("RGB")
    box = box or (0, 0, *original.size)
    size = (box[2] - box[0], box[3] - box[1])
    layer = original.copy()
    layer.paste(generated.convert("RGB").resize(size, PIL.Image.LANCZOS) if generated.size != size
                else generated.convert("RGB"), box[:2])
    return PIL.Image.composite(layer, original, mask.convert("L"))


def outpaint(image: PIL.Image.Image, left: int = 0, right: int = 0, top: int = 0,
             bottom: int = 0) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """The canvas extended by the given pixels on each side (the new area repeats the nearest edge pixels,
    a start the model repaints) and its mask: 255 on the new area, 0 on the picture."""
    sides = (left, right, top, bottom)
    if any(int(s) != s or s < 0 for s in sides):
        raise UploadError(f"outpainting extends by whole pixels, 0 or more: got left, right, top, bottom = {sides}")
    left, right, top, bottom = map(int, sides)
    pixels = np.asarray(image.convert("RGB"))  # (H, W, 3)
    grown = np.pad(pixels, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(grown.shape[:2], 255, dtype=np.uint8)
    mask[top:top + pixels.shape[0], left:left + pixels.shape[1]] = 0
    return PIL.Image.fromarray(grown), PIL.Image.fromarray(mask)


def grow_mask(mask: PIL.Image.Image, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0) -> PIL.Image.Image:
    """A mask for the canvas ``outpaint`` extends: the new area white (repaint), the mask kept inside."""
    return PIL.ImageOps.expand(mask.convert("L"), border=(left, top, right, bottom), fill=255)
