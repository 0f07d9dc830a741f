"""The attention backend swap reaches every model (one place to patch)."""
import math

import torch

from kandinsky import attention as attn
from weights_convert import build_model


def naive(q, k, v, mask=None, causal=False):
    """Textbook softmax(q k^T / sqrt(d)) v, counting its calls."""
    naive.calls += 1
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        L, S = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(L, S, dtype=torch.bool).triu(1), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores.softmax(-1) @ v


def test_backend_swap_reaches_models_and_matches_sdpa():
    from tests.refs.movq import MOVQ_TINY_CONFIG

    torch.manual_seed(0)
    movq = build_model({"_class_name": "VQModel", **MOVQ_TINY_CONFIG}).eval()
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        expected = movq.decode(movq.encode(x), force_not_quantize=True)
        naive.calls = 0
        with attn.use_backend(naive):
            got = movq.decode(movq.encode(x), force_not_quantize=True)
    assert naive.calls >= 2  # encoder and decoder attention both went through the swap
    assert attn._backend is attn.sdpa  # restored
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_naive_backend_agrees_with_sdpa_on_masks():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    mask = torch.rand(2, 1, 5, 5) > 0.3
    mask[..., 0] = True
    naive.calls = 0
    for kwargs in ({}, {"mask": mask}, {"causal": True}):
        torch.testing.assert_close(naive(q, k, v, **kwargs), attn.sdpa(q, k, v, **kwargs))
