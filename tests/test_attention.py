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


# ----------------------------------------------------------------------------- per-layer hooks
def test_hook_layer_reroutes_one_layer_nests_and_leaves_nothing():
    """Hooks on one layer nest (first installed = outermost) and see only that layer's call; the
    call in progress is put back after each run, errors included."""
    from kandinsky.calls import now
    from tests.refs.movq import MOVQ_TINY_CONFIG

    torch.manual_seed(0)
    movq = build_model({"_class_name": "VQModel", **MOVQ_TINY_CONFIG}).eval()
    layer = movq.encoder.mid.attn
    order = []

    def outer(q, k, v, mask, causal, compute):
        order.append("outer")
        return 2 * compute(q, k, v, mask, causal)

    def inner(q, k, v, mask, causal, compute):
        order.append("inner")
        assert now().layer.module is layer and now().layer.hooks == (outer, inner)
        return compute(q, k, v, mask, causal) + 1

    seen = {}
    h = layer.register_forward_hook(lambda m, a, out: seen.__setitem__("io", (a[0], out)))
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        with attn.hook_layer(layer, outer), attn.hook_layer(layer, inner):
            movq.encode(x)
            assert now().layer is None  # only while the layer runs
        h.remove()
        assert order == ["outer", "inner"]  # one attention call in the hooked layer, nobody else's
        layer_in, hooked = seen["io"]
        with attn.use_backend(lambda q, k, v, mask=None, causal=False: 2 * (attn.sdpa(q, k, v, mask, causal) + 1)):
            expected = layer(layer_in)  # the same layer with 2 * (attention + 1) computed by hand
    torch.testing.assert_close(hooked, expected)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in movq.modules())

    def boom(q, k, v, mask, causal, compute):
        raise RuntimeError("boom")

    with attn.hook_layer(layer, boom):
        try:
            movq.encode(x)
        except RuntimeError:
            pass
    assert now().layer is None  # put back by the forward hook that runs on errors too
