"""Conditioning routes: where the image embedding enters the decoder UNet, and patching it there.

Kandinsky 2.2's decoder sees the prompt only as one CLIP image embedding, and it enters the UNet by
two routes (kandinsky/unet/model.py):

    "time"    emb = time_embed(t) + image_embed(image_embeds)     every ResBlock's scale-shift reads emb
    "tokens"  tokens = image_tokens(image_embeds)  (B, 32, C)       every AddedKVAttention's extra keys / values

:func:`patch_routes` makes chosen UNet calls use another embedding (``source_embeds``) on chosen
routes, at chosen levels (the UNet's own module names: "down.1", "mid", "up.2", or any module
under them), sampler steps and guidance branches:

    with kandinsky.patch_routes(pipe, embeds_b, routes=["tokens"], levels=["up.1"], steps=range(0, 5)):
        pipe.text2img(embeds_a, negative, ...)      # A's run, with B's tokens in up.1 for the first 5 steps

It is plain PyTorch hooks, installed for the length of the block: a forward hook keeps the call's
time_embed(t) (every UNet evaluation, ``forward`` or ``forward_cached``, runs it first); a pre-hook
on ``image_embed`` works out which rows of the call in progress are patched (:mod:`kandinsky.calls`:
the step and the guidance branches, the same row logic as ``intervene``) and the patched embedding;
pre-hooks on the chosen levels' ResBlocks ("time") and attention layers ("tokens") swap the
conditioning argument they are given. The patched conditioning is computed with
the UNet's own modules and the same operations as its forward, so patching every route everywhere
is bit-identical to running with ``source_embeds``, and a call with nothing to patch is untouched.
With feature caching (``cache_interval``) a cached evaluation reuses the deep levels' output of the
last full one, patched or not, as it reuses everything there.
"""
from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
import torch.nn.functional as F
from torch import nn

from kandinsky.calls import current_call
from kandinsky.research.capture import _rows, branch_filter, step_filter
from kandinsky.research.targets import components, match

ROUTES = ("time", "tokens")
BRANCHES = ("cond", "uncond", "both")
ALL = "all"  # a route map's row patching every level
# module attributes of the UNet (kandinsky.unet.model.UNet) each route starts from, and who reads it
ROUTE_SOURCES = {"time": "image_embed", "tokens": "image_tokens"}


def find_unet(target) -> nn.Module:
    """The decoder UNet of a DecoderPipeline / Kandinsky, or ``target`` itself when it is the UNet."""
    for prefix, model in components(target):
        if prefix in ("", "unet") and all(hasattr(model, a) for a in ("time_embed", *ROUTE_SOURCES.values())):
            return model
    raise TypeError(f"patch_routes needs a DecoderPipeline, a Kandinsky or the decoder UNet, got "
                    f"{type(target).__name__}")


def readers(unet: nn.Module) -> dict[str, dict[str, nn.Module]]:
    """{"time": {name: ResBlock}, "tokens": {name: AddedKVAttention}}: the modules that read each route,
    by their names in the UNet (a ResBlock is a module with a ``time_emb_proj``, an attention layer
    one that declares an "added_kv" token layout)."""
    out = {"time": {}, "tokens": {}}
    for name, module in unet.named_modules():
        if getattr(module, "time_emb_proj", None) is not None:
            out["time"][name] = module
        layout = getattr(module, "token_layout", None)
        if callable(layout) and layout().get("kind") == "added_kv":
            out["tokens"][name] = module
    return out


def _under(name: str, levels: list[str]) -> bool:
    return any(name == level or name.startswith(level + ".") for level in levels)


def _check(routes, levels, branch, unet) -> tuple[tuple[str, ...], list[str] | None]:
    if isinstance(routes, str):
        routes = (routes,)
    routes = tuple(routes)
    bad = [r for r in routes if r not in ROUTES]
    if bad or not all(isinstance(r, str) for r in routes):
        raise ValueError(f"routes must be a list of {ROUTES}, got {routes!r}")
    if branch not in BRANCHES:
        raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
    if levels is None:
        return routes, None
    levels = [levels] if isinstance(levels, str) else list(levels)
    if not all(isinstance(level, str) for level in levels):
        raise TypeError(f"levels must be UNet module names like 'down.1', 'mid', 'up.2' (or None for all), "
                        f"got {levels!r}")
    if levels:
        match(unet, levels)  # an error naming a level that is no module of the UNet
    return routes, levels


def _source_rows(source: torch.Tensor, chunk: int, dim: int) -> torch.Tensor:
    """source (1, D) or (chunk, D) -> (chunk, D), one row per row of a guidance branch."""
    if source.shape[0] == 1:
        return source.expand(chunk, dim)
    if source.shape[0] != chunk:
        raise ValueError(f"source_embeds has {source.shape[0]} rows but each guidance branch of the UNet call has "
                         f"{chunk}; give one row (used for every row) or one per row of the batch")
    return source


@dataclasses.dataclass
class _Call:
    """The UNet call in progress: the patched embedding, and what each route reads when patched."""

    embeds: torch.Tensor  # (B, D) the call's embedding with the patched rows replaced
    time: torch.Tensor | None = None  # (B, emb_dim) time_embed(t) of the call, then the patched emb
    tokens: torch.Tensor | None = None  # (B, 32, C) image_tokens of the patched embedding


@contextlib.contextmanager
def patch_routes(target, source_embeds: torch.Tensor, *, routes=ROUTES, levels=None, steps=None, branch="cond"):
    """Inside the block, decoder UNet calls read ``source_embeds`` instead of their own image embedding
    on ``routes`` ("time", "tokens"), in ``levels`` (UNet module names: "down.0", "mid", "up.3", or
    deeper like "up.1.attn.0"; None = all), at sampler ``steps`` (int, list, range, slice; None = all)
    and on ``branch`` ("cond", "uncond" or "both"). Outside a sampling run (a bare UNet call) every
    row counts as patched (when ``steps`` is None).

    target         a DecoderPipeline, a Kandinsky or the decoder UNet
    source_embeds  (D,), (1, D) or (B, D): one row for every row, or one per row of each branch
    """
    unet = find_unet(target)
    routes, levels = _check(routes, levels, branch, unet)
    if not isinstance(source_embeds, torch.Tensor) or source_embeds.ndim not in (1, 2):
        got = tuple(source_embeds.shape) if isinstance(source_embeds, torch.Tensor) else type(source_embeds).__name__
        raise ValueError(f"source_embeds must be a (D,) or (B, D) tensor of image embeddings, got {got}")
    dim = unet.config.encoder_hid_dim
    source = source_embeds.reshape(-1, source_embeds.shape[-1])
    if source.shape[-1] != dim:
        raise ValueError(f"source_embeds must have the UNet's encoder_hid_dim = {dim} columns, got {source.shape[-1]}")
    keep_step, keep = step_filter(steps), branch_filter(None if branch == "both" else branch)
    keep_branch = lambda b: b is None or keep(b)  # noqa: E731  (None: outside a sampling run)
    patched = {r: {n: m for n, m in mods.items() if levels is None or _under(n, levels)}
               for r, mods in readers(unet).items() if r in routes}
    state: dict = {}

    def time_embedding(module, args, out):  # time_embed(t) of the call starting now (the UNet runs it first)
        state.clear()
        state["t"] = out  # (B, emb_dim)

    def start(module, args):
        """image_embed pre-hook (it reads the call's embedding, cast to the sample's dtype): which rows
        this call patches, and their embedding; no call state when nothing is patched."""
        embeds = args[0]  # (B, D)
        t_emb = state.pop("t", None)
        rows = _rows("unet", keep_step, keep_branch, embeds.shape[0], embeds.device)
        if rows is False:
            return None
        call = current_call()
        n = len(call.branches) if call is not None else 1
        src = _source_rows(source.to(device=embeds.device, dtype=embeds.dtype), embeds.shape[0] // n, dim)
        src = torch.cat([src] * n)  # (B, D)
        state["call"] = _Call(src if rows is None else torch.where(rows[:, None], src, embeds))
        if "time" in routes:  # the forward's own sum: time_embed(t) + image_embed(embeds)
            state["call"].time = t_emb + module.forward(state["call"].embeds)
        return None

    def swap(route):
        def hook(module, args):
            call = state.get("call")
            if call is None:
                return None
            if route == "tokens" and call.tokens is None:
                call.tokens = unet.image_tokens.forward(call.embeds)  # (B, 32, C)
            return (args[0], getattr(call, route), *args[2:])

        return hook

    with contextlib.ExitStack() as stack:
        handles = [unet.time_embed.register_forward_hook(time_embedding),
                   unet.image_embed.register_forward_pre_hook(start)]
        handles += [m.register_forward_pre_hook(swap(route)) for route, mods in patched.items() for m in mods.values()]
        for handle in handles:
            stack.callback(handle.remove)
        stack.callback(state.clear)
        yield


# ----------------------------------------------------------------------------- causal maps
@dataclasses.dataclass(frozen=True)
class Grid:
    """The cells of a route map: rows = each route x each level, columns = step windows.

    routes   the routes patched, one row block each ("time", "tokens", or both: "time+tokens")
    levels   UNet module names, one row each: None = every level of the UNet ("down.0" .. "mid" ..
             "up.N"); a name also covers the modules under it ("down" = every down level); "all" = the
             whole UNet
    windows  the step windows: an int (that many equal contiguous windows of the run's steps) or a
             list of (start, stop) step ranges
    """

    routes: tuple[str, ...] = (*ROUTES, "time+tokens")
    levels: tuple[str, ...] | None = None
    windows: int | tuple[tuple[int, int], ...] = 4

    def rows(self, unet) -> list[tuple[str, str]]:
        levels = self.levels or ([f"down.{i}" for i in range(len(unet.down))] + ["mid"]
                                 + [f"up.{i}" for i in range(len(unet.up))])
        _check([r for route in self.routes for r in route.split("+")], [lv for lv in levels if lv != ALL], "cond",
               unet)
        return [(route, level) for route in self.routes for level in levels]

    def columns(self, steps: int) -> list[tuple[int, int]]:
        if isinstance(self.windows, int):
            if not 1 <= self.windows <= steps:
                raise ValueError(f"grid windows must be 1..{steps} (the run's steps), got {self.windows}")
            edges = [round(i * steps / self.windows) for i in range(self.windows + 1)]
            return list(zip(edges[:-1], edges[1:]))
        windows = [tuple(int(v) for v in w) for w in self.windows]
        bad = [w for w in windows if len(w) != 2 or not 0 <= w[0] < w[1] <= steps]
        if bad or not windows:
            raise ValueError(f"grid windows must be (start, stop) step ranges within 0..{steps}, got {self.windows!r}")
        return windows


@dataclasses.dataclass
class RouteMap:
    """What :func:`route_map` measured. ``values[name]`` is a (rows, windows) array: the mean of the
    measure over the pictures (pairs x seeds) of each patched run, where the measure is 0 at A's
    picture and 1 at B's (shapes: the share of pictures showing B's value of the attribute; clip:
    how far the CLIP image embedding moved from A's picture to B's). ``a`` / ``b``: the measure of
    the unpatched A and B runs themselves (the map's floor and ceiling)."""

    prompts_a: list[str]
    prompts_b: list[str]
    seeds: list[int]
    steps: int
    rows: list[tuple[str, str]]
    windows: list[tuple[int, int]]
    values: dict[str, np.ndarray]
    a: dict[str, float]
    b: dict[str, float]
    counts: dict[str, int]  # pictures behind each cell of values[name]
    scores: dict[str, np.ndarray] | None = None  # (rows, windows, N) each picture's score (NaN: unmeasured)
    pair_of: list[int] | None = None  # (N,) picture -> pair

    def standard_error(self, name: str) -> np.ndarray:
        """(rows, windows) standard error of each cell's value, pictures clustered by caption pair (the
        pictures of one pair under several seeds are not independent): the spread of the per-pair means
        over sqrt(pairs), sd(m_k) / sqrt(K). With one seed it is the plain standard error of a mean."""
        scores, pair_of = self.scores[name], np.asarray(self.pair_of)
        pairs = [scores[..., pair_of == k] for k in np.unique(pair_of)]
        means = np.stack([np.nanmean(s, axis=-1) for s in pairs if np.isfinite(s).any()], -1)  # (rows, windows, K)
        return means.std(-1, ddof=1) / np.sqrt(means.shape[-1])

    def picture(self, cell: int = 34) -> PIL.Image.Image:
        """One heat map per measure, side by side: rows route x level, columns step windows, values
        in [0, 1] (written in the cells) on one colour scale."""
        from kandinsky.research.viz import BACKGROUND, _colorbar, _text, colorize

        names = list(self.values)
        label_w, head, gap = 104, 48, 20
        cw = max(cell, 150 // len(self.windows))  # a cell's width: each map at least 150 pixels wide
        width = len(self.windows) * cw
        W = max(label_w + len(names) * (width + gap), label_w + 560)
        H = head + len(self.rows) * cell + 40
        canvas = PIL.Image.new("RGB", (W, H), BACKGROUND)
        draw = PIL.ImageDraw.Draw(canvas)
        for i, (route, level) in enumerate(self.rows):
            _text(draw, (4, head + i * cell + cell // 2), f"{route} {level}", anchor="lm")
        for k, name in enumerate(names):
            x0 = label_w + k * (width + gap)
            _text(draw, (x0, 2), name)
            _text(draw, (x0, 15), f"A {self.a[name]:.2f}  B {self.b[name]:.2f}  n {self.counts[name]}")
            colours = colorize(self.values[name])  # (rows, windows, 3)
            for j, (start, stop) in enumerate(self.windows):
                _text(draw, (x0 + j * cw + cw // 2, head - 4), f"{start}-{stop - 1}", anchor="md")
                for i in range(len(self.rows)):
                    box = (x0 + j * cw, head + i * cell, x0 + (j + 1) * cw - 1, head + (i + 1) * cell - 1)
                    draw.rectangle(box, fill=tuple(int(c) for c in colours[i, j]))
                    value = self.values[name][i, j]
                    ink = (255, 255, 255) if value < 0.6 else (0, 0, 0)
                    draw.text((box[0] + cw // 2, box[1] + cell // 2), f"{value:.2f}", fill=ink, anchor="mm")
        _colorbar(canvas, draw, (label_w, H - 30), 120,
                  "0 = A's picture, 1 = B's; columns: step windows")
        _text(draw, (4, H - 12), f"A: {self.prompts_a[0]}   B: {self.prompts_b[0]}"
              + (f"   (+{len(self.prompts_a) - 1} pairs)" if len(self.prompts_a) > 1 else "")
              + f"   seeds {self.seeds}, {self.steps} steps")
        return canvas


def shapes_measure(prompts_a: list[str], prompts_b: list[str]):
    """The shapes model's measure: for each attribute the two prompts of a pair state differently, 1
    where the analyser finds B's value in the picture, else 0 (pairs that agree on it: NaN)."""
    from kandinsky.data.analyse import analyse
    from kandinsky.data.shapes import ATTRIBUTES, parse_caption

    stated_a, stated_b = [parse_caption(p) for p in prompts_a], [parse_caption(p) for p in prompts_b]
    differ = {n for a, b in zip(stated_a, stated_b) for n in ATTRIBUTES if n in b and a.get(n) != b[n]}
    if not differ:
        raise ValueError("measure 'shapes': the A and B prompts state no attribute differently; give pairs like "
                         "'a red circle' / 'a green circle'")
    names = [n for n in ATTRIBUTES if n in differ]

    def measure(pictures, pair_of, pictures_a, pictures_b):
        found = [analyse(p) for p in pictures]
        return {n: np.array([float(getattr(f, n) == stated_b[k][n]) if n in stated_b[k]
                             and stated_a[k].get(n) != stated_b[k][n] else np.nan
                             for f, k in zip(found, pair_of)]) for n in names}

    return measure


SAME = 1e-9  # 1 - cos(A's picture, B's) at or below this: one picture to CLIP, nothing to measure (NaN)


def clip_measure(pipe):
    """Any model's measure: where each picture's CLIP image embedding lies between A's and B's pictures
    of the same pair and seed, (d - d_A) / (d_B - d_A) with d = cos(x, B) - cos(x, A): 0 at A, 1 at B
    (NaN where A's and B's pictures are the same picture to CLIP)."""
    from kandinsky.research.embeddings import image_embeds

    cache = {}  # A's and B's pictures are measured against every cell: embedded once

    def embed(pictures, keep=False):
        if id(pictures) in cache:
            return cache[id(pictures)][1]
        embeds = image_embeds(pipe.prior, list(pictures))
        if keep:
            cache[id(pictures)] = (pictures, embeds)  # holding the list keeps its id unique
        return embeds

    def measure(pictures, pair_of, pictures_a, pictures_b):
        x, a, b = (F.normalize(e.double(), dim=-1)  # float64: A and B may be close
                   for e in (embed(pictures), embed(pictures_a, keep=True), embed(pictures_b, keep=True)))
        d = (x * b).sum(-1) - (x * a).sum(-1)
        ab = (a * b).sum(-1)
        moved = (d - (ab - 1)) / (2 * (1 - ab))
        return {"clip": torch.where(1 - ab > SAME, moved, torch.nan).numpy()}

    return measure


def route_map(pipe, prompt_a, prompt_b, *, measure, grid: Grid | None = None, seeds=(0,),
              num_inference_steps: int = 20, prior_steps: int = 25, height: int = 64, width: int = 64,
              prior_seed: int = 0, **options) -> RouteMap:
    """Patch B's image embedding into A's decoder run on each cell of ``grid`` (a route at a level,
    for a window of steps; the conditional branch) and measure how far each picture moved toward B.

    pipe       a Kandinsky pipeline (its prior turns the prompts into image embeddings)
    prompt_a, prompt_b   a prompt each, or equal-length lists of pairs
    measure    "shapes" (the shapes model: the analyser's attributes the prompts state differently),
               "clip" (any model: CLIP image-embedding position between A's and B's pictures), or
               fn(pictures, pair_of, pictures_a, pictures_b) -> {name: (N,) scores, 0 = A, 1 = B}
    seeds      decoder seeds; every cell runs all pairs x seeds as one batch
    options    further decoder options (guidance_scale, ...)
    """
    prompts_a = [prompt_a] if isinstance(prompt_a, str) else list(prompt_a)
    prompts_b = [prompt_b] if isinstance(prompt_b, str) else list(prompt_b)
    if not prompts_a or len(prompts_a) != len(prompts_b):
        raise ValueError(f"prompt_a and prompt_b must be prompts or lists of equal length, got {len(prompts_a)} "
                         f"and {len(prompts_b)}")
    seeds = [int(s) for s in ([seeds] if isinstance(seeds, int) else seeds)]
    if isinstance(measure, str):
        if measure not in ("shapes", "clip"):
            raise ValueError(f"measure must be 'shapes', 'clip' or a function, got {measure!r}")
        measure = shapes_measure(prompts_a, prompts_b) if measure == "shapes" else clip_measure(pipe)
    elif not callable(measure):
        raise TypeError(f"measure must be 'shapes', 'clip' or a function, got {measure!r}")
    grid = grid or Grid()
    unet = find_unet(pipe.decoder)
    rows, windows = grid.rows(unet), grid.columns(num_inference_steps)

    n_pairs = len(prompts_a)
    prior = pipe.prior(prompts_a + prompts_b, num_inference_steps=prior_steps, progress=False,
                       generator=torch.Generator().manual_seed(prior_seed))
    ea, eb = prior.image_embeds[:n_pairs], prior.image_embeds[n_pairs:]
    pair_of = [k for k in range(n_pairs) for _ in seeds]  # batch row -> pair
    a, b = ea[pair_of], eb[pair_of]  # (N, D)
    negative = prior.negative_image_embeds[:n_pairs][pair_of]

    def paint(embeds):
        generators = [torch.Generator().manual_seed(s) for _ in range(n_pairs) for s in seeds]
        return pipe.decoder.text2img(embeds, negative, generator=generators, num_inference_steps=num_inference_steps,
                                     height=height, width=width, progress=False, **options).images

    pictures_a, pictures_b = paint(a), paint(b)
    score = lambda pictures: measure(pictures, pair_of, pictures_a, pictures_b)  # noqa: E731
    at_a, at_b = score(pictures_a), score(pictures_b)
    scores = {name: np.zeros((len(rows), len(windows), len(pair_of))) for name in at_a}  # (rows, windows, N)
    for i, (route, level) in enumerate(rows):
        for j, (start, stop) in enumerate(windows):
            with patch_routes(pipe.decoder, b, routes=route.split("+"), levels=None if level == ALL else [level],
                              steps=range(start, stop)):
                cell = score(paint(a))
            for name in scores:
                scores[name][i, j] = cell[name]
    values = {name: np.apply_along_axis(_mean, -1, s).reshape(s.shape[:2]) for name, s in scores.items()}
    return RouteMap(prompts_a, prompts_b, seeds, num_inference_steps, rows, windows, values,
                    {n: _mean(v) for n, v in at_a.items()}, {n: _mean(v) for n, v in at_b.items()},
                    {n: int(np.isfinite(v).sum()) for n, v in at_a.items()}, scores, pair_of)


def _mean(scores) -> float:
    """The mean of the measured (finite) scores; NaN when none was measured."""
    scores = np.asarray(scores, dtype=np.float64)
    return float(scores[np.isfinite(scores)].mean()) if np.isfinite(scores).any() else float("nan")


def attribute_pairs(attribute: str, n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n`` pairs of full shapes-grammar captions (every attribute stated) that differ in ``attribute``
    alone: scenes drawn from ``seed``, B's value another of the attribute's values (colour and
    background never equal). -> (prompts_a, prompts_b), for ``route_map(pipe, *pairs, measure="shapes")``."""
    from kandinsky.data import shapes
    from kandinsky.data.evaluate import VALUES as values  # each attribute's values

    if attribute not in values:
        raise ValueError(f"attribute must be one of {tuple(values)}, got {attribute!r}")
    prompts_a, prompts_b = [], []
    for i in range(n):
        rng = shapes.rng_for(seed, i)
        scene = shapes.random_scene(rng)
        taken = ({scene.colour, scene.background} if attribute in ("colour", "background")
                 else {getattr(scene, attribute)})
        others = [v for v in values[attribute] if v not in taken]
        other = shapes.random_scene(rng, **{**scene.attributes(), attribute: others[rng.integers(len(others))]})
        prompts_a.append(shapes.caption(scene))
        prompts_b.append(shapes.caption(other))
    return prompts_a, prompts_b
