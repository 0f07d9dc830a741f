"""The samplers (kandinsky.sampling: discrete.py, solvers.py, the registry in samplers.py) against the
reference library's schedulers.

* UnCLIP, DDPM, DDIM: each sampler function runs a fake model (a fixed function of the sample and the
  step index) and is compared, sample after sample, with the reference scheduler's ``step`` loop on
  an equally seeded generator (the prior's loop passes ``prev_timestep`` as the reference's prior
  pipeline does); the generator states after the run must be equal too.
* DPM-Solver++ (+ Karras), UniPC, Euler, Euler ancestral, Heun: each reference scheduler is built
  ``from_config`` on the decoder's scheduler_config.json and run as a correct pipeline would: model
  input through ``scale_model_input``, ``step`` with the generator, img2img as ``timesteps[t_start *
  order:]`` + ``set_begin_index`` + ``add_noise``, inpainting as a blend with ``add_noise`` at the next
  timestep after each step. Every sample, every model call (timestep, input) and the generator states
  are compared.
* Through the pipelines: every decoder sampler against the reference UNet in a correct loop (or
  diffusers' own Kandinsky pipelines where those are correct), the prior's prefix cache, the step
  state, trajectories and the x0 grid.
"""
from __future__ import annotations

import inspect
import json

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from kandinsky.sampling import samplers
from kandinsky.sampling.discrete import sample_ddim
from kandinsky.sampling.samplers import Guided, get_sampler, make_plan, sample, sampler_names
from kandinsky.sampling.schedule import NoiseSchedule, randn
from kandinsky.sampling.solvers import make_multistep_plan, make_sigma_plan
from kandinsky.sampling.trajectory import Trajectory, grid_image
from tests.conftest import DATA
from tests.helpers import assert_close, generator_tail, make_generator, rel_err

PRIOR_DIR = DATA / "kandinsky-2-2-prior" / "scheduler"
DECODER_DIR = DATA / "kandinsky-2-2-decoder" / "scheduler"
PRIOR_CFG = json.loads((PRIOR_DIR / "scheduler_config.json").read_text())
DECODER_CFG = json.loads((DECODER_DIR / "scheduler_config.json").read_text())

PRIOR_SHAPE = (3, 32)  # (B, embedding dim): the prior's latents
SHAPE = DECODER_SHAPE = (3, 4, 8, 8)  # (B, 4, H/8, W/8): the decoder's latents

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


# ====================================================================================
# UnCLIP, DDPM, DDIM: step by step against the reference schedulers
# ====================================================================================


def trajectories(name, schedule, ref, n, shape, *, generator_kind="cpu", out_scale=1.0, dtype=torch.float32,
                 device="cpu", eta=None):
    """Our sampler ``name`` and the reference's step loop on the same fake model; every sample of each
    run and the generator tails. The reference prior loop passes prev_timestep = the next timestep
    (None on the last step), as the reference's prior pipeline does."""
    g_inputs = torch.Generator().manual_seed(1234)
    x_T = torch.randn(shape, generator=g_inputs).to(device=device, dtype=dtype)
    offsets = torch.randn((n,) + tuple(shape), generator=g_inputs).to(device=device, dtype=dtype)

    def model(x, i):
        return out_scale * (0.7 * torch.tanh(x) + offsets[i])

    def generator():
        if generator_kind == "cuda":
            return torch.Generator(device).manual_seed(0)
        g = make_generator(generator_kind, shape[0])  # CPU generator(s), also for CUDA samples
        if g is None:
            torch.manual_seed(99)
        return g

    plan = make_plan(name, schedule, n)
    ref.set_timesteps(n, device=device)
    assert torch.equal(plan.timesteps, ref.timesteps.cpu()) and plan.timesteps.dtype == torch.long

    g, ours = generator(), []
    fn = get_sampler(name).fn if eta is None else (lambda *a, **k: sample_ddim(*a, **k, eta=eta))
    fn(lambda x, t, step: Guided(model(x, step)), x_T, plan, generator=g, callback=lambda s: ours.append(s.x))
    ours_tail = generator_tail(g, device)

    g, theirs, x = generator(), [], x_T
    timesteps = ref.timesteps
    for i, t in enumerate(timesteps):
        kwargs = {} if eta is None else {"eta": eta}
        if name == "unclip":
            kwargs["prev_timestep"] = None if i == len(timesteps) - 1 else timesteps[i + 1]
        x = ref.step(model(x, i), t, x, generator=g, **kwargs).prev_sample
        theirs.append(x)
    return ours, theirs, ours_tail, generator_tail(g, device)


def compare_trajectories(name, schedule, ref, n, shape, tol=1e-5, **kw):
    ours, theirs, ours_tail, ref_tail = trajectories(name, schedule, ref, n, shape, **kw)
    assert len(ours) == len(theirs) == n
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.dtype == b.dtype and a.device == b.device and a.shape == b.shape
        try:
            assert_close(a, b, tol)
        except AssertionError as e:
            raise AssertionError(f"step {i} (t={int(ref.timesteps[i])}): {e}") from None
    assert torch.equal(ours_tail, ref_tail), "generator states differ after the trajectory"


# ------------------------------------------------------------------------------------
# UnCLIP (prior)
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 7, 25, 100])
def test_unclip_trajectory_hub_config(n):
    """Kandinsky 2.2's prior: x_0 prediction clipped to +-10 (outputs reach past it)."""
    ours = NoiseSchedule.from_folder(PRIOR_DIR)
    assert ours.kind == "unclip"
    compare_trajectories("unclip", ours, diffusers.UnCLIPScheduler.from_config(PRIOR_CFG), n, PRIOR_SHAPE,
                         out_scale=8.0)


def test_unclip_trajectory_all_training_steps():
    """n = T: every jump is t -> t-1, the branch using the table's betas."""
    ours = NoiseSchedule.from_folder(PRIOR_DIR)
    compare_trajectories("unclip", ours, diffusers.UnCLIPScheduler.from_config(PRIOR_CFG), 1000, (2, 8),
                         out_scale=8.0)


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
    scale = 8.0 if cfg["prediction_type"] == "sample" else 1.0
    compare_trajectories("unclip", NoiseSchedule.from_config(cfg), diffusers.UnCLIPScheduler.from_config(cfg), 25,
                         PRIOR_SHAPE, out_scale=scale)


@pytest.mark.parametrize("generator_kind", ["list", "none"])
def test_unclip_generator_kinds(generator_kind):
    compare_trajectories("unclip", NoiseSchedule.from_folder(PRIOR_DIR), diffusers.UnCLIPScheduler.from_config(PRIOR_CFG),
                         7, PRIOR_SHAPE, out_scale=8.0, generator_kind=generator_kind)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_unclip_dtypes(dtype):
    """Coefficients stay float32 0-dim tensors; the arithmetic happens in the sample's dtype."""
    compare_trajectories("unclip", NoiseSchedule.from_folder(PRIOR_DIR), diffusers.UnCLIPScheduler.from_config(PRIOR_CFG),
                         7, PRIOR_SHAPE, out_scale=8.0, dtype=dtype)


# ------------------------------------------------------------------------------------
# DDPM (decoder)
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 25, 100])
def test_ddpm_trajectory_hub_config(n):
    ours = NoiseSchedule.from_folder(DECODER_DIR)
    assert ours.kind == "ddpm"
    compare_trajectories("ddpm", ours, diffusers.DDPMScheduler.from_config(DECODER_CFG), n, DECODER_SHAPE)


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
    compare_trajectories("ddpm", NoiseSchedule.from_config(cfg), diffusers.DDPMScheduler.from_config(cfg), 25,
                         DECODER_SHAPE)


@pytest.mark.parametrize("generator_kind", ["list", "none"])
def test_ddpm_generator_kinds(generator_kind):
    compare_trajectories("ddpm", NoiseSchedule.from_folder(DECODER_DIR), diffusers.DDPMScheduler.from_config(DECODER_CFG),
                         7, DECODER_SHAPE, generator_kind=generator_kind)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ddpm_dtypes(dtype):
    compare_trajectories("ddpm", NoiseSchedule.from_folder(DECODER_DIR), diffusers.DDPMScheduler.from_config(DECODER_CFG),
                         7, DECODER_SHAPE, dtype=dtype)


def test_ddpm_lands_where_the_reference_steps():
    """Each step lands on the next timestep of the schedule (the last on -1): the reference's own
    ``previous_timestep``, which the prior pipeline passes explicitly."""
    ours, ref = NoiseSchedule.from_folder(DECODER_DIR), diffusers.DDPMScheduler.from_config(DECODER_CFG)
    for n in (1, 7, 25, 100):
        ref.set_timesteps(n)
        plan = make_plan("ddpm", ours, n)
        assert plan.prev_timesteps == [int(ref.previous_timestep(t)) for t in ref.timesteps], n


def test_ddpm_img2img_partial_schedule():
    """img2img: add_noise at timesteps[t_start], then the steps timesteps[t_start * order:]."""
    ours, ref = NoiseSchedule.from_folder(DECODER_DIR), diffusers.DDPMScheduler.from_config(DECODER_CFG)
    ref.set_timesteps(20)
    t_start = 8
    image = torch.randn(DECODER_SHAPE, generator=torch.Generator().manual_seed(5))

    g = torch.Generator().manual_seed(0)
    plan = make_plan("ddpm", ours, 20).tail(20 - t_start)
    x = plan.add_noise(image, randn(DECODER_SHAPE, g, "cpu", torch.float32))
    got = sample("ddpm", lambda x, t, step: Guided(0.5 * torch.tanh(x)), x, plan, generator=g)

    g = torch.Generator().manual_seed(0)
    timesteps = ref.timesteps[t_start * ref.order :]
    noise = randn_tensor(DECODER_SHAPE, generator=g, device=torch.device("cpu"), dtype=torch.float32)
    x = ref.add_noise(image, noise, timesteps[:1].repeat(DECODER_SHAPE[0]))
    for t in timesteps:
        x = ref.step(0.5 * torch.tanh(x), t, x, generator=g).prev_sample
    assert_close(got, x)


# ------------------------------------------------------------------------------------
# DDIM (decoder, on the DDPM config)
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 25, 100])
def test_ddim_trajectory_from_ddpm_config(n):
    ours = NoiseSchedule.from_folder(DECODER_DIR)  # the DDPM checkpoint's schedule: DDIM runs on it as is
    ref = diffusers.DDIMScheduler.from_config(diffusers.DDPMScheduler.from_config(DECODER_CFG).config)
    compare_trajectories("ddim", ours, ref, n, DECODER_SHAPE)


@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("generator_kind", ["cpu", "list"])
def test_ddim_trajectory_with_eta(eta, generator_kind):
    ours = NoiseSchedule.from_config(DECODER_CFG, kind="ddim")
    compare_trajectories("ddim", ours, diffusers.DDIMScheduler.from_config(DECODER_CFG), 25, DECODER_SHAPE,
                         generator_kind=generator_kind, eta=eta)


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
    compare_trajectories("ddim", NoiseSchedule.from_config(cfg, kind="ddim"), diffusers.DDIMScheduler.from_config(cfg),
                         25, DECODER_SHAPE)


def test_ddim_from_its_own_default_config():
    saved = diffusers.DDIMScheduler().config
    ours = NoiseSchedule.from_config(dict(saved), kind="ddim")  # in-memory configs carry no _class_name
    assert ours.kind == "ddim" and ours.config.set_alpha_to_one is True
    compare_trajectories("ddim", ours, diffusers.DDIMScheduler(), 10, DECODER_SHAPE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ddim_dtypes(dtype):
    ours = NoiseSchedule.from_config(DECODER_CFG, kind="ddim")
    compare_trajectories("ddim", ours, diffusers.DDIMScheduler.from_config(DECODER_CFG), 10, DECODER_SHAPE, dtype=dtype)


@needs_cuda
@pytest.mark.parametrize("generator_kind", ["cpu", "list", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_discrete_trajectories(generator_kind, dtype):
    """CPU generators draw on the CPU even for CUDA samples; CUDA generators draw on the GPU."""
    common = dict(generator_kind=generator_kind, dtype=dtype, device="cuda")
    compare_trajectories("unclip", NoiseSchedule.from_folder(PRIOR_DIR), diffusers.UnCLIPScheduler.from_config(PRIOR_CFG),
                         25, PRIOR_SHAPE, out_scale=8.0, **common)
    compare_trajectories("ddpm", NoiseSchedule.from_folder(DECODER_DIR), diffusers.DDPMScheduler.from_config(DECODER_CFG),
                         25, DECODER_SHAPE, **common)
    compare_trajectories("ddim", NoiseSchedule.from_folder(DECODER_DIR, kind="ddim"),
                         diffusers.DDIMScheduler.from_config(DECODER_CFG), 25, DECODER_SHAPE, eta=1.0, **common)


@pytest.mark.parametrize("name, folder, cls", [
    ("ddpm", "kandinsky-2-2-decoder", "DDPMScheduler"),
    ("ddim", "kandinsky-2-2-decoder", "DDIMScheduler"),
    ("unclip", "kandinsky-2-2-prior", "UnCLIPScheduler"),
])
def test_discrete_samplers_bit_identical(name, folder, cls):
    """The pure sampler functions give exactly the reference scheduler's trajectory (fake model,
    same generator; the prior loop passes prev_timestep as diffusers' prior pipeline does)."""
    config = json.loads((DATA / folder / "scheduler" / "scheduler_config.json").read_text())
    schedule = NoiseSchedule.from_config(config, kind=name)
    shape = (2, 16) if name == "unclip" else (2, 4, 8, 8)
    scale = 8.0 if name == "unclip" else 1.0

    def model(x, t):
        return scale * torch.tanh(x + float(t) / 1000)

    x_T = torch.randn(shape, generator=gen(30))
    plan = samplers.make_plan(name, schedule, 7)
    seen = []
    ours = samplers.sample(name, lambda x, t, step: samplers.Guided(model(x, t)), x_T.clone(), plan,
                           generator=gen(31), callback=lambda s: seen.append(s.x.clone()))
    ref = getattr(diffusers, cls).from_config(config)
    ref.set_timesteps(7)
    x, g, expected = x_T.clone(), gen(31), []
    timesteps = ref.timesteps
    for i, t in enumerate(timesteps):
        kwargs = {"prev_timestep": timesteps[i + 1] if i + 1 < len(timesteps) else None} if name == "unclip" else {}
        x = ref.step(model(x, t), t, x, generator=g, **kwargs).prev_sample
        expected.append(x)
    assert torch.equal(plan.timesteps, timesteps.cpu())
    assert all(torch.equal(a, b) for a, b in zip(seen, expected)) and torch.equal(ours, x)


# ====================================================================================
# DPM-Solver++, UniPC, Euler, Euler ancestral, Heun
# ====================================================================================
# our name -> (reference class, extra config)
REFERENCE = {
    "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (diffusers.DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "unipc": (diffusers.UniPCMultistepScheduler, {}),
    "euler": (diffusers.EulerDiscreteScheduler, {}),
    "euler_a": (diffusers.EulerAncestralDiscreteScheduler, {}),
    "heun": (diffusers.HeunDiscreteScheduler, {}),
}
NAMES = list(REFERENCE)


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.from_folder(DECODER_DIR)


def solver_reference(name: str, **config):
    cls, extra = REFERENCE[name]
    return cls.from_config({**DECODER_CFG, **extra, **config})


# ------------------------------------------------------------------------------------
# a fake model and the two loops
# ------------------------------------------------------------------------------------


class FakeUNet:
    """eps = 0.7 tanh(x) + 0.3 sin(t / 50 + phase): a fixed function of input and timestep,
    with 4 extra "variance" channels that the samplers must ignore. Records every call."""

    def __init__(self, shape, device="cpu"):
        g = torch.Generator().manual_seed(7)
        self.phase = (6.28 * torch.rand(shape, generator=g)).to(device)
        self.calls = []

    def __call__(self, x_in, t):
        self.calls.append((float(t), x_in.clone()))
        eps = 0.7 * torch.tanh(x_in.float()) + 0.3 * torch.sin(float(t) / 50 + self.phase)
        return torch.cat([eps, 3.0 + eps], dim=1).to(x_in.dtype)  # (B, 8, h, w)


class Denoiser:
    """Our side: the denoiser interface over the fake UNet."""

    stage = "decoder"

    def __init__(self, unet):
        self.unet = unet
        self.steps = []

    def __call__(self, x, t, step):
        self.steps.append(step)
        return Guided(self.unet(x, t))


def inputs(shape=SHAPE, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(1234)
    x_T, x0, noise = (torch.randn(shape, generator=g) for _ in range(3))
    keep = (torch.rand(shape[:1] + (1,) + shape[2:], generator=g) > 0.5).float()  # (B, 1, h, w)
    return [v.to(device, dtype) for v in (x_T, x0, noise, keep)]


def level_timesteps(sched) -> torch.Tensor:
    """The reference's timestep per sampler step (Heun repeats each but the first)."""
    t = sched.timesteps
    return torch.cat([t[:1], t[1::2]]) if sched.order == 2 else t


def solver_reference_loop(name, n, *, x_T, x0, noise, keep, generator, tail=None, blend=False, scale_input=True):
    """The reference scheduler in a correct loop; the sample after every sampler step."""
    sched = solver_reference(name)
    sched.set_timesteps(n, device=x_T.device)
    levels = level_timesteps(sched)
    timesteps, begin = sched.timesteps, 0
    if tail is None:
        x = x_T * sched.init_noise_sigma
    else:
        begin = n - tail
        timesteps = timesteps[begin * sched.order :]
        sched.set_begin_index(begin * sched.order)
        x = sched.add_noise(x0, noise, timesteps[:1])
    unet = FakeUNet(x.shape, x.device)
    kwargs = {"generator": generator} if "generator" in inspect.signature(sched.step).parameters else {}
    samples, level = [], begin
    for j, t in enumerate(timesteps):
        x_in = sched.scale_model_input(x, t) if scale_input else x
        eps = unet(x_in, t)[:, : x.shape[1]]  # the pipelines' split of the variance channels
        x = sched.step(eps, t, x, **kwargs).prev_sample
        if getattr(sched, "state_in_first_order", True) or j == len(timesteps) - 1:  # a sampler step ended
            if blend:  # Kandinsky's inpainting blend
                known = x0 if level == n - 1 else sched.add_noise(x0, noise, levels[level + 1 : level + 2])
                x = keep * known + (1 - keep) * x
            samples.append(x)
            level += 1
    return samples, unet.calls


def our_loop(name, n, schedule, *, x_T, x0, noise, keep, generator, tail=None, blend=False):
    plan = make_plan(name, schedule, n)
    if tail is None:
        x = x_T * plan.init_noise_sigma
    else:
        plan = plan.tail(tail)
        x = plan.add_noise(x0, noise)
    unet = FakeUNet(x.shape, x.device)
    denoiser, samples, states = Denoiser(unet), [], []

    def callback(state):
        x = state.x
        if blend:
            x = keep * plan.add_noise(x0, noise, plan.begin + state.step + 1) + (1 - keep) * x
        states.append(state)
        samples.append(x)
        return x

    out = sample(name, denoiser, x, plan, generator=generator, callback=callback)
    assert out is samples[-1]
    return samples, unet.calls, denoiser.steps, states, plan


def compare(name, n, schedule, *, generator_kind="cpu", dtype=torch.float32, device="cpu", tol=1e-5, **task):
    x_T, x0, noise, keep = inputs(SHAPE, dtype, device)
    common = dict(x_T=x_T, x0=x0, noise=noise, keep=keep, **task)
    g_ref, g_ours = make_generator(generator_kind, SHAPE[0], seed=10), make_generator(generator_kind, SHAPE[0], seed=10)
    ref, ref_calls = solver_reference_loop(name, n, generator=g_ref, **common)
    ours, our_calls, steps, states, plan = our_loop(name, n, schedule, generator=g_ours, **common)

    assert len(ours) == len(ref) == plan.num_steps - plan.begin
    assert [t for t, _ in our_calls] == [t for t, _ in ref_calls], "model timesteps differ"
    for k, ((_, a), (_, b)) in enumerate(zip(our_calls, ref_calls)):
        try:
            assert_close(a, b, tol)
        except AssertionError as e:
            raise AssertionError(f"model input {k}: {e}") from None
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.dtype == b.dtype and a.device == b.device and a.shape == b.shape
        try:
            assert_close(a, b, tol)
        except AssertionError as e:
            raise AssertionError(f"{name}, step {i} of {len(ref)}: {e}") from None
    assert torch.equal(generator_tail(g_ours), generator_tail(g_ref)), "generator states differ after the run"
    # one callback per sampler step, numbered from 0; Heun's two calls share their step
    assert [s.step for s in states] == list(range(len(ref)))
    assert steps == sorted(steps) and set(steps) == set(range(len(ref)))
    assert all(s.x0 is not None and s.sigma is not None and s.num_steps == len(ref) for s in states)
    return ours, ref


# ------------------------------------------------------------------------------------
# plans: timesteps, sigmas, initial noise
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_plan_equals_reference_tables(name, schedule):
    for n in (1, 2, 7, 10, 15, 20, 25, 50, 999):
        ref = solver_reference(name)
        ref.set_timesteps(n)
        plan = make_plan(name, schedule, n)
        ref_sigmas = ref.sigmas if ref.order == 1 else torch.cat([ref.sigmas[:1], ref.sigmas[1::2]])
        assert torch.equal(plan.timesteps, level_timesteps(ref)), n
        assert plan.timesteps.dtype == ref.timesteps.dtype
        assert torch.equal(plan.sigmas, ref_sigmas), n
        assert plan.init_noise_sigma == float(ref.init_noise_sigma), n
        assert plan.space == ("vp" if name in ("dpmpp_2m", "dpmpp_2m_karras", "unipc") else "sigma")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_plan_spacing_equals_reference(name, spacing, schedule):
    """An explicit timestep_spacing in the config (the plan makers' keyword)."""
    for n in (3, 10, 20, 50):
        ref = solver_reference(name, timestep_spacing=spacing)
        ref.set_timesteps(n)
        if name in ("dpmpp_2m", "dpmpp_2m_karras", "unipc"):  # Karras levels do not depend on the spacing
            plan = make_multistep_plan(name, schedule, n, karras=name.endswith("karras"), timestep_spacing=spacing)
        else:
            plan = make_sigma_plan(name, schedule, n, timestep_spacing=spacing)
        ref_sigmas = ref.sigmas if ref.order == 1 else torch.cat([ref.sigmas[:1], ref.sigmas[1::2]])
        assert torch.equal(plan.timesteps, level_timesteps(ref)), (spacing, n)
        assert torch.equal(plan.sigmas, ref_sigmas), (spacing, n)
        assert plan.init_noise_sigma == float(ref.init_noise_sigma), (spacing, n)


def test_reference_defaults_to_linspace_on_kandinsky_config():
    """Why the default spacing is "linspace": the decoder's config names none."""
    assert "timestep_spacing" not in DECODER_CFG
    for name in NAMES:
        assert solver_reference(name).config.timestep_spacing == "linspace"


def test_registry_and_errors(schedule):
    for name in NAMES:
        assert name in sampler_names("decoder")
        assert get_sampler(name).evals_per_step
    assert get_sampler("DPM++-2M-Karras").name == "dpmpp_2m_karras"
    assert get_sampler("euler-ancestral").name == "euler_a"
    with pytest.raises(ValueError, match="num_inference_steps=0"):
        make_plan("euler", schedule, 0)
    with pytest.raises(ValueError, match="timestep_spacing='even'"):
        make_sigma_plan("euler", schedule, 10, timestep_spacing="even")


# ------------------------------------------------------------------------------------
# trajectories
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n, generator_kind", [(10, "list"), (20, "cpu")])
def test_text2img_trajectory(name, n, generator_kind, schedule):
    compare(name, n, schedule, generator_kind=generator_kind)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n, tail", [(10, 6), (20, 1)])
def test_img2img_trajectory(name, n, tail, schedule):
    compare(name, n, schedule, tail=tail)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tail", [None, 7])
def test_inpaint_blend_trajectory(name, tail, schedule):
    ours, _ = compare(name, 12, schedule, tail=tail, blend=True)
    _, x0, _, keep = inputs()
    assert torch.equal(ours[-1] * keep, x0 * keep)  # the kept region ends exactly on the known latents


def test_heun_calls_the_model_twice_per_step_but_the_last(schedule):
    plan = make_plan("heun", schedule, 10)
    x_T, *_ = inputs()
    denoiser = Denoiser(FakeUNet(SHAPE))
    sample("heun", denoiser, x_T * plan.init_noise_sigma, plan)
    assert len(denoiser.steps) == 2 * 10 - 1
    assert denoiser.steps == [i for i in range(9) for _ in range(2)] + [9]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_as_accurate_as_reference(name, dtype, schedule):
    """fp16 / bf16 samples: the reference upcasts to float32 inside DPM-Solver++, Euler and Euler a
    (not in UniPC and Heun) and returns the model output's dtype; we do the same. Both half runs
    are measured against the float32 reference: ours must be as close as the reference's own."""
    x_T, x0, noise, keep = inputs()
    exact, _ = solver_reference_loop(name, 10, x_T=x_T, x0=x0, noise=noise, keep=keep, generator=make_generator("cpu", 3, seed=10))
    half = dict(zip(("x_T", "x0", "noise", "keep"), (v.to(dtype) for v in (x_T, x0, noise, keep))))
    g_ref, g_ours = make_generator("cpu", 3, seed=10), make_generator("cpu", 3, seed=10)
    ref, _ = solver_reference_loop(name, 10, generator=g_ref, **half)
    ours, *_ = our_loop(name, 10, schedule, generator=g_ours, **half)
    assert all(a.dtype == b.dtype == dtype for a, b in zip(ours, ref))
    assert torch.equal(generator_tail(g_ours), generator_tail(g_ref))
    unit = torch.finfo(dtype).eps
    for i, (a, b, c) in enumerate(zip(ours, ref, exact)):
        assert rel_err(a, c) <= 1.5 * rel_err(b, c) + 2 * unit, f"step {i}: {rel_err(a, c):.3g} vs {rel_err(b, c):.3g}"


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_samples_with_cpu_generator(name, schedule):
    compare(name, 10, schedule, device="cuda", generator_kind="list")


# ------------------------------------------------------------------------------------
# maths: an exact denoiser for Gaussian data, and the reference Kandinsky pipelines' Euler loop
# ------------------------------------------------------------------------------------

DATA_STD = 0.5


class GaussianDenoiser:
    """The exact epsilon-predictor for data x_0 ~ N(0, c^2): eps = sigma x_t / (alpha^2 c^2 + sigma^2)
    for the VP input x_t at the timestep's level (s interpolated at fractional timesteps)."""

    stage = "decoder"

    def __init__(self, schedule):
        self.table = ((1 - schedule.alphas_cumprod) / schedule.alphas_cumprod).sqrt().numpy()

    def eps(self, x_t, t):
        s = float(np.interp(float(t), np.arange(len(self.table)), self.table))
        alpha = 1 / (1 + s * s) ** 0.5
        sigma = s * alpha
        return sigma * x_t / (alpha**2 * DATA_STD**2 + sigma**2)

    def __call__(self, x, t, step):
        return Guided(self.eps(x, t))


@pytest.mark.parametrize("name", NAMES)
def test_samples_converge_to_the_data_distribution(name, schedule):
    """With the exact denoiser every solver must land on N(0, c^2) as the steps grow (maths, not the
    reference): the std's error shrinks from 20 to 100 steps and ends within 8%."""
    errors = []
    for n in (20, 100):
        plan = make_plan(name, schedule, n)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(8, 4, 32, 32, generator=g) * plan.init_noise_sigma
        out = sample(name, GaussianDenoiser(schedule), x, plan, generator=g)
        errors.append(abs(out.std().item() / DATA_STD - 1))
    assert errors[1] < errors[0] or errors[1] < 0.005, errors
    assert errors[1] < 0.08, errors


def test_reference_kandinsky_euler_loop_is_wrong(schedule):
    """The reference Kandinsky pipelines never call scale_model_input: with EulerDiscreteScheduler
    the UNet sees x = x_0 + s eps (s ~ 25 at the first step) instead of x / sqrt(1 + s^2). With the
    exact Gaussian denoiser the correct loop gives std ~ c; the reference's loop does not."""
    n, shape = 20, (8, 4, 32, 32)
    denoiser = GaussianDenoiser(schedule)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    runs = {}
    for scale_input in (True, False):
        sched = solver_reference("euler")
        sched.set_timesteps(n)
        x = x_T * sched.init_noise_sigma
        for t in sched.timesteps:
            x_in = sched.scale_model_input(x, t) if scale_input else x
            x = sched.step(denoiser.eps(x_in, t), t, x).prev_sample
        runs[scale_input] = x
    plan = make_plan("euler", schedule, n)
    ours = sample("euler", denoiser, x_T * plan.init_noise_sigma, plan)
    assert_close(ours, runs[True], 1e-4)
    deviation = rel_err(runs[False], runs[True])
    print(f"reference Kandinsky-style Euler loop vs correct loop: relative deviation {deviation:.3g}; "
          f"std {runs[False].std().item():.3g} vs {runs[True].std().item():.3g} (data std {DATA_STD})")
    assert abs(runs[True].std().item() / DATA_STD - 1) < 0.15  # Euler's own error at 20 steps (see above)
    assert deviation > 0.5
    assert abs(runs[False].std().item() / DATA_STD - 1) > 0.5


# ====================================================================================
# Through the pipelines
# ====================================================================================

TOL = 1e-4
SIZE = dict(height=64, width=64)
REFERENCE_CLASSES = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_karras": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def embeds(batch: int, seed: int = 0):
    g = gen(100 + seed)
    return torch.randn(batch, 32, generator=g), torch.randn(batch, 32, generator=g)


def rgb(seed: int) -> PIL.Image.Image:
    return PIL.Image.fromarray((torch.rand(64, 64, 3, generator=gen(seed)) * 255).byte().numpy())


def pipeline_reference_scheduler(name: str, config):
    extra = {"use_karras_sigmas": True} if name == "dpmpp_2m_karras" else {}
    return getattr(diffusers, REFERENCE_CLASSES[name]).from_config(config, **extra)


@torch.no_grad()
def pipeline_reference_loop(ref, name, e, n, guidance_scale, generator, image=None, strength=1.0, steps=6):
    """A correct sampling loop with the reference UNet, MoVQ and scheduler: the model input scaled with
    ``scale_model_input`` (the reference Kandinsky pipelines skip it), guidance as theirs, img2img as
    theirs with the step order and begin index honoured. Returns latents."""
    sched = pipeline_reference_scheduler(name, ref.scheduler.config)
    sched.set_timesteps(steps)
    timesteps = sched.timesteps
    B = e.shape[0]
    shape = (B, 4, 8, 8)
    if image is None:
        x = diffusers.utils.torch_utils.randn_tensor(shape, generator=generator) * sched.init_noise_sigma
    else:
        kept = min(int(steps * strength), steps)
        start = (steps - kept) * sched.order
        timesteps = timesteps[start:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start)
        pixels = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
        latents = ref.movq.encode(pixels)["latents"].repeat(B, 1, 1, 1)
        noise = diffusers.utils.torch_utils.randn_tensor(latents.shape, generator=generator)
        x = sched.add_noise(latents, noise, timesteps[:1].repeat(B))
    guided = guidance_scale > 1
    cond = torch.cat([n, e]) if guided else e
    for t in timesteps:
        x_in = torch.cat([x, x]) if guided else x
        x_in = sched.scale_model_input(x_in, t)
        out = ref.unet(x_in, t, None, added_cond_kwargs={"image_embeds": cond}).sample[:, :4]
        if guided:
            u, c = out.chunk(2)
            out = u + guidance_scale * (c - u)
        kwargs = {"generator": generator} if name in ("ddpm", "ddim", "euler_a", "dpmpp_2m", "dpmpp_2m_karras") else {}
        x = sched.step(out, t, x, **kwargs).prev_sample
    return x


# --------------------------------------------------------------------------- every sampler, whole pipelines
@pytest.mark.parametrize("name", list(REFERENCE_CLASSES))
def test_every_sampler_text2img_and_img2img(decoder, name):
    """Our DecoderPipeline with ``scheduler=name`` equals the reference UNet run by the reference
    scheduler in a correct loop: text2img guided (batch 2) and img2img (strength 0.5), 6 steps."""
    ours, ref = decoder
    e, n = embeds(2, seed=1)
    got = ours.text2img(e, n, scheduler=name, num_inference_steps=6, guidance_scale=4.0, generator=gen(1),
                        output_type="latent", progress=False, **SIZE).images
    exp = pipeline_reference_loop(ref, name, e, n, 4.0, gen(1))
    assert rel_err(got, exp) < TOL
    image = rgb(2)
    got = ours.img2img(e, image, n, scheduler=name, strength=0.5, num_inference_steps=6, guidance_scale=1.0,
                       generator=gen(2), output_type="latent", progress=False, **SIZE).images
    exp = pipeline_reference_loop(ref, name, e, n, 1.0, gen(2), image=image, strength=0.5)
    assert rel_err(got, exp) < TOL


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_karras"])
def test_reference_kandinsky_pipelines_with_dpm_solver(decoder, inpainter, name):
    """For DPM-Solver++ the model-input scaling is the identity, so diffusers' own Kandinsky pipelines
    with the scheduler swapped are a valid reference: text2img and inpaint, guided, batch 2."""
    ours, ref = decoder
    e, n = embeds(2, seed=3)
    kw = dict(num_inference_steps=5, guidance_scale=4.0, **SIZE)
    swapped = diffusers.KandinskyV22Pipeline(unet=ref.unet, movq=ref.movq,
                                             scheduler=pipeline_reference_scheduler(name, ref.scheduler.config))
    swapped.set_progress_bar_config(disable=True)
    got = ours.text2img(e, n, scheduler=name, generator=gen(3), output_type="latent", progress=False, **kw).images
    exp = swapped(image_embeds=e, negative_image_embeds=n, generator=gen(3), output_type="latent", **kw).images
    assert rel_err(got, exp) < TOL

    ours, ref = inpainter
    mask = np.zeros((64, 64), dtype=np.float32)
    mask[8:40, 16:56] = 1
    image = rgb(4)
    swapped = diffusers.KandinskyV22InpaintPipeline(unet=ref.unet, movq=ref.movq,
                                                    scheduler=pipeline_reference_scheduler(name, ref.scheduler.config))
    swapped.set_progress_bar_config(disable=True)
    got = ours.inpaint(e[:1], image, mask, n[:1], scheduler=name, generator=gen(4), output_type="latent",
                       progress=False, **kw).images
    exp = swapped(image_embeds=e[:1], image=image, mask_image=mask.copy(), negative_image_embeds=n[:1],
                  generator=gen(4), output_type="latent", **kw).images
    assert rel_err(got, exp) < TOL


def test_reference_kandinsky_pipeline_euler_is_wrong(decoder):
    """Deviation recorded: diffusers' Kandinsky pipeline never calls scale_model_input, so with
    EulerDiscreteScheduler it feeds the UNet latents scaled by sigma (~25 at the first step) and
    returns something else than a correct Euler loop; ours is the correct loop."""
    ours, ref = decoder
    e, n = embeds(1, seed=5)
    kw = dict(num_inference_steps=6, guidance_scale=4.0, **SIZE)
    swapped = diffusers.KandinskyV22Pipeline(unet=ref.unet, movq=ref.movq,
                                             scheduler=pipeline_reference_scheduler("euler", ref.scheduler.config))
    swapped.set_progress_bar_config(disable=True)
    wrong = swapped(image_embeds=e, negative_image_embeds=n, generator=gen(5), output_type="latent", **kw).images
    right = pipeline_reference_loop(ref, "euler", e, n, 4.0, gen(5))
    got = ours.text2img(e, n, scheduler="euler", generator=gen(5), output_type="latent", progress=False,
                        **kw).images
    assert rel_err(got, right) < TOL
    assert rel_err(wrong, right) > 0.1


def test_scheduler_names_and_objects(decoder):
    ours, ref = decoder
    assert samplers.get_sampler("DPMPP-2M").name == "dpmpp_2m"
    with pytest.raises(ValueError, match="unknown sampler 'lms'.*ddpm, ddim, dpmpp_2m"):
        ours.text2img(*embeds(1), scheduler="lms", progress=False)
    with pytest.raises(ValueError, match="the prior's"):
        ours.text2img(*embeds(1), scheduler="unclip", progress=False)
    previous = ours.sampler
    try:
        ours.set_scheduler(diffusers.EulerAncestralDiscreteScheduler.from_config(ref.scheduler.config))
        assert ours.sampler == "euler_a"
        ours.set_scheduler(pipeline_reference_scheduler("dpmpp_2m_karras", ref.scheduler.config))
        assert ours.sampler == "dpmpp_2m_karras"
        bad = diffusers.DDPMScheduler.from_config({**ref.scheduler.config, "beta_end": 0.02})
        with pytest.raises(ValueError, match="beta_end"):
            ours.set_scheduler(bad)
        with pytest.raises(TypeError, match="sampler name"):
            ours.set_scheduler(diffusers.LMSDiscreteScheduler.from_config(ref.scheduler.config))
    finally:
        ours.set_scheduler(previous)


# --------------------------------------------------------------------------- prior prefix cache
def test_prior_cache_equals_uncached(prior_pipeline_folder):
    """The cached prior (the default, also under every reference-parity test of the prior pipeline)
    equals recomputing all 81 tokens at every step: negative prompt, 2 images per prompt."""
    from kandinsky import PriorPipeline

    pipe = PriorPipeline.from_pretrained(prior_pipeline_folder[0])
    kw = dict(negative_prompt="a dog", num_images_per_prompt=2, num_inference_steps=5, progress=False)
    cached = pipe(["a red cat", "a blue house"], generator=gen(6), **kw)
    plain = pipe(["a red cat", "a blue house"], generator=gen(6), cache=False, **kw)
    assert rel_err(cached.image_embeds, plain.image_embeds) < 1e-5
    assert rel_err(cached.negative_image_embeds, plain.negative_image_embeds) < 1e-5


def test_prior_forward_cached_equals_forward():
    from kandinsky.prior.model import DiffusionPrior, PriorConfig

    torch.manual_seed(0)
    prior = DiffusionPrior(PriorConfig(num_attention_heads=2, attention_head_dim=8, num_layers=3, embedding_dim=16))
    with torch.no_grad():
        for p in prior.parameters():
            p.normal_(0, 0.3)
        g = gen(7)
        x, te, th = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g), torch.randn(3, 77, 16, generator=g)
        mask = torch.arange(77)[None] < torch.tensor([[5], [77], [30]])
        full = prior(x, torch.tensor([999, 500, 3]), te, th, mask)
        prefix = prior.prefix(te, th, mask)
        assert rel_err(prior.forward_cached(x, torch.tensor([999, 500, 3]), prefix), full) < 1e-5
        index = torch.tensor([2, 2, 0])
        assert rel_err(prior.forward_cached(x[index], torch.tensor([3, 3, 999]), prefix.select(index)),
                       full[torch.tensor([2, 2, 0])]) < 1e-5
        with pytest.raises(ValueError, match="prefix was computed for 3"):
            prior.forward_cached(x[:2], 5, prefix)


# --------------------------------------------------------------------------- step state, trajectories
def test_step_state_both_stages(prior_pipeline_folder, decoder_pipeline_folder):
    """One callback form for both stages: stage, step, timestep, x, x0 and, with guidance, the branch
    outputs whose combination is the guided output (s = 4); a returned tensor replaces x."""
    from kandinsky import Kandinsky

    pipe = Kandinsky.from_pretrained(decoder_pipeline_folder[0], prior=prior_pipeline_folder[0])
    seen = []

    def callback(state):
        seen.append(state)
        if state.uncond is not None:
            guided = state.uncond + 4.0 * (state.cond - state.uncond)
            assert torch.allclose(guided, state.model_output, atol=1e-6)

    pipe.text2img("a red cat", num_inference_steps=3, prior_num_inference_steps=4, guidance_scale=4.0,
                  prior_guidance_scale=1.0, callback_on_step_end=callback, progress=False, output_type="latent",
                  **SIZE)
    assert [(s.stage, s.step) for s in seen] == [("prior", i) for i in range(4)] + [("decoder", i) for i in range(3)]
    assert all(s.uncond is None for s in seen[:4]) and all(s.uncond is not None for s in seen[4:])
    assert seen[0].x.shape == (1, 32) and seen[-1].x.shape == (1, 4, 8, 8) and seen[-1].x0.shape == (1, 4, 8, 8)
    reference = diffusers.DDPMScheduler.from_pretrained(decoder_pipeline_folder[0], subfolder="scheduler")
    reference.set_timesteps(3)
    assert [s.timestep for s in seen[4:]] == [float(t) for t in reference.timesteps]


def test_trajectory(decoder):
    ours, _ = decoder
    e, n = embeds(2, seed=8)
    out = ours.text2img(e, n, num_inference_steps=4, return_trajectory=True, generator=gen(8),
                        output_type="latent", progress=False, **SIZE)
    traj = out.trajectory
    assert len(traj) == 4 and traj.x.shape == traj.x0.shape == (4, 2, 4, 8, 8)
    assert torch.equal(traj.x[-1], out.images)
    assert rel_err(traj.x[-1], traj.x0[-1]) < 1e-6  # the last DDPM step lands on its x0 estimate
    recorder = Trajectory()
    again = ours.text2img(e, n, num_inference_steps=4, callback_on_step_end=recorder, generator=gen(8),
                          output_type="latent", progress=False, **SIZE).images
    assert torch.equal(again, out.images) and torch.equal(recorder.x, traj.x)
    frames = torch.rand(3, 2, 3, 10, 12)
    grid = grid_image(frames, pad=2)
    assert grid.size == (3 * 14 + 2, 2 * 12 + 2)
    y, x = 2 + 1 * (10 + 2), 2 + 1 * (12 + 2)  # image 1 of step 1: one row and one column in
    assert np.asarray(grid)[y, x].tolist() == (frames[1, 1, :, 0, 0] * 255).round().byte().tolist()


def test_save_steps_cli(tmp_path):
    """`--save-steps grid.png` writes the x0 previews: steps across, images down."""
    from kandinsky.cli import main

    out, grid = tmp_path / "o.png", tmp_path / "grid.png"
    code = main(["text2img", "--demo", "a red cat", "-o", str(out), "--steps", "3", "--prior-steps", "2",
                 "--width", "64", "--height", "64", "--num-images", "2", "--save-steps", str(grid),
                 "--scheduler", "DPMPP_2M", "--no-progress"])
    assert code == 0 and (tmp_path / "o-0.png").is_file()
    assert PIL.Image.open(grid).size == (3 * (128 + 2) + 2, 2 * (128 + 2) + 2)
