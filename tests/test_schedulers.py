"""Samplers: step-by-step parity with the reference library's UnCLIP / DDPM / DDIM schedulers.

Each trajectory runs a fake model (a fixed function of the sample and the step index) through
our scheduler and through the reference, each on its own samples and its own equally seeded
generator, and compares every intermediate sample, the timesteps, and the generator states
after the last step.
"""
from __future__ import annotations

import json

import diffusers
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from kandinsky.config import ConfigError
from kandinsky.schedulers import (
    DDIMScheduler,
    DDPMScheduler,
    Scheduler,
    UnCLIPScheduler,
    randn,
    scheduler_from_config,
)
from tests.conftest import DATA
from tests.helpers import assert_close

PRIOR_DIR = DATA / "kandinsky-2-2-prior" / "scheduler"
DECODER_DIR = DATA / "kandinsky-2-2-decoder" / "scheduler"
PRIOR_CFG = json.loads((PRIOR_DIR / "scheduler_config.json").read_text())
DECODER_CFG = json.loads((DECODER_DIR / "scheduler_config.json").read_text())

PRIOR_SHAPE = (3, 32)  # (B, embedding dim): the prior's latents
DECODER_SHAPE = (3, 4, 8, 8)  # (B, 4, H/8, W/8): the decoder's latents

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


# ------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------


def quiet_reference(cls, config: dict):
    """The reference scheduler built with ``from_config`` (what its pipelines do)."""
    return cls.from_config(dict(config))


def make_generator(kind: str, batch: int, device: str = "cpu", seed: int = 0):
    if kind == "none":
        return None
    if kind == "list":
        return [torch.Generator(device).manual_seed(seed + i) for i in range(batch)]
    return torch.Generator(device).manual_seed(seed)


def generator_tail(generator, device: str = "cpu") -> torch.Tensor:
    """One more draw from the generator(s) after the trajectory: equal iff the states are."""
    if generator is None:
        return torch.rand(4, device=device)
    gens = generator if isinstance(generator, list) else [generator]
    return torch.cat([torch.rand(4, generator=g, device=g.device) for g in gens])


def trajectory(step, timesteps, shape, *, generator_kind, prev_style, out_scale, dtype, device="cpu"):
    """Run ``step`` over ``timesteps`` with a fake model; return every sample and the RNG tail."""
    g_inputs = torch.Generator().manual_seed(1234)
    x = torch.randn(shape, generator=g_inputs).to(device=device, dtype=dtype)
    offsets = torch.randn((len(timesteps),) + tuple(shape), generator=g_inputs).to(device=device, dtype=dtype)
    if generator_kind == "cuda":
        generator = torch.Generator(device).manual_seed(0)
    else:  # CPU generator(s), also for CUDA samples
        generator = make_generator(generator_kind, shape[0])
    if generator is None:
        torch.manual_seed(99)
    samples = []
    for i, t in enumerate(timesteps):
        model_output = out_scale * (0.7 * torch.tanh(x) + offsets[i])
        kwargs = {}
        if prev_style == "pipeline":  # what the Kandinsky prior pipelines pass
            kwargs["prev_timestep"] = None if i == len(timesteps) - 1 else timesteps[i + 1]
        x = step(model_output, t, x, generator, **kwargs)
        samples.append(x)
    return samples, generator_tail(generator, device)


def compare_trajectories(
    ours,
    ref,
    n,
    shape,
    *,
    generator_kind="cpu",
    prev_style="default",
    out_scale=1.0,
    dtype=torch.float32,
    device="cpu",
    ref_step_kwargs=None,
    tol=1e-5,
):
    ref_step_kwargs = ref_step_kwargs or {}
    ours.set_timesteps(n, device=device)
    ref.set_timesteps(n, device=device)
    assert ours.timesteps.dtype == ref.timesteps.dtype == torch.long
    assert ours.timesteps.device == ref.timesteps.device
    assert torch.equal(ours.timesteps.cpu(), ref.timesteps.cpu())

    def our_step(mo, t, x, g, **kw):
        return ours.step(mo, t, x, generator=g, **kw)

    def ref_step(mo, t, x, g, **kw):
        return ref.step(mo, t, x, generator=g, **kw, **ref_step_kwargs).prev_sample

    common = dict(generator_kind=generator_kind, prev_style=prev_style, out_scale=out_scale, dtype=dtype, device=device)
    ours_samples, ours_tail = trajectory(our_step, ours.timesteps, shape, **common)
    ref_samples, ref_tail = trajectory(ref_step, ref.timesteps, shape, **common)
    for i, (a, b) in enumerate(zip(ours_samples, ref_samples)):
        assert a.dtype == b.dtype and a.device == b.device and a.shape == b.shape
        try:
            assert_close(a, b, tol)
        except AssertionError as e:
            raise AssertionError(f"step {i} (t={int(ours.timesteps[i])}): {e}") from None
    assert torch.equal(ours_tail, ref_tail), "generator states differ after the trajectory"


# ------------------------------------------------------------------------------------
# noise tables and timesteps
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ours_cfg, ref_cls, kind",
    [
        (PRIOR_CFG, diffusers.UnCLIPScheduler, None),
        (DECODER_CFG, diffusers.DDPMScheduler, None),
        (DECODER_CFG, diffusers.DDIMScheduler, "ddim"),
        ({**DECODER_CFG, "beta_schedule": "scaled_linear"}, diffusers.DDPMScheduler, None),
        ({**DECODER_CFG, "beta_schedule": "squaredcos_cap_v2"}, diffusers.DDIMScheduler, "ddim"),
    ],
)
def test_noise_tables_equal_reference(ours_cfg, ref_cls, kind):
    ours = scheduler_from_config(ours_cfg, kind=kind)
    ref = quiet_reference(ref_cls, ours_cfg)
    for name in ("betas", "alphas", "alphas_cumprod"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name
    assert torch.equal(ours.timesteps, ref.timesteps)  # before set_timesteps
    assert ours.init_noise_sigma == ref.init_noise_sigma
    assert ours.order == getattr(ref, "order", 1) == 1
    assert len(ours) == ours_cfg["num_train_timesteps"]
    if kind == "ddim":
        assert torch.equal(ours.final_alpha_cumprod, ref.final_alpha_cumprod)
    x = torch.randn(2, 3)
    assert ours.scale_model_input(x, 5) is x


@pytest.mark.parametrize(
    "cfg, ref_cls, kind, first",
    [
        (PRIOR_CFG, diffusers.UnCLIPScheduler, None, 2),
        (DECODER_CFG, diffusers.DDPMScheduler, None, 1),
        (DECODER_CFG, diffusers.DDIMScheduler, "ddim", 1),
        ({**DECODER_CFG, "steps_offset": 0}, diffusers.DDPMScheduler, None, 1),
    ],
)
def test_timesteps_equal_reference_for_every_step_count(cfg, ref_cls, kind, first):
    ours = scheduler_from_config(cfg, kind=kind)
    ref = quiet_reference(ref_cls, cfg)
    T = cfg["num_train_timesteps"]
    for n in range(first, T + 1):
        ref.set_timesteps(n)
        try:
            ours.set_timesteps(n)
        except ValueError:  # leading + steps_offset past the table: the reference fails in step
            assert int(ref.timesteps.max()) >= T
            continue
        assert torch.equal(ours.timesteps, ref.timesteps), n
        assert ours.num_inference_steps == ref.num_inference_steps == n


def test_unclip_refuses_one_step_like_reference():
    ours, ref = UnCLIPScheduler.from_folder(PRIOR_DIR), diffusers.UnCLIPScheduler.from_config(PRIOR_CFG)
    with pytest.raises(ZeroDivisionError):
        ref.set_timesteps(1)
    with pytest.raises(ValueError, match="num_inference_steps"):
        ours.set_timesteps(1)


# ------------------------------------------------------------------------------------
# UnCLIP (prior)
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 7, 25, 100])
@pytest.mark.parametrize("prev_style", ["pipeline", "default"])
def test_unclip_trajectory_hub_config(n, prev_style):
    """Kandinsky 2.2's prior: x_0 prediction clipped to +-10 (outputs reach past it)."""
    ours = Scheduler.from_folder(PRIOR_DIR)
    assert isinstance(ours, UnCLIPScheduler)
    ref = quiet_reference(diffusers.UnCLIPScheduler, PRIOR_CFG)
    compare_trajectories(ours, ref, n, PRIOR_SHAPE, prev_style=prev_style, out_scale=8.0)


def test_unclip_trajectory_all_training_steps():
    """n = T: every jump is t -> t-1, the branch using the precomputed betas."""
    ours = Scheduler.from_folder(PRIOR_DIR)
    ref = quiet_reference(diffusers.UnCLIPScheduler, PRIOR_CFG)
    compare_trajectories(ours, ref, 1000, (2, 8), prev_style="pipeline", out_scale=8.0)


@pytest.mark.parametrize(
    "overrides",
    [
        {"clip_sample": False},
        {"clip_sample_range": 1.0},
        {"prediction_type": "epsilon", "clip_sample_range": 1.0},
        {"prediction_type": "epsilon", "clip_sample": False},
    ],
)
def test_unclip_trajectory_variants(overrides):
    cfg = {**PRIOR_CFG, **overrides}
    ours, ref = scheduler_from_config(cfg), quiet_reference(diffusers.UnCLIPScheduler, cfg)
    scale = 8.0 if cfg["prediction_type"] == "sample" else 1.0
    compare_trajectories(ours, ref, 25, PRIOR_SHAPE, prev_style="pipeline", out_scale=scale)


@pytest.mark.parametrize("generator_kind", ["list", "none"])
def test_unclip_generator_kinds(generator_kind):
    ours = Scheduler.from_folder(PRIOR_DIR)
    ref = quiet_reference(diffusers.UnCLIPScheduler, PRIOR_CFG)
    compare_trajectories(ours, ref, 7, PRIOR_SHAPE, prev_style="pipeline", out_scale=8.0, generator_kind=generator_kind)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_unclip_dtypes(dtype):
    """Coefficients stay float32 0-dim tensors; the arithmetic happens in the sample's dtype."""
    ours = Scheduler.from_folder(PRIOR_DIR)
    ref = quiet_reference(diffusers.UnCLIPScheduler, PRIOR_CFG)
    compare_trajectories(ours, ref, 7, PRIOR_SHAPE, prev_style="pipeline", out_scale=8.0, dtype=dtype)


# ------------------------------------------------------------------------------------
# DDPM (decoder)
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 25, 100])
def test_ddpm_trajectory_hub_config(n):
    ours = Scheduler.from_folder(DECODER_DIR)
    assert isinstance(ours, DDPMScheduler)
    ref = quiet_reference(diffusers.DDPMScheduler, DECODER_CFG)
    compare_trajectories(ours, ref, n, DECODER_SHAPE)


@pytest.mark.parametrize(
    "overrides",
    [
        {"clip_sample": True},  # x_0 estimates leave [-1, 1] at high noise
        {"clip_sample": True, "clip_sample_range": 2.5},
        {"beta_schedule": "scaled_linear"},
        {"beta_schedule": "squaredcos_cap_v2", "steps_offset": 0},
    ],
)
def test_ddpm_trajectory_variants(overrides):
    cfg = {**DECODER_CFG, **overrides}
    ours, ref = scheduler_from_config(cfg), quiet_reference(diffusers.DDPMScheduler, cfg)
    compare_trajectories(ours, ref, 25, DECODER_SHAPE)


@pytest.mark.parametrize("generator_kind", ["list", "none"])
def test_ddpm_generator_kinds(generator_kind):
    ours, ref = Scheduler.from_folder(DECODER_DIR), quiet_reference(diffusers.DDPMScheduler, DECODER_CFG)
    compare_trajectories(ours, ref, 7, DECODER_SHAPE, generator_kind=generator_kind)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ddpm_dtypes(dtype):
    ours, ref = Scheduler.from_folder(DECODER_DIR), quiet_reference(diffusers.DDPMScheduler, DECODER_CFG)
    compare_trajectories(ours, ref, 7, DECODER_SHAPE, dtype=dtype)


def test_ddpm_explicit_prev_timestep_matches_reference_schedule():
    """Passing prev_timestep = timesteps[i+1] (as the prior pipeline does) is the reference's default."""
    ours, ref = Scheduler.from_folder(DECODER_DIR), quiet_reference(diffusers.DDPMScheduler, DECODER_CFG)
    ours.set_timesteps(25)
    ref.set_timesteps(25)
    x = torch.randn(DECODER_SHAPE)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for i, t in enumerate(ours.timesteps):
        mo = torch.tanh(x)
        prev = -1 if i == len(ours.timesteps) - 1 else ours.timesteps[i + 1]
        a = ours.step(mo, t, x, generator=g1, prev_timestep=prev)
        b = ref.step(mo, t, x, generator=g2).prev_sample
        assert_close(a, b)
        x = b


def test_ddpm_img2img_partial_schedule():
    """img2img: add_noise at timesteps[t_start], then step over timesteps[t_start * order:]."""
    ours, ref = Scheduler.from_folder(DECODER_DIR), quiet_reference(diffusers.DDPMScheduler, DECODER_CFG)
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    t_start = 8
    image = torch.randn(DECODER_SHAPE, generator=torch.Generator().manual_seed(5))
    results = []
    steppers = (
        (ours, lambda *a, **k: ours.step(*a, **k)),
        (ref, lambda *a, **k: ref.step(*a, **k).prev_sample),
    )
    for sched, step in steppers:
        g = torch.Generator().manual_seed(0)
        timesteps = sched.timesteps[t_start * sched.order :]
        noise = randn(DECODER_SHAPE, g, "cpu", torch.float32) if sched is ours else randn_tensor(
            DECODER_SHAPE, generator=g, device=torch.device("cpu"), dtype=torch.float32
        )
        x = sched.add_noise(image, noise, timesteps[:1].repeat(DECODER_SHAPE[0]))
        for t in timesteps:
            x = step(0.5 * torch.tanh(x), t, x, generator=g)
        results.append(x)
    assert_close(results[0], results[1])


# ------------------------------------------------------------------------------------
# DDIM (decoder, built from the DDPM config)
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 25, 100])
def test_ddim_trajectory_from_ddpm_config(n):
    ours = DDIMScheduler.from_folder(DECODER_DIR)
    assert isinstance(ours, DDIMScheduler) and ours.config.set_alpha_to_one is False
    ref = diffusers.DDIMScheduler.from_config(diffusers.DDPMScheduler.from_config(DECODER_CFG).config)
    compare_trajectories(ours, ref, n, DECODER_SHAPE)


@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("generator_kind", ["cpu", "list"])
def test_ddim_trajectory_with_eta(eta, generator_kind):
    ours = scheduler_from_config(DECODER_CFG, kind="ddim")
    ours.eta = eta
    ref = quiet_reference(diffusers.DDIMScheduler, DECODER_CFG)
    compare_trajectories(ours, ref, 25, DECODER_SHAPE, generator_kind=generator_kind, ref_step_kwargs={"eta": eta})


@pytest.mark.parametrize(
    "overrides",
    [
        {"clip_sample": True},
        {"set_alpha_to_one": True},
        {"beta_schedule": "scaled_linear", "steps_offset": 0},
    ],
)
def test_ddim_trajectory_variants(overrides):
    cfg = {**DECODER_CFG, **overrides}
    ours, ref = scheduler_from_config(cfg, kind="ddim"), quiet_reference(diffusers.DDIMScheduler, cfg)
    compare_trajectories(ours, ref, 25, DECODER_SHAPE)


def test_ddim_from_its_own_default_config():
    saved = diffusers.DDIMScheduler().config
    ours = scheduler_from_config(dict(saved), kind="ddim")  # in-memory configs carry no _class_name
    assert isinstance(ours, DDIMScheduler) and ours.config.set_alpha_to_one is True
    compare_trajectories(ours, diffusers.DDIMScheduler(), 10, DECODER_SHAPE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ddim_dtypes(dtype):
    ours = scheduler_from_config(DECODER_CFG, kind="ddim")
    compare_trajectories(ours, quiet_reference(diffusers.DDIMScheduler, DECODER_CFG), 10, DECODER_SHAPE, dtype=dtype)


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
    ours, ref = scheduler_from_config(cfg, kind=kind), quiet_reference(ref_cls, cfg)
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
    ours = Scheduler.from_folder(tmp_path)
    assert type(ours).__name__ == ref_cls.__name__


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
    ours = scheduler_from_config(cfg, kind=kind)
    ours.save_folder(tmp_path / "ours")
    ref = ref_cls.from_pretrained(tmp_path / "ours")
    expected = quiet_reference(ref_cls, cfg)
    for key, value in expected.config.items():
        if not key.startswith("_"):
            assert ref.config[key] == value, key
    assert torch.equal(ref.alphas_cumprod, ours.alphas_cumprod)
    ref.save_config(tmp_path / "ref")
    again = type(ours).from_folder(tmp_path / "ref")
    assert again.config == ours.config


def test_hub_ddpm_config_keeps_ddim_key():
    """The hub's DDPM config carries set_alpha_to_one=False: DDPM keeps it for a later DDIM."""
    ddpm = Scheduler.from_folder(DECODER_DIR)
    assert ddpm.config.to_dict()["set_alpha_to_one"] is False
    ddim = DDIMScheduler.from_config(ddpm.config.to_dict())
    ref = diffusers.DDIMScheduler.from_config(diffusers.DDPMScheduler.from_config(DECODER_CFG).config)
    assert torch.equal(ddim.final_alpha_cumprod, ref.final_alpha_cumprod)
    # And a DDIM config converts back to DDPM.
    back = scheduler_from_config(ddim.config.to_dict(), kind="ddpm")
    assert isinstance(back, DDPMScheduler) and back.config == ddpm.config


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
            scheduler_from_config(bad, kind=kind)


def test_kind_mismatch_refused():
    with pytest.raises(ConfigError, match="unclip"):
        scheduler_from_config(DECODER_CFG, kind="unclip")
    with pytest.raises(ConfigError, match="ddpm"):
        scheduler_from_config(PRIOR_CFG, kind="ddpm")
    with pytest.raises(ValueError, match="kind"):
        scheduler_from_config(PRIOR_CFG, kind="euler")
    no_name = {k: v for k, v in PRIOR_CFG.items() if k != "_class_name"}
    with pytest.raises(ConfigError, match="_class_name"):
        scheduler_from_config(no_name)
    assert isinstance(scheduler_from_config(no_name, kind="unclip"), UnCLIPScheduler)


def test_step_outside_schedule_refused():
    ours = Scheduler.from_folder(DECODER_DIR)
    ours.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep 500"):
        ours.step(torch.zeros(1, 4), 500, torch.zeros(1, 4))


# ------------------------------------------------------------------------------------
# CUDA (runs where a GPU is present)
# ------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("generator_kind", ["cpu", "list", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_trajectories(generator_kind, dtype):
    """CPU generators draw on the CPU even for CUDA samples; CUDA generators draw on the GPU."""
    prior = (Scheduler.from_folder(PRIOR_DIR), quiet_reference(diffusers.UnCLIPScheduler, PRIOR_CFG))
    decoder = (Scheduler.from_folder(DECODER_DIR), quiet_reference(diffusers.DDPMScheduler, DECODER_CFG))
    ddim = (DDIMScheduler.from_folder(DECODER_DIR), quiet_reference(diffusers.DDIMScheduler, DECODER_CFG))
    ddim[0].eta = 1.0
    cases = [
        (*prior, PRIOR_SHAPE, "pipeline", 8.0, {}),
        (*decoder, DECODER_SHAPE, "default", 1.0, {}),
        (*ddim, DECODER_SHAPE, "default", 1.0, {"eta": 1.0}),
    ]
    for ours, ref, shape, prev_style, scale, ref_step_kwargs in cases:
        compare_trajectories(
            ours,
            ref,
            25,
            shape,
            generator_kind=generator_kind,
            prev_style=prev_style,
            out_scale=scale,
            dtype=dtype,
            device="cuda",
            ref_step_kwargs=ref_step_kwargs,
        )


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
    ours, ref = Scheduler.from_folder(DECODER_DIR), quiet_reference(diffusers.DDPMScheduler, DECODER_CFG)
    x = torch.randn(DECODER_SHAPE, device="cuda", dtype=torch.float16)
    n = torch.randn(DECODER_SHAPE, device="cuda", dtype=torch.float16)
    t = torch.tensor([3, 500, 999], device="cuda")
    assert torch.equal(ours.add_noise(x, n, t), ref.add_noise(x, n, t))
