"""MoVQs of any depth (issue 7 item 7): diffusers VQModels with 1, 2 or 3 levels in
``block_out_channels`` (the reference's own Kandinsky 2.2 test configs use 2) load through
``load_component`` and match the reference VQModel."""
from __future__ import annotations

import pytest
import torch

from kandinsky.movq import MoVQ
from tests.helpers import assert_close, randomize_
from weights_convert import load_component


def depth_config(widths: list[int]) -> dict:
    """diffusers' tiny Kandinsky 2.2 MoVQ (tests/pipelines/kandinsky2_2) with ``len(widths)`` levels."""
    n = len(widths)
    return {
        "block_out_channels": widths,
        "down_block_types": ["DownEncoderBlock2D"] * (n - 1) + ["AttnDownEncoderBlock2D"],
        "up_block_types": ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * (n - 1),
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "norm_type": "spatial",
        "num_vq_embeddings": 12,
        "out_channels": 3,
        "vq_embed_dim": 4,
    }


@pytest.fixture(scope="module", params=[[32], [32, 64], [32, 32, 64]], ids=["1-level", "2-level", "3-level"])
def pair(request, tmp_path_factory):
    from diffusers import VQModel

    torch.manual_seed(0)
    ref = randomize_(VQModel(**depth_config(request.param))).eval()
    folder = tmp_path_factory.mktemp("movq_depth") / "movq"
    ref.save_pretrained(folder)
    return load_component(folder), ref


@torch.no_grad()
def test_loads_and_matches_reference(pair):
    ours, ref = pair
    assert isinstance(ours, MoVQ)
    n = len(ref.config.block_out_channels)
    f = 2 ** (n - 1)
    assert ours.config.downsampling_factor == f
    x = torch.rand(2, 3, 6 * f, 4 * f, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = ours.encode(x)
    assert latents.shape == (2, 4, 6, 4)
    assert_close(latents, ref.encode(x).latents)
    z = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(2))
    assert_close(ours.decode(z, force_not_quantize=True), ref.decode(z, force_not_quantize=True).sample)
    assert_close(ours.decode(z * 0.2), ref.decode(z * 0.2).sample)  # through the codebook
    assert_close(ours(x), ref(x).sample)


@torch.no_grad()
def test_tiled_decode_any_depth(pair):
    ours, _ = pair
    f = ours.config.downsampling_factor
    z = torch.randn(1, 4, 96 // f, 64 // f, generator=torch.Generator().manual_seed(3))
    tiled = ours.decode(z, force_not_quantize=True, tile=max(32, 4 * f))
    untiled = ours.decode(z, force_not_quantize=True, tile=False)
    assert tiled.shape == untiled.shape == (1, 3, 96, 64)
    if f == 1:
        assert torch.equal(tiled, untiled)  # one level: nothing at full resolution to tile
    else:
        assert not torch.equal(tiled, untiled) and (tiled - untiled).abs().max() < 0.1 * untiled.abs().max()
