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
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F

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
