"""Training data: a folder of images with captions, read once and encoded with the frozen models.

Two caption conventions (the ones people already use):

    data/metadata.jsonl     one JSON object per line: {"file_name": "a.png", "text": "a red cat"}
                            (the Hugging Face ``imagefolder`` layout; paths relative to data/)
    data/a.png + a.txt      a text file with the caption beside each image (when there is no
                            metadata.jsonl)

Bad items (an unreadable image, a missing or empty caption, an image smaller than
``min_size`` on its shorter side, a metadata line that is not JSON or names no file) are
reported with the file name; ``on_bad="error"`` refuses the folder listing every problem,
``on_bad="skip"`` trains without them and says which. Nothing is dropped silently (hidden
files and folders, names starting with ".", are not data and are not read).

The models never see pixels during training: each image is encoded once, by the frozen
encoders, into what its loss needs:

    prior      image_embeds (N, D) CLIP image embedding; text_embeds (N, D),
               text_hidden (N, 77, D), text_mask (N, 77): CLIP text encoding of the caption
    decoder    latents (N, 4, R/8, R/8) MoVQ latents of the image resized (shorter side R,
               bicubic) and centre-cropped to R x R; image_embeds (N, D)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA = "metadata.jsonl"
ON_BAD = ("error", "skip")


class DataError(ValueError):
    """The data folder cannot be used as it is (the message lists each bad item)."""


@dataclasses.dataclass(frozen=True)
class Item:
    path: Path
    text: str


# --------------------------------------------------------------------------------------
# Reading the folder
# --------------------------------------------------------------------------------------


def _image_problem(path: Path, min_size: int) -> str | None:
    try:
        with PIL.Image.open(path) as image:
            image.load()
            size = image.size
    except Exception as e:  # PIL raises many types for broken files
        return f"unreadable image ({type(e).__name__}: {e})"
    if min(size) < min_size:
        return f"too small ({size[0]}x{size[1]}; the shorter side must be >= {min_size}: pass --min-size to allow it)"
    return None


def _captions_from_metadata(folder: Path, problems: list[str]) -> dict[Path, str]:
    captions = {}
    for n, line in enumerate((folder / METADATA).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{METADATA} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: not JSON ({e.msg})")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            problems.append(f"{where}: no \"file_name\" string")
            continue
        path = folder / row["file_name"]
        if not path.is_file():
            problems.append(f"{row['file_name']}: listed in {METADATA} ({where}) but not found")
            continue
        text = row.get("text")
        captions[path.resolve()] = text if isinstance(text, str) else None
    return captions


def scan_folder(folder, *, need_text: bool = True, min_size: int = 0, on_bad: str = "error", log=None) -> list[Item]:
    """The usable (image, caption) items of ``folder``, sorted by file name.

    ``need_text=False`` (the decoder, which learns from images only) accepts images without
    a caption (text ""). See the module doc for the layouts and ``on_bad``.
    """
    if on_bad not in ON_BAD:
        raise ValueError(f"on_bad={on_bad!r}: expected one of {ON_BAD}.")
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist (expected images with {METADATA} or .txt captions).")
    log = log or (lambda message: print(message, file=sys.stderr))
    problems: list[str] = []
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(folder).parts))  # hidden: not data
    metadata = (folder / METADATA).is_file()
    captions = _captions_from_metadata(folder, problems) if metadata else {}

    items = []
    for path in images:
        name = str(path.relative_to(folder))
        problem = _image_problem(path, min_size)
        if metadata:
            text = captions.get(path.resolve(), "")
            missing = path.resolve() not in captions and f"no caption (not listed in {METADATA})"
        else:
            txt = path.with_suffix(".txt")
            text = txt.read_text(encoding="utf-8").strip() if txt.is_file() else None
            missing = text is None and f"no caption ({txt.name} not found)"
        if need_text and not problem:
            if missing:
                problem = missing
            elif text is None or not text.strip():
                problem = "empty caption"
        if problem:
            problems.append(f"{name}: {problem}")
        else:
            items.append(Item(path, (text or "").strip()))

    if problems and on_bad == "error":
        shown = "\n  ".join(problems[:20]) + (f"\n  ... ({len(problems)} in all)" if len(problems) > 20 else "")
        raise DataError(f"{len(problems)} bad item(s) in {folder}:\n  {shown}\n"
                        "Fix or remove them, or pass --on-bad-data skip to train without them.")
    for problem in problems:
        log(f"skipped {problem}")
    if not items:
        raise DataError(f"no usable images in {folder} ({len(images)} image file(s) found; "
                        f"expected {', '.join(IMAGE_SUFFIXES)} with {METADATA} or .txt captions).")
    if problems:
        log(f"training on {len(items)} item(s) of {folder}; skipped {len(problems)} (listed above)")
    return items


def fingerprint(items: list[Item], *extra) -> str:
    """A hash of the file names, sizes, modification times, captions and ``extra`` (for the cache)."""
    h = hashlib.sha256()
    for item in items:
        stat = item.path.stat()
        h.update(f"{item.path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{item.text}\n".encode())
    h.update(repr(extra).encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------


def load_rgb(path: Path) -> PIL.Image.Image:
    """The picture upright (EXIF orientation applied, as a viewer shows it), in RGB."""
    with PIL.Image.open(path) as image:
        return PIL.ImageOps.exif_transpose(image).convert("RGB")


def movq_pixels(image: PIL.Image.Image, resolution: int) -> torch.Tensor:
    """Shorter side to ``resolution`` (bicubic), centre crop, [-1, 1]. -> (3, R, R)"""
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    image = image.resize(size, resample=PIL.Image.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)  # (R, R, 3)
    return x.permute(2, 0, 1)


# --------------------------------------------------------------------------------------
# Encoding with the frozen models
# --------------------------------------------------------------------------------------


def _batches(items: list[Item], size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def encode_prior_data(items, text_encoder, tokenizer, image_encoder, image_processor, device, batch: int = 16):
    """Text and image encodings of the items (see the module doc), float32 on the CPU."""
    out = {"image_embeds": [], "text_embeds": [], "text_hidden": [], "text_mask": []}
    for chunk in _batches(items, batch):
        pixels = image_processor([load_rgb(i.path) for i in chunk])  # (b, 3, S, S)
        out["image_embeds"].append(image_encoder(pixels.to(device, image_encoder.dtype)).float().cpu())
        ids, mask = tokenizer([i.text for i in chunk])  # (b, 77) each
        enc = text_encoder(ids.to(device))  # causal only, as the sampler encodes prompts
        out["text_embeds"].append(enc.text_embeds.float().cpu())
        out["text_hidden"].append(enc.last_hidden_state.float().cpu())
        out["text_mask"].append(mask.bool())
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def encode_decoder_data(items, movq, image_encoder, image_processor, resolution: int, device, batch: int = 16):
    """MoVQ latents and CLIP image embeddings of the items, float32 on the CPU."""
    out = {"latents": [], "image_embeds": []}
    for chunk in _batches(items, batch):
        images = [load_rgb(i.path) for i in chunk]
        pixels = torch.stack([movq_pixels(im, resolution) for im in images])  # (b, 3, R, R)
        out["latents"].append(movq.encode(pixels.to(device, movq.dtype)).float().cpu())  # (b, 4, R/8, R/8)
        clip = image_processor(images)  # (b, 3, S, S)
        out["image_embeds"].append(image_encoder(clip.to(device, image_encoder.dtype)).float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def random_keep_masks(batch: int, h: int, w: int, generator) -> torch.Tensor:
    """Inpainting training masks at latent resolution: 1 = keep, 0 = repaint. (B, 1, h, w)

    Each row repaints one random rectangle covering 1/16 to all of each side.
    """
    sizes = torch.rand(batch, 2, generator=generator)  # (B, 2)
    corners = torch.rand(batch, 2, generator=generator)
    keep = torch.ones(batch, 1, h, w)
    for b in range(batch):
        rh = max(1, round(h * (1 / 16 + sizes[b, 0].item() * 15 / 16)))
        rw = max(1, round(w * (1 / 16 + sizes[b, 1].item() * 15 / 16)))
        top, left = int(corners[b, 0].item() * (h - rh + 1)), int(corners[b, 1].item() * (w - rw + 1))
        keep[b, :, top : top + rh, left : left + rw] = 0
    return keep
