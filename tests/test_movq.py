"""MoVQ (kandinsky.movq) against the reference diffusers VQModel.

Tiny random checkpoints (tests/refs/movq.py) for numerical parity; the real
Kandinsky 2.2 config on the meta device for names, shapes and parameter count.
"""
from __future__ import annotations

import json

import pytest
import torch

from kandinsky.config import ConfigError
from kandinsky.movq import MoVQ, MoVQConfig
from tests.helpers import assert_close
from tests.refs.movq import MOVQ_TINY_CONFIG, make_reference_movq
from weights_convert import load_component, save_component
from weights_convert.movq import TABLE
from weights_convert.naming import rename, rename_all

REAL_PARAMS = 67_832_495


@pytest.fixture(scope="module")
def movq(movq_checkpoint):
    folder, _ = movq_checkpoint
    return load_component(folder)


@pytest.fixture(scope="module")
def ref(movq_checkpoint):
    return movq_checkpoint[1]


def images(batch=2, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, h, w, generator=g) * 2 - 1


def latents(batch=2, h=4, w=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, h, w, generator=g)


def real_config(reference_configs) -> dict:
    return json.loads((reference_configs / "kandinsky-2-2-decoder/movq/config.json").read_text())


# ----------------------------------------------------------------------------- parity


@torch.no_grad()
def test_loaded_model_is_ours(movq):
    assert isinstance(movq, MoVQ)
    assert not list(movq.buffers())  # nothing that would stay on meta


@torch.no_grad()
@pytest.mark.parametrize("shape", [(2, 32, 32), (3, 64, 96)])
def test_encode(movq, ref, shape):
    x = images(*shape)
    ours = movq.encode(x)
    assert ours.shape == (shape[0], 4, shape[1] // 8, shape[2] // 8)
    assert_close(ours, ref.encode(x).latents)


@torch.no_grad()
@pytest.mark.parametrize("shape", [(2, 4, 4), (3, 8, 12)])
def test_decode_not_quantized(movq, ref, shape):
    z = latents(*shape)
    ours = movq.decode(z, force_not_quantize=True)
    assert ours.shape == (shape[0], 3, shape[1] * 8, shape[2] * 8)
    assert_close(ours, ref.decode(z, force_not_quantize=True).sample)


@torch.no_grad()
@pytest.mark.parametrize("shape", [(2, 4, 4), (3, 8, 12)])
def test_decode_quantized(movq, ref, shape):
    z = latents(*shape) * 0.2  # on the scale of the codebook
    ours = movq.decode(z, force_not_quantize=False)
    assert_close(ours, ref.decode(z, force_not_quantize=False).sample)
    # and snapping matters: the unsnapped decode is different
    assert (ours - ref.decode(z, force_not_quantize=True).sample).abs().max() > 1e-2


@torch.no_grad()
def test_decode_default_quantizes_like_reference(movq, ref):
    z = latents(2, 4, 4) * 0.2
    assert_close(movq.decode(z), ref.decode(z).sample)


@torch.no_grad()
def test_encode_decode_roundtrip_forward(movq, ref):
    x = images(1, 32, 48, seed=3)
    assert_close(movq(x), ref(x).sample)
    assert_close(movq.decode(movq.encode(x), force_not_quantize=True),
                 ref.decode(ref.encode(x).latents, force_not_quantize=True).sample)


@torch.no_grad()
def test_quantize(movq, ref):
    z = latents(3, 8, 12, seed=5) * 0.2
    snapped, indices = movq.quantize(z)
    ref_snapped, _, (_, _, ref_indices) = ref.quantize(z)
    assert indices.shape == (3, 8, 12)
    assert torch.equal(indices.flatten(), ref_indices.flatten())
    assert len(indices.unique()) > 10  # many codebook entries in use
    assert_close(snapped, ref_snapped)
    # the codebook rows, up to the rounding of the straight-through z + (zq - z)
    assert_close(snapped.permute(0, 2, 3, 1).reshape(-1, 4), ref.quantize.embedding.weight[ref_indices.flatten()])


@torch.no_grad()
def test_quantize_ties_pick_the_reference_index():
    """Duplicated codebook rows: the nearest entry is ambiguous; both pick the same one."""
    ref = make_reference_movq()
    with torch.no_grad():
        w = ref.quantize.embedding.weight
        w[40:64] = w[0:24]  # entries 40.. duplicate 0..
    ours = MoVQ(MoVQConfig.from_dict(MOVQ_TINY_CONFIG))
    ours.load_state_dict({rename(k, TABLE): v for k, v in ref.state_dict().items()})
    # latents exactly on duplicated entries, and some between them
    z = torch.cat([w[40:56], (w[0:16] + w[1:17]) / 2]).T.reshape(1, 4, 4, 8)
    _, indices = ours.quantize(z)
    _, _, (_, _, ref_indices) = ref.quantize(z)
    assert torch.equal(indices.flatten(), ref_indices.flatten())
    assert (indices.flatten()[:16] < 40).all()  # the first of equal distances


@torch.no_grad()
@pytest.mark.parametrize("form", ["safetensors", "bin", "fp16", "sharded"])
def test_file_forms(movq_checkpoint_forms, form):
    from diffusers import VQModel

    folder = movq_checkpoint_forms[form]
    kwargs = {"variant": "fp16"} if form == "fp16" else {}
    ref = VQModel.from_pretrained(folder, torch_dtype=torch.float32, **kwargs).eval()
    ours = load_component(folder)
    assert next(ours.parameters()).dtype == torch.float32
    x = images(1, 32, 32)
    assert_close(ours.encode(x), ref.encode(x).latents)
    z = latents(1, 4, 4) * 0.2
    assert_close(ours.decode(z, force_not_quantize=True), ref.decode(z, force_not_quantize=True).sample)


@torch.no_grad()
def test_save_component_is_loaded_by_reference(movq, tmp_path):
    from diffusers import VQModel

    save_component(movq, tmp_path / "movq")
    ref = VQModel.from_pretrained(tmp_path / "movq").eval()
    x = images(1, 32, 32, seed=7)
    assert_close(movq.encode(x), ref.encode(x).latents)
    z = latents(1, 4, 4, seed=8) * 0.2
    assert_close(movq.decode(z), ref.decode(z).sample)


# ----------------------------------------------------------------------------- full size (meta)


def test_real_checkpoint_names_shapes_and_size(reference_configs):
    from diffusers import VQModel

    config = real_config(reference_configs)
    with torch.device("meta"):
        ref = VQModel.from_config(config)
        ours = MoVQ(MoVQConfig.from_dict(config))
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}

    forward = rename_all(ref_shapes, TABLE)  # raises if two hub keys collide
    assert sorted(forward.values()) == sorted(our_shapes)  # every tensor maps, none left over
    for hub, mine in forward.items():
        assert ref_shapes[hub] == our_shapes[mine], hub
    backward = rename_all(our_shapes, TABLE, reverse=True)
    assert backward == {mine: hub for hub, mine in forward.items()}

    assert sum(p.numel() for p in ref.parameters()) == REAL_PARAMS
    assert sum(p.numel() for p in ours.parameters()) == REAL_PARAMS
    assert not list(ours.buffers())


def test_real_configs_accepted(reference_configs):
    for repo in ("decoder", "decoder-inpaint", "controlnet-depth"):
        cfg = json.loads((reference_configs / f"kandinsky-2-2-{repo}/movq/config.json").read_text())
        c = MoVQConfig.from_dict(cfg)
        assert c.block_out_channels == (128, 256, 256, 512) and c.downsampling_factor == 8


def test_to_dict_builds_the_same_network_in_diffusers(reference_configs):
    from diffusers import VQModel

    for cfg in (real_config(reference_configs), MOVQ_TINY_CONFIG):
        ours = MoVQConfig.from_dict(cfg)
        out = ours.to_dict()
        assert MoVQConfig.from_dict(out) == ours
        with torch.device("meta"):
            a = VQModel.from_config(out)
            b = VQModel.from_config(cfg)
        assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
        assert {k: v for k, v in a.config.items() if not k.startswith("_")} == \
               {k: v for k, v in b.config.items() if not k.startswith("_")}


def test_save_pretrained_config_accepted(movq_checkpoint):
    cfg = json.loads((movq_checkpoint[0] / "config.json").read_text())
    for key in ("force_upcast", "lookup_from_codebook", "mid_block_add_attention", "scaling_factor"):
        assert key in cfg
    assert MoVQConfig.from_dict(cfg) == MoVQConfig.from_dict(MOVQ_TINY_CONFIG)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "key, value",
    [
        ("norm_type", "group"),
        ("act_fn", "gelu"),
        ("mid_block_add_attention", False),
        ("lookup_from_codebook", True),
        ("force_upcast", True),
        ("down_block_types", ["DownEncoderBlock2D"] * 4),
        ("up_block_types", ["UpDecoderBlock2D"] * 4),
        ("block_out_channels", [32, 32, 64]),  # block types say 4 levels
        ("block_out_channels", [32, 48, 64, 64]),  # 48 is not a multiple of 32
        ("norm_num_groups", 64),  # 32 is not a multiple of 64
        ("vq_embed_dim", 8),
        ("layers_per_block", 0),
        ("frobnicate", 1),
    ],
)
def test_config_refusals(key, value):
    cfg = dict(MOVQ_TINY_CONFIG, **{key: value})
    with pytest.raises(ConfigError, match=key):
        MoVQConfig.from_dict(cfg)


def test_config_missing_topology_key_refused():
    cfg = dict(MOVQ_TINY_CONFIG)
    del cfg["norm_type"]  # diffusers would build a GroupNorm decoder
    with pytest.raises(ConfigError, match="norm_type"):
        MoVQConfig.from_dict(cfg)


def test_config_defaults_are_kandinsky(reference_configs):
    assert MoVQConfig() == MoVQConfig.from_dict(real_config(reference_configs))
    assert MoVQConfig(vq_embed_dim=None).to_dict()["vq_embed_dim"] is None


def test_meta_construction():
    with torch.device("meta"):
        m = MoVQ(MoVQConfig())
    assert all(p.is_meta for p in m.parameters())


# ----------------------------------------------------------------------------- input errors


def test_input_errors(movq):
    with pytest.raises(ValueError, match="multiples of 8"):
        movq.encode(images(1, 36, 32))
    with pytest.raises(ValueError, match="multiples of 8"):
        movq.encode(images(1, 32, 20))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        movq.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        movq.encode(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        movq.decode(torch.zeros(1, 3, 4, 4), force_not_quantize=True)
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        movq.quantize(torch.zeros(1, 8, 4, 4))
