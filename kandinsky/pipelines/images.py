"""Images in and out of the decoder pipelines: conversion, masks, output formats.

Input conventions (the same for every task):

* ``PIL.Image``: any mode; it is converted to RGB with ``Image.convert("RGB")``,
  which DROPS an alpha channel (transparent pixels keep whatever colour they
  store) and repeats a grayscale channel. High-bit-depth grayscale pictures
  (modes ``I;16*`` and ``I``, e.g. a 16-bit depth PNG) are read as 0..65535 and
  mode ``F`` as floats in [0, 1], instead of PIL's conversion, which clips at 255.
* ``numpy`` arrays: channels last, ``(H, W, 3)`` or ``(B, H, W, 3)``.
* ``torch`` tensors: channels first, ``(3, H, W)`` or ``(B, 3, H, W)``.
* Values: ``uint8`` arrays/tensors are read as 0..255, ``uint16`` as 0..65535;
  float arrays/tensors must lie in [0, 1] (a [-1, 1] image is refused, not guessed).
* Arrays and tensors must have exactly 3 channels: one channel (grayscale) or four
  (RGBA, or latents) are REFUSED with an error saying how to convert, because an
  array does not say what its channels mean. Control hints (depth maps) are the
  exception: a one-channel hint is repeated to three channels.
* Lists of any of the above are stacked into a batch.

Masks (inpainting): white / 1 = repaint, black / 0 = keep.

* ``PIL.Image`` masks are converted to ``"L"`` and read as 0..255 (16-bit ones as
  0..65535, see above).
* ``numpy`` / ``torch`` masks: ``(H, W)``, ``(B, H, W)`` or ``(B, 1, H, W)``, bool,
  integer or float, with values in [0, 1] (a 0/255 mask is refused with a hint);
  numpy masks may also be channels last, ``(H, W, 1)`` or ``(B, H, W, 1)``, and colour
  masks are one mask per picture by their brightest channel: numpy ``(H, W, 3)`` /
  ``(B, H, W, 3)``, torch ``(3, H, W)`` / ``(B, 3, H, W)`` (see "masks in" below).
* Masks are binarised at 0.5, as in the reference, unless nothing in the mask reaches 0.5 (a
  mask painted only in dark colours): then at half its brightest value (see "masks in" below).
* An input's size (H, W) is read by the same layout rules as its values
  (:func:`input_size`): the loaders resize by it and :func:`check_same_size` compares
  an image's and its mask's.

Resizing (only where the input size differs from the requested one): PIL images
with PIL's bicubic filter (``reducing_gap=1``, as the reference), PIL masks with
Lanczos (as the reference), arrays/tensors with antialiased bicubic (images) or
nearest (masks).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from kandinsky.callsite import user_stacklevel

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Integer image dtypes and their white value.
_INTEGER_RANGE = {torch.uint8: 255.0, torch.uint16: 65535.0}
# PIL modes that convert("RGB") / convert("L") would clip at 255: one channel, more than 8 bits.
_HIGH_BIT_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


@dataclass
class ImageOutput:
    """What every decoder task returns.

    ``images`` is a list of PIL images (``output_type="pil"``), a float numpy array
    (B, H, W, 3) in [0, 1] (``"np"``), the raw MoVQ decoder tensor (B, 3, H, W),
    in [0, 1] (``"pt"``), or the final latents (B, 4, H/8, W/8) (``"latent"``).
    """

    images: Any


# --------------------------------------------------------------------------- images in
def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _named_items(x, what: str) -> list[tuple[str, Any]]:
    """The items of one input or of a list of them, each with its name for messages (``what`` or
    ``what[i]``); an empty list is refused."""
    items = _as_list(x)
    if not items:
        raise ValueError(f"{what}: got an empty list.")
    return [(what if len(items) == 1 else f"{what}[{i}]", item) for i, item in enumerate(items)]


def _array_to_tensor(x, what: str, hint: bool) -> torch.Tensor:
    """One numpy array (channels last) or tensor (channels first) -> (B, 3, H, W) float in [0, 1]."""
    if isinstance(x, np.ndarray):
        if x.dtype == np.bool_ or x.dtype.kind not in "uif":
            raise TypeError(f"{what}: numpy array of dtype {x.dtype} is not an image (use uint8 or float).")
        t = torch.from_numpy(np.array(x))  # a copy: the caller's array may be read-only
        if t.ndim == 2 and hint:
            t = t[..., None]
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4:
            raise ValueError(f"{what}: numpy images are (H, W, 3) or (B, H, W, 3); got shape {tuple(x.shape)}.")
        t = t.permute(0, 3, 1, 2)  # (B, C, H, W)
        layout = "(H, W, 3) or (B, H, W, 3) (numpy is channels last)"
    elif isinstance(x, torch.Tensor):
        t = x.detach()
        if t.ndim == 2 and hint:
            t = t[None]
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4:
            raise ValueError(f"{what}: tensor images are (3, H, W) or (B, 3, H, W); got shape {tuple(x.shape)}.")
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"{what}: tensor of dtype {t.dtype} is not an image (use uint8 or float).")
        layout = "(3, H, W) or (B, 3, H, W) (torch is channels first)"
    else:
        raise TypeError(f"{what}: expected a PIL image, numpy array or torch tensor, got {type(x).__name__}.")

    channels = t.shape[1]
    if channels == 1 and hint:
        t = t.expand(-1, 3, -1, -1)
    elif channels == 1:
        raise ValueError(
            f"{what}: got 1 channel (grayscale); images must be RGB {layout}. "
            "Repeat the channel three times (or pass a PIL image, which is converted to RGB)."
        )
    elif channels == 4:
        raise ValueError(
            f"{what}: got 4 channels (RGBA? latents?); images must be RGB {layout}. Alpha is not "
            "supported for arrays: drop or composite it yourself (a PIL image is converted with "
            "convert('RGB'), which drops alpha)."
        )
    elif channels != 3:
        raise ValueError(f"{what}: expected 3 channels {layout}; got shape {tuple(x.shape)}.")

    if not t.is_floating_point():
        if t.dtype not in _INTEGER_RANGE:
            raise TypeError(f"{what}: integer images must be uint8 (0..255) or uint16 (0..65535), got {t.dtype}.")
        return t.float() / _INTEGER_RANGE[t.dtype]
    return _unit_range(t.float(), f"{what}: the image", f"{what}: float image values",
                       "For a [-1, 1] image pass (x + 1) / 2; for 0..255 values use uint8 or divide by 255.")


def _unit_range(t: torch.Tensor, it: str, values: str, fix: str) -> torch.Tensor:
    """``t`` itself if finite and in [0, 1]; else an error naming ``it`` / ``values`` and the ``fix``."""
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{it} holds NaN or inf values; pass finite values in [0, 1].")
    lo, hi = t.min().item(), t.max().item()
    if lo < 0 or hi > 1:
        raise ValueError(f"{values} must lie in [0, 1], got [{lo:.3g}, {hi:.3g}]. {fix}")
    return t


def _high_bit_depth(img: PIL.Image.Image, what: str) -> np.ndarray:
    """A one-channel PIL picture of more than 8 bits -> float32 (H, W) in [0, 1].

    ``I;16*`` and ``I`` (how PIL opens 16-bit PNGs) are read as 0..65535, ``F`` as [0, 1].
    """
    x = np.asarray(img).astype(np.float32)
    if img.mode != "F":
        x = x / 65535.0
    if x.size and (x.min() < 0 or x.max() > 1):
        full = "[0, 1]" if img.mode == "F" else "0..65535"
        raise ValueError(
            f"{what}: a PIL image of mode {img.mode!r} must hold values in {full}, got "
            f"[{x.min():.3g}, {x.max():.3g}]{'' if img.mode == 'F' else ' / 65535'}; rescale it first."
        )
    return x


def _pil_to_tensor(img: PIL.Image.Image, height: int, width: int) -> torch.Tensor:
    img = img.convert("RGB")
    if input_size(img) != (height, width):
        img = img.resize((width, height), resample=PIL.Image.BICUBIC, reducing_gap=1)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255.0  # (1, 3, H, W)


def _channels_last(x, mask: bool = False) -> bool:
    """Whether the loaders read this array's LAST axis as its channels: numpy images with a channel
    axis ((H, W, C), (B, H, W, C)); numpy masks (H, W, 1 | 3), (B, H, W, 1 | 3); never torch
    tensors (channels first) nor 2-D arrays."""
    if not isinstance(x, np.ndarray) or x.ndim < 3:
        return False
    return not mask or (x.ndim in (3, 4) and x.shape[-1] in (1, 3))


def input_size(x, mask: bool = False) -> tuple[int, int]:
    """(H, W) of one input item (image, hint or, with ``mask=True``, mask) before any resizing, read
    with the loaders' own layout rules: the loaders resize by it, check_same_size compares it."""
    if isinstance(x, PIL.Image.Image):
        return x.height, x.width
    return tuple(x.shape[-3:-1]) if _channels_last(x, mask) else tuple(x.shape[-2:])


def load_images(image, height: int, width: int, what: str = "image", hint: bool = False) -> torch.Tensor:
    """PIL / numpy / torch image(s) -> float tensor (B, 3, height, width) in [0, 1].

    ``hint=True`` (control hints) also accepts one-channel images and repeats them.
    """
    out = []
    for name, item in _named_items(image, what):
        if isinstance(item, PIL.Image.Image) and item.mode not in _HIGH_BIT_DEPTH:
            out.append(_pil_to_tensor(item, height, width))
            continue
        if isinstance(item, PIL.Image.Image):  # grey, > 8 bits: repeated to RGB like PIL's "L"
            item = np.repeat(_high_bit_depth(item, name)[..., None], 3, axis=-1)  # (H, W, 3)
        t = _array_to_tensor(item, name, hint)  # (b, 3, h, w)
        if input_size(item) != (height, width):
            t = F.interpolate(t, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
            t = t.clamp(0, 1)
        out.append(t)
    return torch.cat(out)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1], the MoVQ's input range."""
    return images * 2.0 - 1.0


# --------------------------------------------------------------------------- masks in
# How a mask is read (docs/usage.md, "Masks"): 1 / white = repaint, 0 / black = keep.
#  * A picture with transparency (RGBA, LA, PA, or a palette with a transparent colour) whose alpha
#    is not all opaque is read by its ALPHA: painted (opaque) = repaint, transparent = keep.
#  * Otherwise a pixel's value is its BRIGHTEST channel, so a stroke in any colour counts as that
#    colour's strongest channel (a red stroke is not a dark grey).
#  * Arrays and tensors: (H, W), (B, H, W), (B, 1, H, W); colour masks (H, W, 3), (B, H, W, 3)
#    (numpy, channels last) and (3, H, W), (B, 3, H, W) (torch, channels first) are ONE mask per
#    picture, by the brightest channel. (A batch of 3 masks as a tensor: (3, 1, H, W).)
#  * Each mask is binarised (binarise_masks): value >= MASK_HALF repaints, as in the reference, when any
#    value of the mask reaches MASK_HALF; a mask painted only in dark colours (dark red (90, 0, 0) is
#    0.35) is binarised at half its brightest value instead, so any non-black stroke on a black mask
#    repaints. Values below MASK_BLACK are black (JPEG noise, the faint fringe of a soft brush).
#  * A mask that repaints nothing, or everything, warns; so does one with more than DARK_STROKE_SHARE of
#    its pixels painted (at least MASK_BLACK) below its threshold away from the area it repaints (a
#    dark stroke next to white ones: it is kept).
MASK_HALF = 0.5  # the reference's threshold
MASK_BLACK = 1 / 16  # below this a mask value is black: it never repaints
DARK_STROKE_DISTANCE = 1 / 16  # of the mask's longer side (at least 16 px): painted pixels below the threshold
# closer than this to the area that repaints are its soft edge, not a stroke
DARK_STROKE_SHARE = 0.01  # the share of a mask's pixels in dark strokes from which it warns


def _pil_mask(img: PIL.Image.Image) -> np.ndarray:
    """A PIL mask -> float (H, W) in [0, 1] by the rules above."""
    if img.mode in _HIGH_BIT_DEPTH:
        return _high_bit_depth(img, "mask")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        alpha = np.asarray(img.getchannel("A"), dtype=np.float32) / 255.0
        if alpha.min() < 1.0:
            return alpha
    rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return rgb.max(axis=-1)


def _mask_to_tensor(m, what: str) -> torch.Tensor:
    """One numpy / torch mask -> (B, 1, h, w) float, values checked to lie in [0, 1]."""
    if isinstance(m, np.ndarray):
        if m.dtype.kind not in "buif":
            raise TypeError(f"{what}: numpy mask of dtype {m.dtype} is not supported.")
        if _channels_last(m, mask=True):  # (H, W, C) / (B, H, W, C)
            m = m.max(axis=-1)
        t = torch.from_numpy(np.array(m))
    elif isinstance(m, torch.Tensor):
        t = m.detach()
        if t.ndim == 3 and t.shape[0] == 3:  # (3, H, W): one colour mask, channels first
            t = t.amax(dim=0, keepdim=True)[None]
        elif t.ndim == 4 and t.shape[1] == 3:  # (B, 3, H, W)
            t = t.amax(dim=1, keepdim=True)
    else:
        raise TypeError(f"{what}: expected a PIL image, numpy array or torch tensor, got {type(m).__name__}.")
    shape = tuple(t.shape)
    if t.ndim == 2:
        t = t[None, None]
    elif t.ndim == 3:
        t = t[:, None]
    elif t.ndim != 4 or t.shape[1] != 1:
        raise ValueError(f"{what}: masks are (H, W), (B, H, W), (B, 1, H, W), or colour (H, W, 3) numpy / "
                         f"(3, H, W) torch; got shape {shape}.")
    return _unit_range(t.float(), f"{what}: the mask", f"{what}: mask values (1 = repaint, 0 = keep)",
                       "For a 0/255 mask divide by 255 (or pass a PIL image).")


def load_masks(mask, height: int, width: int, what: str = "mask_image") -> torch.Tensor:
    """Mask(s) -> binary float tensor (B, 1, height, width): 1 = repaint, 0 = keep (rules above)."""
    out = []
    for name, item in _named_items(mask, what):
        if isinstance(item, PIL.Image.Image):
            value = _pil_mask(item)  # (H, W) in [0, 1]
            if input_size(item, mask=True) != (height, width):
                img = PIL.Image.fromarray((value * 255).round().astype(np.uint8))
                value = np.asarray(img.resize((width, height), resample=PIL.Image.LANCZOS), dtype=np.float32) / 255.0
            t = torch.from_numpy(np.array(value, dtype=np.float32))[None, None]
        else:
            t = _mask_to_tensor(item, name)  # (b, 1, h, w)
            if input_size(item, mask=True) != (height, width):
                t = F.interpolate(t, size=(height, width), mode="nearest")
        out.append(t)
    values = torch.cat(out)  # (B, 1, H, W) in [0, 1]
    masks, threshold = binarise_masks(values)
    for i, m in enumerate(masks):
        name = what if len(masks) == 1 else f"{what}[{i}]"
        share = m.mean().item()
        if share in (0.0, 1.0):
            does = "repaints nothing (all black / transparent: the picture comes back as it was)" if share == 0 \
                else "repaints everything (all white / painted: nothing of the picture is kept)"
            warnings.warn(f"{name} {does}; white or painted = repaint, black or transparent = keep.",
                          stacklevel=user_stacklevel())
        dark = _dark_stroke_share(values[i], m, threshold[i].item())
        if dark > DARK_STROKE_SHARE:
            warnings.warn(
                f"{name}: {dark:.0%} of its pixels are painted too dark to repaint (brightest channel between "
                f"{MASK_BLACK:.3g} and {threshold[i].item():.3g}, away from the area that repaints), so they are "
                f"KEPT. A mask is binarised at {MASK_HALF} when any of its pixels reaches it (else at half its "
                "brightest value): paint everything to repaint in white or a bright colour.",
                stacklevel=user_stacklevel())
    return masks


def binarise_masks(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask values (B, 1, H, W) in [0, 1] -> (binary masks (B, 1, H, W), 1 = repaint; thresholds (B,)): each
    mask at MASK_HALF (the reference) when any of its values reaches it, else at half its brightest value,
    never below MASK_BLACK."""
    peak = values.amax(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    threshold = torch.where(peak >= MASK_HALF, torch.full_like(peak, MASK_HALF), (peak / 2).clamp(min=MASK_BLACK))
    return (values >= threshold).float(), threshold.flatten()


def _dark_stroke_share(values: torch.Tensor, mask: torch.Tensor, threshold: float) -> float:
    """The share of one mask's pixels (values, mask: (1, H, W)) painted (>= MASK_BLACK) but below ``threshold``
    and farther than DARK_STROKE_DISTANCE from any pixel that repaints (a soft edge is not a stroke)."""
    dark = (values >= MASK_BLACK) & (values < threshold)
    if dark.float().mean().item() <= DARK_STROKE_SHARE:
        return 0.0  # (most masks: no need to look further)
    d = max(16, round(max(values.shape[-2:]) * DARK_STROKE_DISTANCE))  # pixels
    near = F.max_pool2d(mask[None], (1, 2 * d + 1), stride=1, padding=(0, d))  # dilated by d (a square)
    near = F.max_pool2d(near, (2 * d + 1, 1), stride=1, padding=(d, 0))[0] > 0  # (1, H, W)
    return (dark & ~near).float().mean().item()


def check_same_size(image, mask) -> None:
    """Refuse images and masks of different input sizes, each read as its loader reads it (call after
    loading both: the loaders name a bad layout first)."""
    sizes_i = [input_size(x) for x in _as_list(image)]
    sizes_m = [input_size(m, mask=True) for m in _as_list(mask)]
    pairs = zip(sizes_i, sizes_m) if len(sizes_i) == len(sizes_m) else [(a, b) for a in sizes_i for b in sizes_m]
    if any(a != b for a, b in pairs):
        raise ValueError(
            f"image and mask_image must have the same size (H, W); got image {sorted(sizes_i)} "
            f"and mask_image {sorted(sizes_m)}."
        )


# --------------------------------------------------------------------------- inpainting mask
# The reference (diffusers' prepare_mask) walks over every latent pixel and, for each
# pixel to repaint, clears the keep-mask at six of its eight neighbours: up, down,
# left, right and the two diagonal ones on the main diagonal, (-1, -1) and (+1, +1)
# -- not (-1, +1) / (+1, -1). The same as one correlation with this kernel:
_GROW_KERNEL = ((1.0, 1.0, 0.0),
                (1.0, 0.0, 1.0),
                (0.0, 1.0, 1.0))


def grow_repaint_area(keep: torch.Tensor) -> torch.Tensor:
    """Grow the area to repaint by one latent pixel, exactly as the reference.

    keep: (B, 1, h, w), 1 = keep. A pixel whose value is not 1 is "to repaint"; each
    of its neighbours in ``_GROW_KERNEL`` is set to 0. Other values are untouched.
    """
    repaint = (keep != 1).float()  # (B, 1, h, w)
    kernel = torch.tensor(_GROW_KERNEL, device=keep.device).view(1, 1, 3, 3)
    near_repaint = F.conv2d(repaint, kernel, padding=1) > 0
    return keep.masked_fill(near_repaint, 0)


# --------------------------------------------------------------------------- images out
def to_pil(images: np.ndarray) -> list[PIL.Image.Image]:
    """(B, H, W, 3) floats in [0, 1] -> list of RGB PIL images."""
    return [PIL.Image.fromarray(x) for x in (images * 255).round().astype("uint8")]


def format_output(decoded: torch.Tensor, output_type: str):
    """MoVQ output (B, 3, H, W) in ~[-1, 1] -> the requested ``output_type``."""
    if output_type == "pt":  # (B, 3, H, W) in [0, 1], as diffusers' pipelines and torchvision expect
        return (decoded * 0.5 + 0.5).clamp(0, 1)
    images = (decoded.float() * 0.5 + 0.5).clamp(0, 1)  # in float32 also for half-precision decoders
    images = images.cpu().permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
    return images if output_type == "np" else to_pil(images)


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, not {output_type!r}.")
