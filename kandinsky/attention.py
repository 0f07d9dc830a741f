"""The one place where attention is computed.

Every attention layer in kandinsky (CLIP, prior, UNet, MoVQ) projects its own
queries, keys and values and then calls :func:`attention`. Keeping the softmax
here means one function to swap for a different kernel, to capture attention
maps, or to change precision:

    from kandinsky import attention as attn

    def my_attention(q, k, v, mask=None, causal=False):
        ...  # (B, heads, Lq, d) -> (B, heads, Lq, d)

    with attn.use_backend(my_attention):   # every model, every layer
        unet(sample, t, image_embeds)

Model files import ``attention`` by name; it looks the backend up at call time, so
swapping the backend here reaches all of them.

Per-layer hooks (what ``kandinsky.capture(..., attention=True)`` and the attention edits of
``kandinsky.intervene`` use): :func:`hook_layer` wraps ONE attention module so that, while
that module runs, :func:`attention` passes its q, k, v through the layer's hooks:

    def record(q, k, v, mask, causal, compute):      # compute(q, k, v, mask, causal) -> out
        probs = attention_probs(q, k, v, mask, causal)  # (B, heads, Lq, Lk), explicit
        return compute(q, k, v, mask, causal)         # the layer's output, unchanged

    with hook_layer(unet.mid.attn, record):
        unet(sample, t, image_embeds)

Every other layer keeps calling the backend directly. Which layer is running is part of the
call in progress (:mod:`kandinsky.calls`, a context variable): the hooked module's forward
pre-hook sets it and its forward hook resets it. Nothing is kept per module anywhere else.
Under torch.compile the attention function does not look (context variables do not trace), so
``torch.compile(model, fullgraph=True)`` traces the plain backend.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F

import kandinsky.calls as calls

AttentionFn = Callable[..., torch.Tensor]


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """The default backend: torch's fused scaled dot-product attention."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


_backend: AttentionFn = sdpa


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Multi-head scaled dot-product attention.

    q: (B, heads, Lq, d); k, v: (B, heads, Lk, d) -> (B, heads, Lq, d).
    mask: bool (True = may attend) or additive float, broadcastable to (B, heads, Lq, Lk).
    The scale is 1/sqrt(d).
    """
    if not torch.compiler.is_compiling():
        layer = calls.now().layer
        if layer is not None:  # a hooked layer is running (see hook_layer)
            return _run_hooks(layer.hooks, q, k, v, mask, causal)
    return _backend(q, k, v, mask=mask, causal=causal)


def set_backend(fn: AttentionFn | None) -> AttentionFn:
    """Make ``fn(q, k, v, mask=None, causal=False)`` compute every attention; None restores
    the default. Returns the previous backend."""
    global _backend
    previous, _backend = _backend, (fn or sdpa)
    return previous


@contextlib.contextmanager
def use_backend(fn: AttentionFn):
    """Temporarily compute every attention with ``fn``."""
    previous = set_backend(fn)
    try:
        yield
    finally:
        set_backend(previous)


# ----------------------------------------------------------------------------- per-layer hooks
# A layer hook: fn(q, k, v, mask, causal, compute) -> out, where compute(q, k, v, mask, causal)
# runs the remaining hooks and then the backend. It may observe (record probabilities), change
# the inputs (drop keys, scale values) or change the output (ablate heads).
LayerHook = Callable[..., torch.Tensor]


def _run_hooks(hooks: tuple[LayerHook, ...], q, k, v, mask, causal) -> torch.Tensor:
    def call(i: int):
        if i == len(hooks):
            return lambda q, k, v, mask, causal: _backend(q, k, v, mask=mask, causal=causal)
        return lambda q, k, v, mask, causal: hooks[i](q, k, v, mask, causal, call(i + 1))

    return call(0)(q, k, v, mask, causal)


@contextlib.contextmanager
def hook_layer(module: torch.nn.Module, fn: LayerHook):
    """While the block runs, every :func:`attention` call made by ``module`` (an attention
    layer: it must call :func:`attention` directly, not through child layers) goes through
    ``fn(q, k, v, mask, causal, compute)``. Several hooks on one module nest (first
    installed = outermost). Nothing is left installed after the block."""
    tokens = []  # one per run of the module in progress

    def enter(mod, args):  # joins the hooks installed before it on this module (their pre-hooks ran first)
        running = calls.now().layer
        outer = running.hooks if running is not None and running.module is mod else ()
        tokens.append(calls.enter(layer=calls.LayerCall(mod, outer + (fn,))))

    def leave(mod, args, output):  # prepended: the last installed leaves first
        calls.leave(tokens.pop())

    handles = [module.register_forward_pre_hook(enter),
               module.register_forward_hook(leave, prepend=True, always_call=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """The attention probabilities softmax(q k^T / sqrt(d) + mask), computed explicitly in
    float32: (B, heads, Lq, Lk), each row sums to 1. Same mask conventions as :func:`attention`."""
    q, k = q.float(), k.float()
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, heads, Lq, Lk)
    if causal:
        Lq, Lk = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    return scores.softmax(dim=-1)
