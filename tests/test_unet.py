"""Decoder UNet (text2img, inpaint, ControlNet-depth) against diffusers' UNet2DConditionModel."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from kandinsky.config import ConfigError
from kandinsky.unet import UNet, UNetConfig
from tests.helpers import assert_close, rel_err
from tests.refs.unet import UNET_TINY, make_reference_unet, tiny_unet_config
from weights_convert import build_model, convert_state_dict, load_component, save_component
from weights_convert.naming import rename_all
from weights_convert.unet import TABLE

REAL = {"decoder": "kandinsky-2-2-decoder", "inpaint": "kandinsky-2-2-decoder-inpaint",
        "controlnet": "kandinsky-2-2-controlnet-depth"}
PARAMS = {"decoder": 1_253_057_288, "inpaint": 1_253_074_568, "controlnet": 1_253_429_212}


def real_config(reference_configs, variant: str) -> dict:
    return json.loads((reference_configs / REAL[variant] / "unet" / "config.json").read_text())


def public(config) -> dict:
    """A diffusers config as JSON values, without its private ``_`` keys."""
    return {k: v for k, v in json.loads(json.dumps(dict(config))).items() if not k.startswith("_")}


def inputs(ref, batch=2, h=16, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = ref.config
    hint_type = cfg.addition_embed_type == "image_hint"
    sample = torch.randn(batch, cfg.in_channels - 4 * hint_type, h, w, generator=g)
    image_embeds = torch.randn(batch, cfg.encoder_hid_dim, generator=g)
    hint = torch.rand(batch, 3, 8 * h, 8 * w, generator=g) if hint_type else None
    return sample, image_embeds, hint


@torch.no_grad()
def reference_out(ref, sample, t, image_embeds, hint=None):
    cond = {"image_embeds": image_embeds}
    if hint is not None:
        cond["hint"] = hint
    return ref(sample, t, encoder_hidden_states=None, added_cond_kwargs=cond).sample


@pytest.fixture(params=["decoder", "inpaint", "controlnet"])
def checkpoint(request):
    name = {"decoder": "unet_checkpoint", "inpaint": "unet_inpaint_checkpoint",
            "controlnet": "unet_controlnet_checkpoint"}[request.param]
    return request.getfixturevalue(name)


# --------------------------------------------------------------------------- parity
TIMESTEPS = {"int": 999, "0-d": torch.tensor(0), "per-sample": torch.tensor([17, 640]),
             "float": torch.tensor([250.5, 3.0])}


@torch.no_grad()
def test_parity(checkpoint):
    folder, ref = checkpoint
    ours = load_component(folder)
    assert isinstance(ours, UNet)
    sample, image_embeds, hint = inputs(ref)  # batch 2, non-square 16x24 latents
    for name, timestep in TIMESTEPS.items():
        out = ours(sample, timestep, image_embeds, hint=hint)
        assert out.shape == (2, UNET_TINY["out_channels"], 16, 24)
        expected = reference_out(ref, sample, timestep, image_embeds, hint)
        err = rel_err(out, expected)
        assert err < 1e-5, f"timestep {name}: relative error {err:.2e}"
        assert not torch.allclose(expected[0], expected[1], atol=1e-3)  # the batch entries differ


@torch.no_grad()
def test_parity_other_shape_batch(unet_controlnet_checkpoint):
    folder, ref = unet_controlnet_checkpoint
    ours = load_component(folder)
    sample, image_embeds, hint = inputs(ref, batch=3, h=24, w=8, seed=1)
    t = torch.tensor([1, 500, 999])
    assert_close(ours(sample, t, image_embeds, hint), reference_out(ref, sample, t, image_embeds, hint))


@torch.no_grad()
def test_parity_norm_eps_and_one_layer():
    """norm_eps reaches the ResBlock / output GroupNorms but not the attention GroupNorm
    (the reference keeps 1e-5 there); layers_per_block 1; converted in memory."""
    ref = make_reference_unet("inpaint", seed=5, norm_eps=0.5, layers_per_block=1)
    config = json.loads(ref.to_json_string())
    ours = build_model(config)
    ours.load_state_dict(convert_state_dict(config, ref.state_dict()), strict=True)
    sample, image_embeds, _ = inputs(ref, batch=2, h=8, w=16, seed=4)
    t = torch.tensor([10, 900])
    assert_close(ours.eval()(sample, t, image_embeds), reference_out(ref, sample, t, image_embeds))


@torch.no_grad()
def test_file_forms(unet_checkpoint_forms):
    folders, ref = unet_checkpoint_forms
    sample, image_embeds, _ = inputs(ref, seed=2)
    expected = reference_out(ref, sample, 321, image_embeds)
    for form in ("bin", "sharded"):
        assert_close(load_component(folders[form])(sample, 321, image_embeds), expected)
    assert len(list(folders["sharded"].glob("*.safetensors"))) > 1
    # fp16 variant: float16 tensors; compare with the reference whose weights are rounded the same way
    half = load_component(folders["fp16"], dtype=torch.float16)
    assert half.dtype == torch.float16
    rounded = copy.deepcopy(ref).half().float()
    expected = reference_out(rounded, sample, 321, image_embeds)
    assert_close(load_component(folders["fp16"])(sample, 321, image_embeds), expected)


@torch.no_grad()
def test_save_component_loads_in_diffusers(unet_inpaint_checkpoint, tmp_path):
    folder, ref = unet_inpaint_checkpoint
    ours = load_component(folder)
    save_component(ours, tmp_path / "unet", layout="hub")
    back = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    sample, image_embeds, _ = inputs(ref, seed=3)
    assert_close(reference_out(back, sample, 7, image_embeds), reference_out(ref, sample, 7, image_embeds))


# --------------------------------------------------------------------------- full size (meta)
@pytest.mark.parametrize("variant", ["decoder", "inpaint", "controlnet"])
def test_full_size_names_and_shapes(reference_configs, variant):
    config = real_config(reference_configs, variant)
    with torch.device("meta"):
        ref = UNet2DConditionModel.from_config(config)
        ours = build_model(config)
    assert list(ours.buffers()) == []
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    renamed = rename_all(ref_sd, TABLE)  # raises if two reference tensors map to one name
    assert set(renamed.values()) == set(our_sd), (
        f"unmatched: ours {sorted(set(our_sd) - set(renamed.values()))[:5]}, "
        f"reference {sorted(k for k, v in renamed.items() if v not in our_sd)[:5]}"
    )
    for hub_key, our_key in renamed.items():
        assert our_sd[our_key].shape == ref_sd[hub_key].shape, hub_key
    # the table both ways
    back = rename_all(our_sd, TABLE, reverse=True)
    assert set(back.values()) == set(ref_sd)
    assert all(renamed[back[k]] == k for k in our_sd)
    assert convert_state_dict(config, ref_sd).keys() == our_sd.keys()
    n_ref = sum(p.numel() for p in ref.parameters())
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ref == n_ours == PARAMS[variant]


@pytest.mark.parametrize("variant", ["decoder", "inpaint", "controlnet"])
def test_real_config_round_trip(reference_configs, variant):
    config = real_config(reference_configs, variant)
    cfg = UNetConfig.from_dict(config)
    assert cfg.in_channels == {"decoder": 4, "inpaint": 9, "controlnet": 8}[variant]
    assert cfg.addition_embed_type == ("image_hint" if variant == "controlnet" else "image")
    assert cfg.to_dict() == config  # writes back the hub config exactly
    with torch.device("meta"):
        again = UNet2DConditionModel.from_config(cfg.to_dict())
        hub = UNet2DConditionModel.from_config(config)
    assert public(again.config) == public(hub.config)


def test_config_from_save_pretrained_round_trip(unet_controlnet_checkpoint):
    folder, ref = unet_controlnet_checkpoint
    written = json.loads((folder / "config.json").read_text())  # every key save_pretrained writes
    cfg = UNetConfig.from_dict(written)
    with torch.device("meta"):
        again = UNet2DConditionModel.from_config(cfg.to_dict())
    assert public(again.config) == public(ref.config)


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "key, value",
    [
        ("act_fn", "gelu"),
        ("down_block_types", ["DownBlock2D"] * 4),
        ("up_block_types", ["UpBlock2D"] * 4),
        ("mid_block_type", "UNetMidBlock2DCrossAttn"),
        ("resnet_time_scale_shift", "default"),
        ("encoder_hid_dim_type", "text_proj"),
        ("flip_sin_to_cos", False),
        ("freq_shift", 1),
        ("only_cross_attention", True),
        ("mid_block_only_cross_attention", True),
        ("num_attention_heads", 8),
        ("class_embed_type", "timestep"),
        ("time_embedding_type", "fourier"),
        ("resnet_skip_time_act", True),
        ("mid_block_scale_factor", 2),
        ("addition_embed_type", "text"),
        ("addition_embed_type", None),
        ("attention_head_dim", [16, 16, 16, 16]),
        ("layers_per_block", [2, 2, 2, 2]),
        ("cross_attention_dim", [24, 24, 24, 24]),
        ("block_out_channels", []),
        ("block_out_channels", [32, 0, 64, 64]),
        ("down_block_types", ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"]),  # 2 types, 4 levels
        ("block_out_channels", [32, 64, 64, 100]),  # not a multiple of norm_num_groups
        ("attention_head_dim", 24),  # does not divide 64
        ("encoder_hid_dim", None),
        ("some_new_key", 1),
    ],
)
def test_config_refusals(key, value):
    config = {"_class_name": "UNet2DConditionModel", **tiny_unet_config("decoder"), key: value}
    with pytest.raises(ConfigError, match=key):
        UNetConfig.from_dict(config)


def test_hint_config_needs_hint_channels():
    with pytest.raises(ConfigError, match="in_channels"):
        UNetConfig.from_dict(tiny_unet_config("controlnet", in_channels=4))


def test_accepted_no_op_keys():
    cfg = UNetConfig.from_dict(
        tiny_unet_config("decoder", downsample_padding=0, upcast_attention=True, addition_embed_type_num_heads=8,
                         sample_size=123)
    )
    assert cfg.sample_size == 123


# --------------------------------------------------------------------------- input errors
@pytest.fixture(scope="module")
def tiny_models():
    return {v: UNet(UNetConfig.from_dict(tiny_unet_config(v))) for v in ("decoder", "controlnet")}


def test_input_errors(tiny_models):
    unet, ctrl = tiny_models["decoder"], tiny_models["controlnet"]
    emb = torch.randn(2, 32)
    with pytest.raises(ValueError, match="sample must be"):
        unet(torch.randn(2, 9, 16, 16), 1, emb)
    with pytest.raises(ValueError, match="multiples of 8"):
        unet(torch.randn(2, 4, 16, 12), 1, emb)
    with pytest.raises(ValueError, match="image_embeds"):
        unet(torch.randn(2, 4, 16, 16), 1, torch.randn(2, 31))
    with pytest.raises(ValueError, match="timestep"):
        unet(torch.randn(2, 4, 8, 8), torch.tensor([1, 2, 3]), emb)
    with pytest.raises(ValueError, match="no hint encoder"):
        unet(torch.randn(2, 4, 8, 8), 1, emb, hint=torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match="needs a `hint`"):
        ctrl(torch.randn(2, 4, 8, 8), 1, emb)
    with pytest.raises(ValueError, match="hint must be"):
        ctrl(torch.randn(2, 4, 8, 8), 1, emb, hint=torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        ctrl(torch.randn(2, 8, 8, 8), 1, emb, hint=torch.rand(2, 3, 64, 64))
    assert unet.config.in_channels == 4 and ctrl.config.addition_embed_type == "image_hint"
