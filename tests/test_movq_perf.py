"""MoVQ speed measures that tests can hold: channels_last memory format propagates through
every module (decode and encode), torch.compile traces decode and encode without graph
breaks, and SpatialNorm's broadcast form equals the reference's upsampled form."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kandinsky.movq import MoVQ, MoVQConfig
from kandinsky.movq.model import SpatialNorm
from tests.helpers import randomize_
from tests.refs.movq import MOVQ_TINY_CONFIG

CL = torch.channels_last


@pytest.fixture(scope="module")
def movq():
    return randomize_(MoVQ(MoVQConfig.from_dict(MOVQ_TINY_CONFIG))).eval()


@torch.no_grad()
def test_channels_last_propagates(movq):
    model = MoVQ(movq.config).eval()
    model.load_state_dict(movq.state_dict())
    model.to(memory_format=CL)
    lost = []

    def check(module, args, out):
        if isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[-1] > 1 and not out.is_contiguous(memory_format=CL):
            lost.append(type(module).__name__)

    handles = [m.register_forward_hook(check) for m in model.modules()]
    z = torch.randn(1, 4, 4, 6).contiguous(memory_format=CL)
    x = torch.rand(1, 3, 32, 48).contiguous(memory_format=CL) * 2 - 1
    image, latents = model.decode(z, force_not_quantize=True), model.encode(x)
    for h in handles:
        h.remove()
    assert lost == []
    assert image.is_contiguous(memory_format=CL) and latents.is_contiguous(memory_format=CL)
    torch.testing.assert_close(image, movq.decode(z.contiguous(), force_not_quantize=True), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_decode_works_channels_last_and_returns_the_callers_layout(movq):
    """On the CPU the decoder works in channels-last (movq.model.conv_layout, measured faster); an NCHW
    caller still gets an NCHW picture, equal to the NCHW computation up to float rounding."""
    z = torch.randn(1, 4, 4, 6)
    seen = []
    handle = movq.decoder.conv_out.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    image = movq.decode(z, force_not_quantize=True)
    handle.remove()
    assert seen[0].is_contiguous(memory_format=CL) and image.is_contiguous()
    d = movq.decoder
    h = d.conv_in(movq.post_quant_conv(z))  # the same maths in NCHW, module by module
    h = d.up[0].blocks(d.mid(h, z), z)
    h = d.up[0].upsampled(h)
    for level in d.up[1:]:
        h = level(h, z)
    assert h.is_contiguous()
    torch.testing.assert_close(image, d.conv_out(F.silu(d.norm_out(h, z))), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("what", ["decode", "encode"])
def test_compiles_without_graph_breaks(movq, what):
    import torch._dynamo

    torch._dynamo.reset()
    if what == "decode":
        fn, arg = (lambda z: movq.decode(z, force_not_quantize=True)), torch.randn(1, 4, 4, 4)
    else:
        fn, arg = movq.encode, torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        explained = torch._dynamo.explain(fn)(arg)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@torch.no_grad()
def test_spatial_norm_broadcast_equals_upsampling():
    torch.manual_seed(0)
    norm = randomize_(SpatialNorm(64, 4))
    zq = torch.randn(2, 4, 3, 5)
    for size in [(3, 5), (6, 10), (24, 40), (7, 11)]:  # factors 1, 2, 8, and not a whole factor
        f = torch.randn(2, 64, *size)
        up = F.interpolate(zq, size=size, mode="nearest")
        expected = norm.norm_layer(f) * norm.conv_y(up) + norm.conv_b(up)
        torch.testing.assert_close(norm(f, zq), expected, rtol=1e-5, atol=1e-5)
