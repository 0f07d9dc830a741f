"""Attention as pictures (pillow only; the colour map is drawn here by hand).

    (a) decoder: how strongly each image location attends to the 32 image tokens, per UNet
        level, at chosen steps, over the generated picture      -> decoder_attention_grid
    (b) prior: how much the output (prd) token attends to each word of the prompt, per
        prior block                                              -> word_attention_image
    (c) trajectories: the x0 preview grid is kandinsky.sampling.trajectory.save_x0_grid

``attention_pictures(pipe, prompt, ...)`` runs a Kandinsky pipeline once with both captures
and returns the three pictures; ``kandinsky attention PROMPT`` is its command line (kandinsky/cli/research.py).
"""
from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from kandinsky.research.capture import Record, capture
from kandinsky.research.targets import attention_layout, is_attention, match
from kandinsky.unet.blocks import NUM_IMAGE_TOKENS

# A perceptually ordered dark-to-bright map (anchors close to matplotlib's "magma").
COLORMAP = np.array([
    (0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21), (250, 193, 39),
    (252, 253, 191)], dtype=np.float32)
BACKGROUND, INK = (255, 255, 255), (20, 20, 20)


# ----------------------------------------------------------------------------- colours
def colorize(values: np.ndarray) -> np.ndarray:
    """values in [0, 1] (any shape) -> uint8 RGB (..., 3), linear between the COLORMAP anchors."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), 0, 1) * (len(COLORMAP) - 1)
    lo = np.floor(v).astype(int).clip(0, len(COLORMAP) - 2)
    frac = (v - lo)[..., None]
    return np.round(COLORMAP[lo] * (1 - frac) + COLORMAP[lo + 1] * frac).astype(np.uint8)


def heatmap(values, size: tuple[int, int]) -> PIL.Image.Image:
    """A (h, w) map in [0, 1] as an RGB picture of ``size`` (W, H), bilinearly upsampled."""
    small = PIL.Image.fromarray(np.round(np.clip(np.asarray(values, np.float32), 0, 1) * 255).astype(np.uint8))
    big = np.asarray(small.resize(size, PIL.Image.BILINEAR), dtype=np.float32) / 255
    return PIL.Image.fromarray(colorize(big))


def overlay(image: PIL.Image.Image, values, alpha: float = 0.65) -> PIL.Image.Image:
    """``values`` (h, w) in [0, 1] as a heat map blended over ``image`` in grey (the colour is the map's)."""
    return PIL.Image.blend(image.convert("L").convert("RGB"), heatmap(values, image.size), alpha)


def _text(draw, xy, text, anchor="la"):
    draw.text(xy, text, fill=INK, anchor=anchor)


# ----------------------------------------------------------------------------- (a) decoder
def unet_level(name: str) -> str:
    """'unet.up.1.attn.2' -> 'unet.up.1'; 'unet.mid.attn' -> 'unet.mid' (one resolution each)."""
    return re.sub(r"\.attn(\.\d+)?$", "", name)


def image_token_share(probs: torch.Tensor, image_tokens: int = NUM_IMAGE_TOKENS) -> torch.Tensor:
    """UNet attention (B, heads, h*w, 32 + h*w) -> (B, h*w): the share of each location's
    attention that goes to the image tokens (the layer's layout["image_tokens"]: 32), averaged
    over heads. Use as capture's reduce."""
    return probs[..., :image_tokens].sum(-1).mean(1)


def _grid_shape(n: int, aspect: float) -> tuple[int, int]:
    """(h, w) with h * w = n and w / h = aspect (the image's width / height)."""
    h = round(math.sqrt(n / aspect))
    if h * round(n / h) != n:
        raise ValueError(f"cannot lay out {n} locations with aspect {aspect:.3f}")
    return h, n // h


def level_maps(record: Record, aspect: float = 1.0, branch: str | None = "cond", sample: int = 0):
    """{step: {level: (h, w) numpy}} from a decoder capture with reduce=image_token_share:
    the layers of one level averaged (and the model calls of one step, for multi-call samplers)."""
    out: dict[int, dict[str, np.ndarray]] = {}
    for name, step, b in record.keys():
        if step is None or b != branch:
            continue
        share = torch.stack(record.calls((name, step, b)))[:, sample].float().mean(0)  # (h*w,), calls averaged
        h, w = _grid_shape(share.numel(), aspect)
        out.setdefault(step, {}).setdefault(unet_level(name), []).append(share.reshape(h, w).cpu().numpy())
    return {s: {lv: np.mean(maps, axis=0) for lv, maps in sorted(levels.items(), key=lambda kv: _level_order(kv[0]))}
            for s, levels in sorted(out.items())}


def unet_levels(pipe) -> list[str]:
    """The UNet levels with attention layers ('unet.down.1', ..., 'unet.mid', 'unet.up.0', ...), in the
    decoder grid's order: what ``attention_pictures(levels=...)`` can show."""
    return sorted({unet_level(name) for name in match(pipe, "unet.*", only=is_attention)}, key=_level_order)


def _level_order(level: str):
    part = level.split(".")
    return ({"down": 0, "mid": 1, "up": 2}.get(part[1], 3), int(part[2]) if len(part) > 2 else 0)


def decoder_attention_grid(maps: dict, image: PIL.Image.Image, cell: int = 128, alpha: float = 0.65):
    """One PNG: a row per step, a column per UNet level, each cell the heat map (scaled to the
    largest value of the grid, so cells compare) over ``image``; labels on top and left."""
    steps = list(maps)
    levels = list(next(iter(maps.values()))) if maps else []
    if not steps or not levels:
        raise ValueError("no decoder attention recorded: capture 'unet.*' with attention=True and "
                         "reduce=image_token_share during a guided (or unguided) decoder run")
    top = max(v.max() for row in maps.values() for v in row.values()) or 1.0
    label_w, label_h = 64, 18
    W, H = label_w + (len(levels) + 1) * cell, label_h + len(steps) * cell + 22
    canvas = PIL.Image.new("RGB", (W, H), BACKGROUND)
    draw = PIL.ImageDraw.Draw(canvas)
    thumb = image.convert("RGB").resize((cell, cell), PIL.Image.BICUBIC)
    _text(draw, (label_w + 4, 3), "image")
    for j, level in enumerate(levels):
        _text(draw, (label_w + (j + 1) * cell + 4, 3), level.removeprefix("unet."))
    for i, step in enumerate(steps):
        y = label_h + i * cell
        _text(draw, (4, y + cell // 2), f"step {step}", anchor="lm")
        canvas.paste(thumb, (label_w, y))
        for j, level in enumerate(levels):
            canvas.paste(overlay(thumb, maps[step][level] / top, alpha), (label_w + (j + 1) * cell, y))
    _colorbar(canvas, draw, (label_w, H - 16), cell * 2, f"share of attention on image tokens, 0 .. {top:.3f}")
    return canvas


def _colorbar(canvas, draw, xy, width: int, label: str):
    bar = PIL.Image.fromarray(np.repeat(colorize(np.linspace(0, 1, width))[None], 10, axis=0))
    canvas.paste(bar, xy)
    _text(draw, (xy[0] + width + 6, xy[1] + 5), label, anchor="lm")


# ----------------------------------------------------------------------------- (b) prior
def prd_to_text(probs: torch.Tensor, text_tokens: int) -> torch.Tensor:
    """Prior attention (B, heads, Lq, T + 4) -> (B, T): how much the prd token (the last query,
    whose output is the image embedding) attends to each of the T text tokens (the layer's
    layout["text_tokens"]: 77 in Kandinsky 2.2), averaged over heads. With ``functools.partial``
    (text_tokens given), use as capture's reduce."""
    return probs[:, :, -1, :text_tokens].mean(1)


def words_of(tokenizer, prompt: str) -> list[tuple[str, list[int]]]:
    """[(word, token positions)] of ``prompt`` as the prior sees it: BPE pieces joined into
    words at CLIP's end-of-word marks; position 0 is the start token."""
    ids, mask = tokenizer([prompt])
    pieces = tokenizer.tokenizer.convert_ids_to_tokens(ids[0, : int(mask[0].sum())].tolist())
    words, current, positions = [], "", []
    for pos, piece in enumerate(pieces):
        if piece in ("<|startoftext|>", "<|endoftext|>"):
            words.append((piece, [pos]))
            continue
        current += piece.replace("</w>", "")
        positions.append(pos)
        if piece.endswith("</w>"):
            words.append((current, positions))
            current, positions = "", []
    if positions:
        words.append((current, positions))
    return words


def word_attention(record: Record, words, branch: str | None = "cond", sample: int = 0):
    """(layers, matrix (words, layers)) from a prior capture with reduce=prd_to_text, averaged
    over the steps; a word's value is the sum over its BPE pieces."""
    layers = sorted({n for n, s, b in record.keys() if s is not None and b == branch},
                    key=lambda n: [int(p) if p.isdigit() else p for p in n.split(".")])
    if not layers:
        raise ValueError("no prior attention recorded: capture 'prior.*' with attention=True and reduce=prd_to_text")
    matrix = np.zeros((len(words), len(layers)), dtype=np.float32)
    for j, name in enumerate(layers):
        steps = [s for n, s, b in record.keys() if n == name and s is not None and b == branch]
        per_token = torch.stack([c[sample].float() for s in steps for c in record.calls((name, s, branch))]).mean(0)
        for i, (_, positions) in enumerate(words):
            matrix[i, j] = per_token[positions].sum().item()
    return layers, matrix


def word_attention_image(words, layers, matrix: np.ndarray, cell: int = 28) -> PIL.Image.Image:
    """A row per word: one cell per prior block (colour = share of the prd token's attention,
    0 .. the largest value), then a bar of the mean over blocks with its value."""
    label_w, header, bar_w = 150, 20, 180
    W, H = label_w + len(layers) * cell + bar_w + 70, header + len(words) * cell + 26
    canvas = PIL.Image.new("RGB", (W, H), BACKGROUND)
    draw = PIL.ImageDraw.Draw(canvas)
    top = float(matrix.max()) or 1.0
    for j, name in enumerate(layers):
        _text(draw, (label_w + j * cell + cell // 2, header // 2), name.split(".")[-2], anchor="mm")
    mean = matrix.mean(1)
    for i, (word, _) in enumerate(words):
        y = header + i * cell
        _text(draw, (label_w - 6, y + cell // 2), word[:22], anchor="rm")
        colours = colorize(matrix[i] / top)
        for j in range(len(layers)):
            x = label_w + j * cell
            draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=tuple(int(c) for c in colours[j]))
        x0 = label_w + len(layers) * cell + 10
        draw.rectangle([x0, y + 6, x0 + int(bar_w * mean[i] / (mean.max() or 1)), y + cell - 8], fill=(90, 90, 160))
        _text(draw, (x0 + bar_w + 6, y + cell // 2), f"{mean[i]:.3f}", anchor="lm")
    _colorbar(canvas, draw, (label_w, H - 16), len(layers) * cell,
              f"prd token -> word, per prior block (columns), 0 .. {top:.3f}")
    return canvas


# ----------------------------------------------------------------------------- one run, three pictures
def attention_pictures(pipe, prompt: str, steps=None, trajectory: bool = False, cell: int = 128,
                       levels=None, **options) -> dict:
    """Run ``pipe.text2img(prompt, **options)`` once (a Kandinsky pipeline) recording what the
    pictures need, and return {"image", "decoder" (grid), "prior" (words)} PIL images (and
    "trajectory", the x0 preview grid, when asked). ``steps``: decoder steps for the grid
    (default: first, middle, last); ``levels``: the grid's UNet levels (default all: ``unet_levels``);
    ``cell``: the side of one grid cell in pixels."""
    if levels is not None:
        known = unet_levels(pipe)
        if not levels or set(levels) - set(known):
            raise ValueError(f"levels must be UNet levels of this decoder ({', '.join(known)}), got {list(levels)}")
    n = options.get("num_inference_steps", 100)
    steps = sorted({0, n // 2, n - 1}) if steps is None else list(steps)
    if any(not 0 <= s < n for s in steps):
        raise ValueError(f"steps must be decoder step indices in [0, {n - 1}], got {steps}")
    recorder = None
    if trajectory:
        from kandinsky.sampling.trajectory import Trajectory

        recorder = Trajectory()
        user_callback = options.pop("callback_on_step_end", None)

        def callback(state):
            if state.stage == "decoder":
                recorder(state)
            return user_callback(state) if user_callback else None

        options["callback_on_step_end"] = callback
    layout = {key: _one_layout_value(pipe, pattern, key)
              for pattern, key in (("unet.*", "image_tokens"), ("prior.*", "text_tokens"))}
    share = functools.partial(image_token_share, image_tokens=layout["image_tokens"])
    prd_row = functools.partial(prd_to_text, text_tokens=layout["text_tokens"])
    with capture(pipe, "unet.*", attention=True, steps=steps, branch="cond", reduce=share, to="cpu") as dec, \
            capture(pipe, "prior.*", attention=True, steps=slice(0, None), branch="cond", reduce=prd_row,
                    to="cpu") as pri:
        image = pipe.text2img(prompt, **options).images[0]
    aspect = image.width / image.height
    maps = {step: {level: grid[level] for level in grid if levels is None or level in levels}
            for step, grid in level_maps(dec, aspect).items()}
    out = {"image": image, "decoder": decoder_attention_grid(maps, image, cell=cell)}
    words = words_of(pipe.prior.tokenizer, prompt)
    out["prior"] = word_attention_image(words, *word_attention(pri, words))
    if recorder is not None:
        from kandinsky.sampling.trajectory import grid_image, x0_previews

        out["trajectory"] = grid_image(x0_previews(recorder, pipe.decoder.movq, size=cell))
    return out


def _one_layout_value(pipe, pattern: str, key: str) -> int:
    """The ``key`` of the token layouts of the attention layers ``pattern`` names (the same in all)."""
    values = {attention_layout(m).get(key) for m in match(pipe, pattern, only=is_attention).values()} - {None}
    if len(values) != 1:
        raise ValueError(f"the attention layers {pattern!r} declare {key} {sorted(values)}; expected one value")
    return values.pop()
