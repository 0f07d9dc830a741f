"""The one place where attention is computed.

Every attention layer in kandinsky (CLIP, prior, UNet, MoVQ) projects its own
queries, keys and values and then calls :func:`attention`. Keeping the softmax
here means one function to patch for a different kernel, to capture attention
maps, or to change precision.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
