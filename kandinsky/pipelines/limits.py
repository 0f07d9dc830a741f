"""Runaway jobs refused before any work: one memory check for every door (DecoderPipeline and Kandinsky,
``kandinsky batch`` items, the generation commands, the studio, which calls the Python API), and one
count rule for the command line.

    check_memory(pipe, batch, height, width, tile)   ValueError when the decoder's peak memory for
                                                     ``batch`` pictures of height x width would exceed
                                                     the device's memory: what it would need, what there
                                                     is, the largest size (and batch) that fits
    check_folder(folder, device, dtype, ...)         the same from a checkpoint folder's config.json
                                                     files, before anything is loaded (the commands)
    check_count(n, confirmed, flag)                  more than MANY pictures from one command need the
                                                     confirmation flag (and are announced with a warning)

The estimate is the larger of the decoder's two peaks (activations of the model, not its weights,
which are loaded already):

    UNet  (2 B rows with guidance, latent pixels h x w):  2 B h w (L + 1) sum_i C_i / 4^i  x 4
          (the skip activations of every level, and as much again for the block being run)
    MoVQ  (B pictures, tiled or not):  B P x 4 max(C_0, C_1)   where P is the pixels decoded at once
          (H x W, or one tile): the full-resolution levels hold a few activations of up to C_1 channels
    and the decoded pictures themselves: B H W x 3 channels x 3 copies (float, formatted, uint8)

times the bytes of the pipeline's dtype. It is an estimate of the order of magnitude (within ~2x of
the peak measured on the real checkpoints); a size is refused only when it exceeds everything the
device has (the GPU's total memory less what is allocated, or the machine's RAM), so nothing that can
run is refused.
"""
from __future__ import annotations

import math
import os
import warnings

import torch

from kandinsky.callsite import user_stacklevel

MANY = 16  # more pictures than this from one command need the confirmation flag


def available_memory(device: torch.device) -> int:
    """Bytes the device can give a job: a GPU's total memory less what torch has allocated on it, or
    the machine's physical memory (os.sysconf)."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory - torch.cuda.memory_allocated(index)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): no bound
        return 1 << 62


def estimate_bytes(unet_config, movq_config, batch: int, height: int, width: int, tile: int | None,
                   dtype: torch.dtype, guidance: bool = True) -> int:
    """The decoder's peak activation memory (the formula in the module docstring) in bytes."""
    size = torch.tensor([], dtype=dtype).element_size()
    f = 2 ** (len(movq_config.block_out_channels) - 1)  # the MoVQ's downsampling factor
    h, w = height // f, width // f
    channels = unet_config.block_out_channels
    per_latent_pixel = (unet_config.layers_per_block + 1) * sum(c / 4 ** i for i, c in enumerate(channels)) * 4
    unet = (2 if guidance else 1) * batch * h * w * per_latent_pixel
    decoded_at_once = (tile + tile // 2) ** 2 if tile else height * width  # a tile and its overlap
    movq_channels = max(movq_config.block_out_channels[:2])
    movq = batch * decoded_at_once * 4 * movq_channels
    pictures = batch * height * width * 3 * 3
    return int((max(unet, movq) + pictures) * size)


def _bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def check_memory(pipe, batch: int, height: int, width: int, tile=None, asked: tuple[int, int] | None = None) -> None:
    """Refuse (ValueError) ``batch`` pictures of ``height`` x ``width`` (the size generated; ``asked``:
    the size asked, for the message) from DecoderPipeline ``pipe`` when the estimate exceeds what its
    device has. Costs no model work."""
    check_configs(pipe.unet.config, pipe.movq.config, pipe.device, pipe.dtype, batch, height, width, tile,
                  pipe.size_multiple, asked)


def check_folder(folder, device, dtype: torch.dtype, batch: int, height: int, width: int, tile=None) -> None:
    """check_memory before loading: from a local decoder checkpoint folder's unet/ and movq/ config.json
    (a hub id or a folder without them: nothing to check yet; the pipeline checks after loading)."""
    import json
    from pathlib import Path

    from kandinsky.movq.model import MoVQConfig
    from kandinsky.unet.model import UNetConfig

    root = Path(folder)
    try:
        unet = UNetConfig.from_dict(json.loads((root / "unet" / "config.json").read_text()))
        movq = MoVQConfig.from_dict(json.loads((root / "movq" / "config.json").read_text()))
    except (OSError, ValueError):
        return
    multiple = 2 ** (len(movq.block_out_channels) - 1) * 2 ** (len(unet.block_out_channels) - 1)
    asked = (height, width)
    height, width = (math.ceil(v / multiple) * multiple for v in asked)
    check_configs(unet, movq, torch.device(device), dtype, batch, height, width, tile, multiple, asked)


def check_configs(unet_config, movq_config, device, dtype, batch: int, height: int, width: int, tile,
                  multiple: int, asked: tuple[int, int] | None = None) -> None:
    from kandinsky.movq.tiling import resolve_tile

    f = 2 ** (len(movq_config.block_out_channels) - 1)
    try:
        tile_side = resolve_tile(tile, height, width, f)
    except ValueError:
        return  # a bad tile: the MoVQ's own check says so

    def need(b, h, w):
        return estimate_bytes(unet_config, movq_config, b, h, w, resolve_tile(tile, h, w, f), dtype)

    have = available_memory(device)
    needed = need(batch, height, width)
    if needed <= have:
        return
    # the largest size of this aspect ratio (the estimate grows with the pixel count), and batch
    scale = math.sqrt(have / needed)
    fit_h, fit_w = (int(v * scale) // multiple * multiple for v in (height, width))
    while fit_h >= multiple and fit_w >= multiple and need(batch, fit_h, fit_w) > have:
        fit_h, fit_w = fit_h - multiple, fit_w - multiple
    per_picture = estimate_bytes(unet_config, movq_config, 1, height, width, tile_side, dtype)
    pictures = f"{batch} pictures" if batch > 1 else "1 picture"
    if fit_h >= multiple and fit_w >= multiple:
        fits = f"the largest size that fits at this aspect ratio is height={fit_h}, width={fit_w}"
    else:
        fits = f"no size fits {pictures} at once"
    if batch > 1 and per_picture <= have:
        fits += f"; at this size at most {have // per_picture} pictures at once fit"
    h, w = asked or (height, width)
    raise ValueError(
        f"height={h} x width={w} ({pictures}) would need about {_bytes(needed)} of memory on "
        f"{device}, which has {_bytes(have)}: {fits}. Ask for a smaller size or fewer pictures "
        f"(num_images_per_prompt / --num-images).")


def check_count(n: int, confirmed: bool, what: str = "--num-images", flag: str = "--allow-many") -> None:
    """More than MANY pictures from one command: refused without ``flag``, announced with a warning with it."""
    if n <= MANY:
        return
    if not confirmed:
        raise ValueError(f"{what} {n} asks for {n} pictures (more than {MANY}); this may run for a long time. "
                         f"Pass {flag} to confirm, or ask for fewer.")
    warnings.warn(f"{what} {n}: making {n} pictures ({flag} given)", stacklevel=user_stacklevel())
