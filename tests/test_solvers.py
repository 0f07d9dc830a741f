"""The new decoder solvers against the reference library's schedulers, run in a correct loop.

Each reference scheduler is built ``from_config`` on the decoder's scheduler_config.json and run as
a correct pipeline would: model input through ``scale_model_input``, ``step`` with the generator,
img2img as ``timesteps[t_start * order:]`` + ``set_begin_index`` + ``add_noise``, inpainting as a
blend with ``add_noise`` at the next timestep after each step. The model is a fake one: a fixed
function of its input and its timestep, 8 output channels of which the first 4 are epsilon (as the
decoder UNet). Every sample after every sampler step, every model call (timestep, input) and the
generator states after the run are compared.
"""
from __future__ import annotations

import inspect
import json

import diffusers
import numpy as np
import pytest
import torch

from kandinsky.sampling.samplers import Guided, get_sampler, make_plan, sample, sampler_names
from kandinsky.sampling.solvers import make_multistep_plan, make_sigma_plan
from kandinsky.schedulers import Scheduler
from tests.conftest import DATA
from tests.helpers import assert_close, rel_err

DECODER_DIR = DATA / "kandinsky-2-2-decoder" / "scheduler"
DECODER_CFG = json.loads((DECODER_DIR / "scheduler_config.json").read_text())
SHAPE = (3, 4, 8, 8)  # (B, 4, H/8, W/8)

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
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def schedule():
    return Scheduler.from_folder(DECODER_DIR)


def reference_scheduler(name: str, **config):
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


def make_generator(kind, batch, device="cpu"):
    if kind == "list":
        return [torch.Generator(device).manual_seed(10 + i) for i in range(batch)]
    return torch.Generator(device).manual_seed(10)


def generator_tail(generator):
    """One more draw after the run: equal iff the generator states are."""
    gens = generator if isinstance(generator, list) else [generator]
    return torch.cat([torch.rand(4, generator=g, device=g.device) for g in gens])


def inputs(shape=SHAPE, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(1234)
    x_T, x0, noise = (torch.randn(shape, generator=g) for _ in range(3))
    keep = (torch.rand(shape[:1] + (1,) + shape[2:], generator=g) > 0.5).float()  # (B, 1, h, w)
    return [v.to(device, dtype) for v in (x_T, x0, noise, keep)]


def level_timesteps(sched) -> torch.Tensor:
    """The reference's timestep per sampler step (Heun repeats each but the first)."""
    t = sched.timesteps
    return torch.cat([t[:1], t[1::2]]) if sched.order == 2 else t


def reference_loop(name, n, *, x_T, x0, noise, keep, generator, tail=None, blend=False, scale_input=True):
    """The reference scheduler in a correct loop; the sample after every sampler step."""
    sched = reference_scheduler(name)
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
    g_ref, g_ours = make_generator(generator_kind, SHAPE[0]), make_generator(generator_kind, SHAPE[0])
    ref, ref_calls = reference_loop(name, n, generator=g_ref, **common)
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
        ref = reference_scheduler(name)
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
        ref = reference_scheduler(name, timestep_spacing=spacing)
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
        assert reference_scheduler(name).config.timestep_spacing == "linspace"


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
    exact, _ = reference_loop(name, 10, x_T=x_T, x0=x0, noise=noise, keep=keep, generator=make_generator("cpu", 3))
    half = dict(zip(("x_T", "x0", "noise", "keep"), (v.to(dtype) for v in (x_T, x0, noise, keep))))
    g_ref, g_ours = make_generator("cpu", 3), make_generator("cpu", 3)
    ref, _ = reference_loop(name, 10, generator=g_ref, **half)
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
        sched = reference_scheduler("euler")
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
