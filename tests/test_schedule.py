"""The noise schedule (kandinsky.sampling.schedule) against the reference library's schedulers.

Tables (betas, alphas, alphas_cumprod, DDIM's final level), the timestep spacings of the three
checkpoint samplers for every step count, ``add_noise``, ``randn`` (seed semantics and generator
states) and the ``scheduler_config.json`` configs (the reference's own files load, round trips,
refusals that name the key). The samplers' trajectories are in test_samplers.py.
"""
from __future__ import annotations

import json

import diffusers
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from kandinsky.config import ConfigError
from kandinsky.sampling.samplers import make_plan
from kandinsky.sampling.schedule import NoiseSchedule, randn
from tests.conftest import DATA
from tests.helpers import assert_close, generator_tail, make_generator

PRIOR_DIR = DATA / "kandinsky-2-2-prior" / "scheduler"
DECODER_DIR = DATA / "kandinsky-2-2-decoder" / "scheduler"
PRIOR_CFG = json.loads((PRIOR_DIR / "scheduler_config.json").read_text())
DECODER_CFG = json.loads((DECODER_DIR / "scheduler_config.json").read_text())

PRIOR_SHAPE = (3, 32)  # (B, embedding dim): the prior's latents
DECODER_SHAPE = (3, 4, 8, 8)  # (B, 4, H/8, W/8): the decoder's latents

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


# ------------------------------------------------------------------------------------
# noise tables
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg, ref_cls, kind",
    [
        (PRIOR_CFG, diffusers.UnCLIPScheduler, None),
        (DECODER_CFG, diffusers.DDPMScheduler, None),
        (DECODER_CFG, diffusers.DDIMScheduler, "ddim"),
        ({**DECODER_CFG, "beta_schedule": "scaled_linear"}, diffusers.DDPMScheduler, None),
        ({**DECODER_CFG, "beta_schedule": "squaredcos_cap_v2"}, diffusers.DDIMScheduler, "ddim"),
    ],
)
def test_noise_tables_equal_reference(cfg, ref_cls, kind):
    ours = NoiseSchedule.from_config(cfg, kind=kind)
    ref = ref_cls.from_config(dict(cfg))
    for name in ("betas", "alphas", "alphas_cumprod"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name
    assert len(ours) == ours.num_train_timesteps == cfg["num_train_timesteps"]
    if kind == "ddim":
        assert torch.equal(ours.final_alpha_cumprod, ref.final_alpha_cumprod)
    # the checkpoint samplers start from unit noise and feed x_t to the model unscaled
    plan = make_plan(ours.kind, ours, 10)
    assert plan.init_noise_sigma == ref.init_noise_sigma
    assert getattr(ref, "order", 1) == 1
    x = torch.randn(2, 3)
    assert plan.model_input(x, 5) is x and ref.scale_model_input(x, 5) is x


def test_alpha_bar_before_step_zero():
    ddpm = NoiseSchedule.from_folder(DECODER_DIR)
    assert ddpm.alpha_bar(-1).item() == 1.0 and torch.equal(ddpm.alpha_bar(0), ddpm.alphas_cumprod[0])
    # the hub's config says set_alpha_to_one=False: DDIM's last step lands on alpha_bar_0
    assert torch.equal(ddpm.final_alpha_cumprod, ddpm.alphas_cumprod[0])
    assert NoiseSchedule.from_folder(PRIOR_DIR).final_alpha_cumprod.item() == 1.0


# ------------------------------------------------------------------------------------
# timestep spacings
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg, ref_cls, kind, first",
    [
        (PRIOR_CFG, diffusers.UnCLIPScheduler, "unclip", 2),
        (DECODER_CFG, diffusers.DDPMScheduler, "ddpm", 1),
        (DECODER_CFG, diffusers.DDIMScheduler, "ddim", 1),
        ({**DECODER_CFG, "steps_offset": 0}, diffusers.DDPMScheduler, "ddpm", 1),
    ],
)
def test_timesteps_equal_reference_for_every_step_count(cfg, ref_cls, kind, first):
    ours = NoiseSchedule.from_config(cfg, kind=kind)
    ref = ref_cls.from_config(dict(cfg))
    T = cfg["num_train_timesteps"]
    for n in range(first, T + 1):
        ref.set_timesteps(n)
        try:
            plan = make_plan(kind, ours, n)
        except ValueError:  # leading + steps_offset past the table: the reference fails in step
            assert int(ref.timesteps.max()) >= T
            continue
        assert plan.timesteps.dtype == ref.timesteps.dtype == torch.long
        assert torch.equal(plan.timesteps, ref.timesteps), n
        assert plan.num_steps == ref.num_inference_steps == n


def test_unclip_refuses_one_step_like_reference():
    ours, ref = NoiseSchedule.from_folder(PRIOR_DIR), diffusers.UnCLIPScheduler.from_config(PRIOR_CFG)
    with pytest.raises(ZeroDivisionError):
        ref.set_timesteps(1)
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_plan("unclip", ours, 1)


# ------------------------------------------------------------------------------------
# add_noise
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg, ref_cls, kind",
    [
        (PRIOR_CFG, diffusers.UnCLIPScheduler, None),
        (DECODER_CFG, diffusers.DDPMScheduler, None),
        (DECODER_CFG, diffusers.DDIMScheduler, "ddim"),
    ],
)
@pytest.mark.parametrize("shape", [PRIOR_SHAPE, DECODER_SHAPE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_noise(cfg, ref_cls, kind, shape, dtype):
    ours, ref = NoiseSchedule.from_config(cfg, kind=kind), ref_cls.from_config(dict(cfg))
    g = torch.Generator().manual_seed(0)
    original = torch.randn(shape, generator=g).to(dtype)
    noise = torch.randn(shape, generator=g).to(dtype)
    for timesteps in (
        torch.tensor([0, 421, 999]),  # one per batch element
        torch.tensor([500]).repeat(shape[0]),  # the pipelines' timesteps[:1].repeat(B)
        torch.tensor([17]),  # one for all
        torch.tensor(998),  # 0-dim
    ):
        a = ours.add_noise(original, noise, timesteps)
        b = ref.add_noise(original, noise, timesteps)
        assert a.dtype == b.dtype
        assert_close(a, b, 1e-5)


# ------------------------------------------------------------------------------------
# randn
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("generator_kind", ["cpu", "list", "list1", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, None])
@pytest.mark.parametrize("device", [None, "cpu", torch.device("cpu")])
def test_randn_equals_reference(generator_kind, dtype, device):
    shape = (3, 4, 5)

    def gen():
        if generator_kind == "list1":
            return [torch.Generator().manual_seed(7)]
        g = make_generator(generator_kind, shape[0], seed=7)
        if g is None:
            torch.manual_seed(7)
        return g

    g_ours = gen()
    a = randn(shape, g_ours, device, dtype)
    tail_ours = generator_tail(g_ours)
    g_ref = gen()
    b = randn_tensor(shape, generator=g_ref, device=device, dtype=dtype)
    tail_ref = generator_tail(g_ref)
    assert a.dtype == b.dtype and a.device == b.device
    assert torch.equal(a, b)
    assert torch.equal(tail_ours, tail_ref)


# ------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ref_cls", [diffusers.UnCLIPScheduler, diffusers.DDPMScheduler, diffusers.DDIMScheduler])
def test_accepts_reference_saved_defaults(ref_cls, tmp_path):
    ref_cls().save_config(tmp_path)
    ours = NoiseSchedule.from_folder(tmp_path)
    assert ours.config.CLASS_NAME == ref_cls.__name__
    assert torch.equal(ours.alphas_cumprod, ref_cls().alphas_cumprod)


@pytest.mark.parametrize(
    "cfg, ref_cls, kind",
    [
        (PRIOR_CFG, diffusers.UnCLIPScheduler, None),
        (DECODER_CFG, diffusers.DDPMScheduler, None),
        (DECODER_CFG, diffusers.DDIMScheduler, "ddim"),
        ({**DECODER_CFG, "clip_sample": True, "beta_schedule": "scaled_linear"}, diffusers.DDPMScheduler, None),
    ],
)
def test_config_round_trip_through_reference(cfg, ref_cls, kind, tmp_path):
    """Our to_dict loads in the reference to the same scheduler; its save loads back in ours."""
    ours = NoiseSchedule.from_config(cfg, kind=kind)
    ours.save_folder(tmp_path / "ours")
    ref = ref_cls.from_pretrained(tmp_path / "ours")
    expected = ref_cls.from_config(dict(cfg))
    for key, value in expected.config.items():
        if not key.startswith("_"):
            assert ref.config[key] == value, key
    assert torch.equal(ref.alphas_cumprod, ours.alphas_cumprod)
    ref.save_config(tmp_path / "ref")
    again = NoiseSchedule.from_folder(tmp_path / "ref")
    assert again.config == ours.config and again.kind == ours.kind


def test_hub_ddpm_config_keeps_ddim_key():
    """The hub's DDPM config carries set_alpha_to_one=False: DDPM keeps it for a later DDIM."""
    ddpm = NoiseSchedule.from_folder(DECODER_DIR)
    assert ddpm.kind == "ddpm" and ddpm.config.to_dict()["set_alpha_to_one"] is False
    ddim = NoiseSchedule.from_config(ddpm.config.to_dict(), kind="ddim")
    ref = diffusers.DDIMScheduler.from_config(diffusers.DDPMScheduler.from_config(DECODER_CFG).config)
    assert ddim.kind == "ddim" and ddim.config.set_alpha_to_one is False
    assert torch.equal(ddim.final_alpha_cumprod, ref.final_alpha_cumprod)
    assert torch.equal(ddpm.final_alpha_cumprod, ref.final_alpha_cumprod)  # one table for both samplers
    # And a DDIM config converts back to DDPM.
    back = NoiseSchedule.from_config(ddim.config.to_dict(), kind="ddpm")
    assert back.kind == "ddpm" and back.config == ddpm.config


@pytest.mark.parametrize(
    "cfg, key, value",
    [
        (DECODER_CFG, "thresholding", True),
        (DECODER_CFG, "variance_type", "learned_range"),
        (DECODER_CFG, "variance_type", "fixed_small_log"),
        (DECODER_CFG, "prediction_type", "v_prediction"),
        (DECODER_CFG, "prediction_type", "sample"),
        (DECODER_CFG, "beta_schedule", "sigmoid"),
        (DECODER_CFG, "timestep_spacing", "trailing"),
        (DECODER_CFG, "trained_betas", [0.01] * 1000),
        (DECODER_CFG, "rescale_betas_zero_snr", True),
        (DECODER_CFG, "clip_sample", "yes"),
        (DECODER_CFG, "num_train_timesteps", 1000.5),
        (DECODER_CFG, "some_new_key", 1),
        (PRIOR_CFG, "variance_type", "learned_range"),
        (PRIOR_CFG, "beta_schedule", "linear"),
        (PRIOR_CFG, "prediction_type", "v_prediction"),
        (PRIOR_CFG, "clip_sample_range", "ten"),
        (PRIOR_CFG, "beta_start", 0.1),  # not an UnCLIP key
        ({**DECODER_CFG, "_class_name": "DDIMScheduler"}, "set_alpha_to_one", None),
        ({**DECODER_CFG, "_class_name": "DDIMScheduler"}, "variance_type", "fixed_small"),  # not a DDIM key
        (DECODER_CFG, "_class_name", "PNDMScheduler"),
    ],
)
def test_config_refusals_name_the_key(cfg, key, value):
    bad = {**cfg, key: value}
    for kind in (None, "ddim") if cfg is DECODER_CFG else (None,):
        with pytest.raises(ConfigError, match=key):
            NoiseSchedule.from_config(bad, kind=kind)


def test_kind_mismatch_refused():
    with pytest.raises(ConfigError, match="unclip"):
        NoiseSchedule.from_config(DECODER_CFG, kind="unclip")
    with pytest.raises(ConfigError, match="ddpm"):
        NoiseSchedule.from_config(PRIOR_CFG, kind="ddpm")
    with pytest.raises(ValueError, match="kind"):
        NoiseSchedule.from_config(PRIOR_CFG, kind="euler")
    no_name = {k: v for k, v in PRIOR_CFG.items() if k != "_class_name"}
    with pytest.raises(ConfigError, match="_class_name"):
        NoiseSchedule.from_config(no_name)
    assert NoiseSchedule.from_config(no_name, kind="unclip").kind == "unclip"
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        NoiseSchedule.from_folder(DATA)


# ------------------------------------------------------------------------------------
# CUDA (runs where a GPU is present)
# ------------------------------------------------------------------------------------


@needs_cuda
def test_cuda_randn_semantics():
    shape = (2, 4, 3, 3)
    a = randn(shape, torch.Generator().manual_seed(0), "cuda", torch.float16)
    b = randn(shape, torch.Generator().manual_seed(0), "cpu", torch.float16)
    assert a.device.type == "cuda" and torch.equal(a.cpu(), b)  # a seed means the same on every device
    c = randn(shape, torch.Generator("cuda").manual_seed(0), "cuda", torch.float16)
    g = torch.Generator("cuda").manual_seed(0)
    d = randn_tensor(shape, generator=g, device=torch.device("cuda"), dtype=torch.float16)
    assert torch.equal(c, d)
    with pytest.raises(ValueError):
        randn(shape, torch.Generator("cuda").manual_seed(0), "cpu")


@needs_cuda
def test_cuda_add_noise():
    ours, ref = NoiseSchedule.from_folder(DECODER_DIR), diffusers.DDPMScheduler.from_config(DECODER_CFG)
    x = torch.randn(DECODER_SHAPE, device="cuda", dtype=torch.float16)
    n = torch.randn(DECODER_SHAPE, device="cuda", dtype=torch.float16)
    t = torch.tensor([3, 500, 999], device="cuda")
    assert torch.equal(ours.add_noise(x, n, t), ref.add_noise(x, n, t))
