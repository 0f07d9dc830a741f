"""Tiled MoVQ decoding and encoding: large images in bounded memory.

Where the memory goes: the decoder's last levels run 128-256 channels at full image
resolution (at 2048 x 2048 one such activation is 2 GiB in fp32, and a ResBlock holds
several), while its latent-resolution part is small (512 channels at 256 x 256: 128 MiB).
So each model is split at the latent resolution (``Decoder.trunk`` / ``Decoder.head``,
``Encoder.stem`` / ``Encoder.trunk``):

    decode:  latents -> trunk (whole image: conv_in, mid block, the attention level)
                     -> head  (tile by tile: the upsampling levels, at most tile x tile pixels)
    encode:  images  -> stem  (tile by tile: the full-resolution levels)
                     -> trunk (whole image: the attention level, mid block, conv_out)

The attention (which sees every latent pixel) therefore stays global and exact. Tiles
overlap by ``overlap`` pixels and are blended with weights that are 0 in the outer third
of the overlap (where a tile's zero padding shows), rise linearly across its middle third
and are 1 inside, so every pixel is a convex mix of the tiles that see it best.

The GroupNorms (SpatialNorms in the decoder) are what tiling must get right: inside a tile
they would normalise with that tile's statistics instead of the whole image's. ``GlobalNormStats``
gathers whole-image statistics tile by tile (every tile adds the part it owns). With
``passes="exact"`` (the default) each pass runs the tiles up to the first norm whose statistics
are not known yet, gathers them and stops the tiles there; every norm before it already
normalised with exact statistics, so these are exact too. K norms take K + 1 passes, the k-th
running only up to norm k (about K / 2 + 1 whole passes of the tiled levels).

What is left: the tile borders' zero padding inside the overlaps, which shrinks with the tile: on the
shipped shapes MoVQ 1.2e-2 of the picture's largest value with 128 px tiles, 1.9e-4 with 256 px tiles,
1.3e-6 with the automatic 512 px tiles at 1024 px, where tiled and untiled (fp32 and fp64 alike) agree to
rounding (benchmarks/bench_tiling_accuracy.py; docs/performance.md).

``passes=1`` keeps tile-local statistics; ``passes=n`` iterates: each pass normalises every norm
with the statistics the pass before gathered. That is cheaper but inconsistent: a later norm's
statistics were gathered from inputs computed with other statistics upstream, and on trained
weights the mismatch grows through the levels (on the shipped shapes MoVQ, 256 px latents of
a real picture, 128 px tiles: max |tiled - untiled| / max |untiled| is 0.21 with 1 pass, 0.41
with 2, 1.2e-2 exact; relative L2 3.3e-2, 7.0e-2, 3.0e-4; tests/test_tiling.py). On random
weights of the full-size config (benchmarks/bench_tiling.py) the iterated passes converge, which hid
this (on the demo config's random weights they drift too).

Tiling is automatic above ``AUTO_TILE_PIXELS`` (more pixels than 1024 x 1024 per image), and overridable
per call: ``movq.decode(z, tile=False)`` never tiles, ``tile=True`` tiles with ``DEFAULT_TILE``, ``tile=640``
tiles with 640-pixel tiles. Its mode is decided by measurement: ``DEFAULT_PASSES`` is the fastest mode of
``MEASURED_ERROR`` (each mode's worst error on the trained shapes MoVQ) within ``BOUND``, which is the exact
statistics; they cost about ``EXACT_COST`` untiled decodes, and the first tiled decode of a picture that
large says so once (a warning) rather than drift with a faster mode.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_TILE = 512  # image pixels per tile side
AUTO_TILE_PIXELS = 1024 * 1024  # tile=None tiles images with more pixels than this
# What tiling must hold: max |tiled - untiled| / max |untiled| (an fp64 untiled decode: the truth).
BOUND = 2e-2
# Each mode's worst max |tiled - untiled fp64| / max |untiled fp64| on the shipped shapes MoVQ (latents of real
# shapes pictures of seeds 0 and 1: 256 px in 128 px tiles, 512 px in 256 px tiles;
# benchmarks/bench_tiling_accuracy.py, docs/performance.md), fastest first. 1: tile-local statistics;
# 2: iterated once; "exact": K + 1 passes (1.19e-2 is the 128 px tiles' padding; 256 px tiles: 1.9e-4).
MEASURED_ERROR = {1: 0.55, 2: 0.95, "exact": 1.2e-2}
DEFAULT_PASSES = next(mode for mode, error in MEASURED_ERROR.items() if error <= BOUND)  # "exact"
EXACT_COST = 10  # exact tiled / untiled decode time on the CPU (the same benchmark: 16x, 11x, 8x at 256, 512, 1024 px)
_warned = False  # the slow-but-accurate warning is given once per process


# ----------------------------------------------------------------------------- settings


def resolve_tile(tile, height: int, width: int, factor: int, what: str = "tile") -> int | None:
    """The tile side in image pixels for an image of ``height`` x ``width``, or None (untiled).

    tile: None (automatic: DEFAULT_TILE above AUTO_TILE_PIXELS), True, False, or an int
    (pixels, a multiple of the downsampling factor ``factor``).
    """
    if tile is None:
        tile = height * width > AUTO_TILE_PIXELS
    if tile is False:
        return None
    if tile is True:
        tile = DEFAULT_TILE
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 4 * factor or tile % factor:
        raise ValueError(
            f"{what} must be None (automatic), True, False or a tile side in pixels that is a "
            f"multiple of {factor} and at least {4 * factor}; got {tile!r}"
        )
    if factor == 1 or (tile >= height and tile >= width):
        return None  # one tile covers the image (or there is no full-resolution part to tile)
    return tile


def default_overlap(tile: int, factor: int) -> int:
    """A quarter of the tile, rounded down to the downsampling factor."""
    return max(factor, tile // 4 // factor * factor)


def check_overlap(overlap: int, tile: int, factor: int) -> None:
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0 or overlap % factor \
            or overlap >= tile // 2 + 1:
        raise ValueError(
            f"overlap must be a number of pixels that is a multiple of {factor}, at least 0 and at "
            f"most half the tile ({tile}); got {overlap!r}"
        )


def check_passes(passes) -> None:
    if passes != "exact" and (isinstance(passes, bool) or not isinstance(passes, int) or passes < 1):
        raise ValueError(f"passes must be \"exact\" or a positive number of passes; got {passes!r}")


def warn_slow(passes, height: int, width: int) -> None:
    """Say once that a picture large enough to tile automatically is tiled with the accurate but slow
    exact statistics (what the faster modes would cost in accuracy, and how to decode untiled)."""
    global _warned
    if _warned or passes != "exact" or height * width <= AUTO_TILE_PIXELS:
        return
    _warned = True
    import warnings

    fast = min(mode for mode in MEASURED_ERROR if mode != "exact")
    warnings.warn(
        f"tiled MoVQ for a {width} x {height} picture: exact GroupNorm statistics, the only mode within "
        f"{BOUND:g} of untiled on trained weights, take about {EXACT_COST}x an untiled decode's time; "
        f"tile=False decodes untiled when memory allows (passes={fast} is faster but off by up to "
        f"{MEASURED_ERROR[fast]:g} of the picture's largest value).", stacklevel=3)


# ----------------------------------------------------------------------------- tiles


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of side ``tile`` covering ``[0, size)``, overlapping by at least
    ``overlap``; the last tile ends at ``size``."""
    if tile >= size:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def ramp(length: int, start: int, size: int, overlap: int) -> torch.Tensor:
    """1-D blending weight of a tile covering ``[start, start + length)`` of ``[0, size)``.

    0 over the outer third of the overlap on a side that borders another tile, linear
    across the middle third, 1 elsewhere (and on the image's own borders).
    """
    w = torch.ones(length)
    if overlap == 0:
        return w
    margin = overlap // 3
    width = max(overlap - 2 * margin, 1)
    rise = ((torch.arange(length) - margin + 0.5) / width).clamp(0, 1)  # 0 ... 1 from the start
    if start > 0:
        w = torch.minimum(w, rise)
    if start + length < size:
        w = torch.minimum(w, rise.flip(0))
    return w


class StopTile(Exception):
    """Raised inside a tile (exact statistics) at the first norm whose statistics are still being gathered."""


class GlobalNormStats:
    """Whole-image GroupNorm statistics, gathered tile by tile.

    Inside ``apply()`` every GroupNorm of ``model`` normalises with the statistics of the
    previous pass (when there was one) and adds the part of its input that the current
    tile owns (``owned``: a partition of the image, the overlaps split at their middle) to
    running sums. ``next_pass()`` turns the sums into the statistics of the next pass. The
    first norm's statistics are exact after one pass, and each pass makes the following
    norms' statistics closer to the whole-image ones.
    """

    def __init__(self, model: nn.Module, exact: bool = False):
        self.norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
        self.stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (mean, var) (B, G)
        self.sums: dict[int, list] = {}
        self.owned: tuple[slice, slice, int, int] | None = None  # rows, cols, tile h, tile w
        # exact: each pass runs the tiles up to the first norm without whole-image statistics, gathers
        # them (every norm before it normalised exactly, so they are exact too) and stops the tile
        # there (StopTile); the pass that meets no such norm is the output. K norms: K + 1 passes,
        # the k-th running the tiles only up to norm k (about K / 2 + 1 whole passes in all).
        self.exact = exact

    def next_pass(self) -> None:
        gathered = {}
        for key, (n, s1, s2) in self.sums.items():  # count, sum of n * mean, sum of n * E[x^2]
            mean = s1 / n
            gathered[key] = (mean, (s2 / n - mean**2).clamp_min(0))
        self.sums = {}
        if self.exact:
            self.stats.update({k: v for k, v in gathered.items() if k not in self.stats})  # the new exact one
        else:
            self.stats = gathered

    def norm(self, m: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        B, C, h, w = x.shape
        g = x.view(B, m.num_groups, C // m.num_groups, h, w)
        rows, cols, th, tw = self.owned
        sy, sx = h / th, w / tw  # this norm's resolution relative to the tile input
        own = g[..., int(rows.start * sy):int(rows.stop * sy), int(cols.start * sx):int(cols.stop * sx)]
        var, mean = torch.var_mean(own.float(), dim=(2, 3, 4), unbiased=False)  # (B, G) this tile's part
        n = own[0, 0].numel()
        mean, ex2 = mean.double(), var.double() + mean.double() ** 2
        old = self.sums.get(id(m))
        self.sums[id(m)] = (n, n * mean, n * ex2) if old is None else (old[0] + n, old[1] + n * mean, old[2] + n * ex2)
        if id(m) not in self.stats:
            if self.exact:
                raise StopTile  # this norm's statistics are gathered: the rest of the tile waits for them
            return F.group_norm(x, m.num_groups, m.weight, m.bias, m.eps)  # first pass: the tile's own
        mean, var = self.stats[id(m)]
        scale = torch.rsqrt(var + m.eps)  # (B, G), whole-image statistics
        shift = -mean * scale
        y = (g * scale.to(x.dtype)[..., None, None, None]).add_(shift.to(x.dtype)[..., None, None, None])
        return y.view(B, C, h, w).mul_(m.weight[:, None, None]).add_(m.bias[:, None, None])

    @contextlib.contextmanager
    def apply(self):
        for m in self.norms:
            m.forward = (lambda m: lambda x: self.norm(m, x))(m)  # an instance attribute shadows the class's
        try:
            yield self
        finally:
            for m in self.norms:
                del m.forward


def owned_range(starts: list[int], index: int, tile: int, size: int, unit: int) -> tuple[int, int]:
    """The part of tile ``index`` that it owns: from the middle of its overlap with the
    previous tile to the middle of its overlap with the next (multiples of ``unit``), relative
    to the tile's start."""
    start = starts[index]
    lo = 0 if index == 0 else (start + min(starts[index - 1] + tile, size)) // 2 // unit * unit
    hi = size if index == len(starts) - 1 else (starts[index + 1] + min(start + tile, size)) // 2 // unit * unit
    return lo - start, hi - start


def run_tiled(fn: Callable[[slice, slice], torch.Tensor], out_shape: tuple, in_size: tuple[int, int],
              tile: int, overlap: int, scale: float, device, dtype, norm_stats: GlobalNormStats | None = None,
              passes: int = 1, unit: int = 1) -> torch.Tensor:
    """Blend ``fn(rows, cols)`` over overlapping tiles of an input of ``in_size``.

    fn maps a crop (input rows, input cols) to its output, which is ``scale`` times as
    large (8 for the decoder's head, 1/8 for the encoder's stem); ``tile`` and ``overlap``
    are in input units. With ``norm_stats`` the tiles are run ``passes`` times, each pass
    normalising with the whole-image statistics gathered in the one before (``unit``: the
    input units the owned parts are rounded to). Returns the blended (B, C, H_out, W_out)
    output in ``dtype``.
    """
    H, W = in_size
    Ho, Wo = out_shape[-2:]
    ys, xs = tile_starts(H, tile, overlap), tile_starts(W, tile, overlap)
    exact = norm_stats is not None and norm_stats.exact
    p = 0
    while True:
        last = not exact and p == passes - 1  # (exact: the pass in which no tile stops)
        out = total = None
        for i, y in enumerate(ys):
            for j, x in enumerate(xs):
                th, tw = min(tile, H), min(tile, W)
                if norm_stats is not None:
                    r0, r1 = owned_range(ys, i, tile, H, unit)
                    c0, c1 = owned_range(xs, j, tile, W, unit)
                    norm_stats.owned = (slice(r0, r1), slice(c0, c1), th, tw)
                try:
                    piece = fn(slice(y, y + th), slice(x, x + tw))  # (B, C, th * scale, tw * scale)
                except StopTile:
                    continue
                if not (last or exact):
                    continue
                if out is None:
                    out = torch.zeros(out_shape, device=device, dtype=torch.float32)
                    total = torch.zeros(out_shape[-2:], device=device, dtype=torch.float32)
                y0, x0, ho, wo = int(y * scale), int(x * scale), int(th * scale), int(tw * scale)
                wy = ramp(ho, y0, Ho, int(overlap * scale)).to(device)
                wx = ramp(wo, x0, Wo, int(overlap * scale)).to(device)
                weight = wy[:, None] * wx[None, :]  # (ho, wo)
                out[..., y0:y0 + ho, x0:x0 + wo] += piece.float() * weight
                total[y0:y0 + ho, x0:x0 + wo] += weight
        if norm_stats is not None:
            norm_stats.next_pass()
        p += 1
        if (exact and out is not None) or (not exact and last):
            break
    return (out / total).to(dtype)


# ----------------------------------------------------------------------------- decode / encode


def tiled_decode(movq, latents: torch.Tensor, tile: int = DEFAULT_TILE, overlap: int | None = None,
                 force_not_quantize: bool = False, passes: int | str = DEFAULT_PASSES) -> torch.Tensor:
    """latents (B, 4, h, w) -> images (B, 3, f*h, f*w), the upsampling levels run in tiles of
    ``tile`` x ``tile`` image pixels overlapping by ``overlap`` (default: a quarter tile)."""
    f = movq.config.downsampling_factor
    movq.check_inputs(latents, movq.config.latent_channels, "latents")
    overlap = default_overlap(tile, f) if overlap is None else overlap
    check_overlap(overlap, tile, f)
    zq = latents if force_not_quantize else movq.quantizer(latents)[0]
    decoder = movq.decoder
    h = decoder.trunk(movq.post_quant_conv(zq), zq)  # (B, ch[0], h, w), whole image

    def head(rows: slice, cols: slice) -> torch.Tensor:
        return decoder.head(h[..., rows, cols], zq[..., rows, cols])  # (B, 3, f*th, f*tw)

    B, _, lh, lw = latents.shape
    out_shape = (B, movq.config.out_channels, lh * f, lw * f)
    check_passes(passes)
    warn_slow(passes, lh * f, lw * f)
    stats = GlobalNormStats(decoder, exact=passes == "exact") if passes == "exact" or passes > 1 else None
    with stats.apply() if stats else contextlib.nullcontext():
        return run_tiled(head, out_shape, (lh, lw), tile // f, overlap // f, f, latents.device, h.dtype,
                         stats, passes)


def tiled_encode(movq, images: torch.Tensor, tile: int = DEFAULT_TILE, overlap: int | None = None,
                 passes: int | str = DEFAULT_PASSES) -> torch.Tensor:
    """images (B, 3, H, W) -> latents (B, 4, H/f, W/f), the full-resolution levels run in
    tiles of ``tile`` x ``tile`` pixels overlapping by ``overlap`` (default: a quarter tile)."""
    f = movq.config.downsampling_factor
    movq.check_inputs(images, movq.config.in_channels, "images", f)
    overlap = default_overlap(tile, f) if overlap is None else overlap
    check_overlap(overlap, tile, f)
    encoder = movq.encoder

    def stem(rows: slice, cols: slice) -> torch.Tensor:
        return encoder.stem(images[..., rows, cols])  # (B, ch[-2], th/f, tw/f)

    B, _, H, W = images.shape
    channels = movq.config.block_out_channels[-2]
    check_passes(passes)
    warn_slow(passes, H, W)
    stats = GlobalNormStats(encoder, exact=passes == "exact") if passes == "exact" or passes > 1 else None
    with stats.apply() if stats else contextlib.nullcontext():
        features = run_tiled(stem, (B, channels, H // f, W // f), (H, W), tile, overlap, 1 / f,
                             images.device, images.dtype, stats, passes, unit=f)
    return movq.quant_conv(encoder.trunk(features))  # (B, 4, H/f, W/f)
