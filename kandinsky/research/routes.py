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
conditioning argument they are given. With feature caching (``cache_interval``) a cached evaluation
reuses the deep levels' output of the last full one, patched or not, as it reuses everything there. The patched conditioning is computed with
the UNet's own modules and the same operations as its forward, so patching every route everywhere
is bit-identical to running with ``source_embeds``, and a call with nothing to patch is untouched.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from kandinsky.calls import current_call
from kandinsky.research.capture import _rows, branch_filter, step_filter
from kandinsky.research.targets import components, match

ROUTES = ("time", "tokens")
BRANCHES = ("cond", "uncond", "both")
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
