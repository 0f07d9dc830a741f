"""The diffusion prior against diffusers' PriorTransformer."""
from __future__ import annotations

import json

import pytest
import torch

from kandinsky.config import ConfigError
from kandinsky.prior import DiffusionPrior, PriorConfig
from tests.helpers import assert_close
from tests.refs.prior import PRIOR_TINY_CONFIG, make_reference_prior, prior_inputs
from weights_convert import convert_state_dict, load_component, save_component
from weights_convert.naming import rename
from weights_convert.prior import TABLE

KANDINSKY_PRIOR_PARAMS = 1_026_225_920


def reference(ref, hidden, t, proj, text, mask):
    with torch.no_grad():
        return ref(hidden, t, proj, text, mask).predicted_image_embedding


def ours_from_reference(ref) -> DiffusionPrior:
    config = dict(ref.config)
    model = DiffusionPrior(PriorConfig.from_dict(config))
    model.load_state_dict(convert_state_dict({"_class_name": "PriorTransformer"}, ref.state_dict()), strict=True)
    return model.eval()


TIMESTEPS = {
    "int": lambda B: 7,
    "zero": lambda B: 0,
    "0-d": lambda B: torch.tensor(999),
    "per-sample": lambda B: torch.tensor([0, 500, 999][:B]),
}


@pytest.mark.parametrize("timestep", list(TIMESTEPS))
def test_parity_with_padding(prior_checkpoint, timestep):
    folder, ref = prior_checkpoint
    ours = load_component(folder)
    assert isinstance(ours, DiffusionPrior)
    hidden, proj, text, mask = prior_inputs(batch=3)  # 77, 5 and 1 real text tokens
    t = TIMESTEPS[timestep](3)
    with torch.no_grad():
        out = ours(hidden, t, proj, text, mask)
    assert out.shape == (3, 16)
    assert_close(out, reference(ref, hidden, t, proj, text, mask))


def test_padding_changes_the_output(prior_checkpoint):
    """The padding mask matters (else the parity test above would not test it)."""
    folder, ref = prior_checkpoint
    ours = load_component(folder)
    hidden, proj, text, mask = prior_inputs(batch=2, lengths=[77, 77])
    padded = mask.clone()
    padded[1, 3:] = False
    with torch.no_grad():
        out = ours(hidden, 5, proj, text, padded)
    expected = reference(ref, hidden, 5, proj, text, padded)
    assert_close(out, expected)
    assert (expected[1] - reference(ref, hidden, 5, proj, text, mask)[1]).abs().max() > 1e-3


def test_all_padding_prompt_matches_additive_mask(prior_checkpoint):
    """A sample with no real token: the -10000 additive masks stay finite, like the reference."""
    folder, ref = prior_checkpoint
    ours = load_component(folder)
    hidden, proj, text, mask = prior_inputs(batch=2, lengths=[0, 3])
    with torch.no_grad():
        out = ours(hidden, torch.tensor([3, 800]), proj, text, mask)
    assert torch.isfinite(out).all()
    assert_close(out, reference(ref, hidden, torch.tensor([3, 800]), proj, text, mask))


@pytest.mark.parametrize("form", ["safetensors", "bin", "fp16", "sharded"])
def test_every_file_form_loads(prior_checkpoint_forms, form):
    folder = prior_checkpoint_forms[form]
    from diffusers import PriorTransformer

    ref = PriorTransformer.from_pretrained(folder, variant="fp16" if form == "fp16" else None).float().eval()
    ours = load_component(folder)
    hidden, proj, text, mask = prior_inputs(batch=2, seed=1)
    t = torch.tensor([10, 600])
    with torch.no_grad():
        out = ours(hidden, t, proj, text, mask)
    assert_close(out, reference(ref, hidden, t, proj, text, mask))


def test_unnormalize_and_normalize(prior_checkpoint):
    folder, ref = prior_checkpoint
    ours = load_component(folder)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(ours.unnormalize(x), ref.post_process_latents(x))
        assert_close(ours.normalize(x), (x - ref.clip_mean) / ref.clip_std)


def test_derived_sizes_when_set():
    """time_embed_dim / embedding_proj_dim / clip_embed_dim given explicitly (real config: null)."""
    config = dict(PRIOR_TINY_CONFIG, time_embed_dim=24, embedding_proj_dim=12, clip_embed_dim=20)
    ref = make_reference_prior(config, seed=4)
    ours = ours_from_reference(ref)
    hidden, _, text, mask = prior_inputs(batch=2, seed=2)
    proj = torch.randn(2, 12, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = ours(hidden, torch.tensor([1, 2]), proj, text, mask)
        assert out.shape == (2, 20)
        assert_close(out, reference(ref, hidden, torch.tensor([1, 2]), proj, text, mask))
        x = torch.randn(2, 20)
        assert_close(ours.unnormalize(x), ref.post_process_latents(x))


def test_save_component_round_trip(prior_checkpoint, tmp_path):
    """Our model written in hub layout loads in diffusers and computes the same."""
    from diffusers import PriorTransformer

    folder, ref = prior_checkpoint
    save_component(load_component(folder), tmp_path / "prior")
    back = PriorTransformer.from_pretrained(tmp_path / "prior").eval()
    hidden, proj, text, mask = prior_inputs(batch=3, seed=6)
    assert_close(reference(back, hidden, 42, proj, text, mask), reference(ref, hidden, 42, proj, text, mask))


# --------------------------------------------------------------------------- full size, meta device
def real_config(reference_configs) -> dict:
    return json.loads((reference_configs / "kandinsky-2-2-prior" / "prior" / "config.json").read_text())


def test_full_size_names_and_shapes(reference_configs):
    from diffusers import PriorTransformer

    config = real_config(reference_configs)
    with torch.device("meta"):
        ref = PriorTransformer.from_config(config)
        ours = DiffusionPrior(PriorConfig.from_dict(config))
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()

    forward = {rename(k, TABLE): k for k in ref_sd}
    assert len(forward) == len(ref_sd), "two reference tensors map to the same name"
    assert set(forward) == set(our_sd)
    for our_key, ref_key in forward.items():
        assert our_sd[our_key].shape == ref_sd[ref_key].shape, our_key
    backward = {rename(k, TABLE, reverse=True): k for k in our_sd}
    assert len(backward) == len(our_sd)
    assert set(backward) == set(ref_sd)

    assert sum(p.numel() for p in ref.parameters()) == KANDINSKY_PRIOR_PARAMS
    assert sum(p.numel() for p in ours.parameters()) == KANDINSKY_PRIOR_PARAMS
    # no buffers outside the checkpoint (they would stay on meta after assign-loading)
    assert set(our_sd) == {k for k, _ in ours.named_parameters()} | {k for k, _ in ours.named_buffers()}
    assert len(ours.blocks) == 20 and ours.positional_embedding.shape == (1, 81, 2048)
    assert ours.proj_out.weight.shape == (1280, 2048)


# --------------------------------------------------------------------------- config
def test_config_accepts_real_and_saved(reference_configs, prior_checkpoint):
    from diffusers import PriorTransformer

    cfg = PriorConfig.from_dict(real_config(reference_configs))
    assert (cfg.inner_dim, cfg.time_hidden_dim, cfg.text_embed_dim, cfg.clip_dim) == (2048, 2048, 1280, 1280)
    folder, _ = prior_checkpoint
    saved = json.loads((folder / "config.json").read_text())  # every key save_pretrained writes
    cfg = PriorConfig.from_dict(saved)
    # to_dict is loadable by the reference and means the same model
    back = PriorTransformer.from_config(cfg.to_dict())
    for key, value in saved.items():
        if not key.startswith("_"):
            assert back.config[key] == value, key


@pytest.mark.parametrize(
    "key, value",
    [
        ("norm_in_type", "layer"),
        ("embedding_proj_norm_type", "layer"),
        ("encoder_hid_proj_type", None),
        ("added_emb_type", None),
        ("time_embed_act_fn", "gelu"),
        ("additional_embeddings", 3),
        ("dropout", 0.1),
    ],
)
def test_config_refuses_unsupported_values(reference_configs, key, value):
    config = dict(real_config(reference_configs), **{key: value})
    with pytest.raises(ConfigError, match=key):
        PriorConfig.from_dict(config)


def test_config_refuses_unknown_key_and_bad_sizes(reference_configs):
    with pytest.raises(ConfigError, match="use_flash_prior"):
        PriorConfig.from_dict(dict(real_config(reference_configs), use_flash_prior=True))
    with pytest.raises(ConfigError, match="attention_head_dim"):
        PriorConfig.from_dict(dict(real_config(reference_configs), attention_head_dim=0))
    with pytest.raises(ConfigError, match="must be even"):
        PriorConfig.from_dict(dict(real_config(reference_configs), num_attention_heads=3, attention_head_dim=5))


# --------------------------------------------------------------------------- dtype, compile
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_half_precision_close_to_reference(prior_checkpoint, dtype, tol):
    """Loaded in half precision, compared with the fp32 reference (measured: 8e-3 bf16, 7e-4 fp16)."""
    folder, ref = prior_checkpoint
    ours = load_component(folder, dtype=dtype)
    hidden, proj, text, mask = prior_inputs(batch=3, seed=7)
    t = torch.tensor([5, 300, 900])
    with torch.no_grad():
        out = ours(hidden.to(dtype), t, proj.to(dtype), text.to(dtype), mask)
    assert out.dtype == dtype
    assert_close(out.float(), reference(ref, hidden, t, proj, text, mask), tol=tol)


def test_compiles_without_graph_breaks(prior_checkpoint):
    folder, ref = prior_checkpoint
    compiled = torch.compile(load_component(folder), fullgraph=True, backend="eager")
    hidden, proj, text, mask = prior_inputs(batch=3, seed=8)
    with torch.no_grad():
        for t in (7, torch.tensor(3), torch.tensor([1, 2, 3])):
            assert_close(compiled(hidden, t, proj, text, mask), reference(ref, hidden, t, proj, text, mask))


@pytest.mark.parametrize(
    "bad, message",
    [
        ("short_mask", "attention_mask must be a"),
        ("no_mask", "attention_mask must be a"),
        ("hidden_width", "hidden_states"),
        ("text_len", "encoder_hidden_states"),
        ("proj_batch", "proj_embedding"),
        ("timesteps", "timestep must be"),
    ],
)
def test_input_errors_name_the_argument(bad, message):
    prior = DiffusionPrior(PriorConfig.from_dict(PRIOR_TINY_CONFIG)).eval()
    hidden, proj, text, mask = prior_inputs(batch=3)
    t = torch.tensor(10)
    if bad == "short_mask":
        mask = mask[:, :74]
    elif bad == "no_mask":
        mask = None
    elif bad == "hidden_width":
        hidden = torch.randn(3, 8)
    elif bad == "text_len":
        text = text[:, :70]
    elif bad == "proj_batch":
        proj = proj[:2]
    else:
        t = torch.tensor([1, 2])
    with pytest.raises(ValueError, match=message):
        prior(hidden, t, proj, text, mask)
