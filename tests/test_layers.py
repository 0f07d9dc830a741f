"""kandinsky/layers.py: the layers the UNet, the prior and MoVQ share, each against the reference
layer diffusers builds those models from (same weights, same inputs)."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.embeddings import TimestepEmbedding as RefTimestepEmbedding
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.resnet import ResnetBlock2D, ResnetBlockCondNorm2D

from kandinsky.layers import ResBlock, TimestepEmbedding, group_norm, timestep_sinusoid, timesteps
from kandinsky.movq.model import spatial_norm
from tests.helpers import assert_close, randomize_


def test_timesteps_broadcasts_one_step_to_the_batch():
    assert torch.equal(timesteps(7, 3, "cpu"), torch.tensor([7, 7, 7]))
    assert torch.equal(timesteps(torch.tensor(2.5), 2, "cpu"), torch.tensor([2.5, 2.5]))
    assert torch.equal(timesteps(torch.tensor([1, 2]), 2, "cpu"), torch.tensor([1, 2]))


@pytest.mark.parametrize("dim", [8, 64, 384])
def test_sinusoid_is_the_references_bit_for_bit(dim):
    """UNet and prior both use diffusers' Timesteps(dim, flip_sin_to_cos=True, freq_shift=0)."""
    t = torch.tensor([0, 1, 17, 640, 999])
    want = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.equal(timestep_sinusoid(t, dim), want)
    # the maths: cos(t * 10000^(-k/half)) then sin(...)
    k = dim // 2 - 1
    angle = 640 * math.exp(-math.log(10000) * k / (dim // 2))
    got = timestep_sinusoid(torch.tensor([640]), dim)[0]
    assert got[k].item() == pytest.approx(math.cos(angle), abs=1e-4)
    assert got[-1].item() == pytest.approx(math.sin(angle), abs=1e-4)


@pytest.mark.parametrize("dim, hidden, out", [(32, 128, 128), (64, 48, 64)])  # UNet's shape, prior's shape
def test_timestep_embedding_is_the_references(dim, hidden, out):
    ref = randomize_(RefTimestepEmbedding(dim, hidden, out_dim=out), seed=1)
    ours = TimestepEmbedding(dim, hidden, out)
    ours.load_state_dict(ref.state_dict())  # the hub's names: linear_1, linear_2
    t = torch.tensor([3, 250, 999])
    with torch.no_grad():
        want = ref(get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0))
        assert torch.equal(ours(t), want)
        # the fp32 features are cast to the weights' dtype
        assert_close(ours.to(torch.float64)(t).float(), want, tol=1e-6)


@pytest.mark.parametrize("c_in, c_out, resample", [(32, 32, None), (32, 64, None), (64, 64, "down"), (64, 32, "up")])
def test_resblock_with_emb_is_the_unets_resnet(c_in, c_out, resample):
    """The UNet's ResBlock: diffusers ResnetBlock2D with scale-shift time conditioning (up / down = the
    weightless resamplers of ResnetDownsampleBlock2D / ResnetUpsampleBlock2D)."""
    ref = ResnetBlock2D(in_channels=c_in, out_channels=c_out, temb_channels=48, groups=8, eps=1e-5,
                        time_embedding_norm="scale_shift", up=resample == "up", down=resample == "down")
    ref = randomize_(ref, seed=2).eval()
    ours = ResBlock(c_in, c_out, group_norm(8, 1e-5), emb_dim=48, resample=resample)
    ours.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(2, c_in, 8, 8, generator=g), torch.randn(2, 48, generator=g)
    with torch.no_grad():
        got, want = ours(x, emb), ref(x, emb)
    size = {None: 8, "down": 4, "up": 16}[resample]
    assert got.shape == (2, c_out, size, size)
    assert torch.equal(got, want)


@pytest.mark.parametrize("c_in, c_out", [(32, 32), (32, 64)])
def test_resblock_without_emb_is_movqs_encoder_resnet(c_in, c_out):
    ref = randomize_(ResnetBlock2D(in_channels=c_in, out_channels=c_out, temb_channels=None, groups=8, eps=1e-6),
                     seed=3).eval()
    ours = ResBlock(c_in, c_out, group_norm(8, 1e-6))
    assert ours.time_emb_proj is None
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, c_in, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x, None))


@pytest.mark.parametrize("c_in, c_out", [(32, 32), (64, 32)])
def test_resblock_with_spatial_norms_is_movqs_decoder_resnet(c_in, c_out):
    """MoVQ's decoder ResBlock: both norms SpatialNorms of the latents zq (diffusers'
    ResnetBlockCondNorm2D, time_embedding_norm="spatial", temb = zq)."""
    ref = ResnetBlockCondNorm2D(in_channels=c_in, out_channels=c_out, temb_channels=4, eps=1e-6,
                                time_embedding_norm="spatial")
    ref = randomize_(ref, seed=4).eval()
    ours = ResBlock(c_in, c_out, spatial_norm(4))
    ours.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(2)
    x, zq = torch.randn(2, c_in, 16, 16, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    with torch.no_grad():
        # our SpatialNorm broadcasts the latents' scale and shift instead of upsampling them: same maths,
        # other rounding
        assert_close(ours(x, zq), ref(x, zq))


def test_group_norm_factory():
    norm = group_norm(8, 1e-6)(64)
    assert isinstance(norm, torch.nn.GroupNorm)
    assert (norm.num_groups, norm.num_channels, norm.eps) == (8, 64, 1e-6)


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_mlp_is_clips(act):
    """CLIP's MLP (transformers' CLIPMLP: fc1, activation, fc2); the prior's is the same with exact GELU."""
    from transformers import CLIPTextConfig
    from transformers.models.clip.modeling_clip import CLIPMLP

    from kandinsky.clip.model import ACTIVATIONS
    from kandinsky.layers import MLP

    ref = randomize_(CLIPMLP(CLIPTextConfig(hidden_size=16, intermediate_size=40, hidden_act=act)), seed=5)
    ours = MLP(16, 40, ACTIVATIONS[act]())
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))


def test_every_component_model_reports_its_weights_dtype_and_device(tiny_models):
    """layers.Model: dtype / device are those of the named weight, and follow .to()."""
    import copy

    from kandinsky.layers import Model

    for name, model in tiny_models.items():
        assert isinstance(model, Model) and model.VARIABLE, name
        assert (model.dtype, model.device) == (torch.float32, torch.device("cpu")), name
        half = copy.deepcopy(model).to(torch.bfloat16)
        assert half.dtype == torch.bfloat16 == next(half.parameters()).dtype, name
        with torch.device("meta"):
            assert copy.deepcopy(model).to("meta").device == torch.device("meta"), name


def test_transformer_block_is_clips_encoder_layer():
    """A TransformerBlock of CLIP's attention and MLP is transformers' CLIPEncoderLayer (same weights
    under our names: layer_norm1 -> norm1, self_attn -> attn, layer_norm2 -> norm2)."""
    from transformers import CLIPTextConfig
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    from kandinsky.clip.model import ACTIVATIONS, Attention
    from kandinsky.layers import MLP, TransformerBlock

    config = CLIPTextConfig(hidden_size=16, intermediate_size=40, num_attention_heads=4, hidden_act="quick_gelu",
                            layer_norm_eps=1e-5)
    ref = randomize_(CLIPEncoderLayer(config), seed=6).eval()
    ours = TransformerBlock(16, Attention(16, 4), MLP(16, 40, ACTIVATIONS["quick_gelu"]()), eps=1e-5)
    names = {"layer_norm1": "norm1", "self_attn": "attn", "layer_norm2": "norm2", "mlp": "mlp"}
    ours.load_state_dict({names[k.split(".")[0]] + k[k.index("."):]: v for k, v in ref.state_dict().items()})
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = ref(x, None)
        want = out[0] if isinstance(out, tuple) else out
        assert_close(ours(x), want, tol=1e-6)
