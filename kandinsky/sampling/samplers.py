"""Samplers as pure functions over tensors (k-diffusion's shape).

    plan = make_plan("dpmpp_2m", schedule, num_inference_steps=20)     # the noise levels visited
    x = randn(shape, generator) * plan.init_noise_sigma
    x = sample("dpmpp_2m", denoiser, x, plan, generator=generator, callback=cb)

A *denoiser* is a callable ``denoiser(x, t, step) -> Guided`` (see denoisers.py): it owns the
model, classifier-free guidance and the task inputs; ``x`` is the sample as the model sees it
(variance-preserving x_t) and ``t`` the model's timestep. Samplers know nothing of guidance or
tasks: they turn model outputs into the next sample, with the few shared formulas below.

A *plan* holds the timesteps (and sigmas) of one run, in the reference scheduler's exact
spacing, and where the run begins (img2img and emb2emb run the tail of a plan). Its
``space`` says what x is between steps:
  "vp"     x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps   (DDPM, DDIM, UnCLIP, DPM-Solver++, UniPC)
  "sigma"  x = x_0 + sigma eps, fed to the model as x / sqrt(sigma^2 + 1)   (Euler, Euler ancestral, Heun)

After every sampler step the callback receives a :class:`StepState`; a tensor it returns
replaces x (the inpainting blend is such a callback, run before the user's).

Names (Python ``scheduler=``, CLI ``--scheduler``) are the keys of :data:`SAMPLERS`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from kandinsky.sampling.state import StepState
from kandinsky.schedulers.common import randn
from kandinsky.schedulers.ddpm import leading_timesteps
from kandinsky.schedulers.unclip import unclip_timesteps

from kandinsky.sampling.formulas import (  # noqa: E402  the formulas every sampler shares
    eps_from_x0,
    posterior_mean,
    posterior_variance,
    sigma_from_alpha_bar,
    x0_from_eps,
)

# ---------------------------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """The noise levels of one sampling run (built by :func:`make_plan`)."""

    sampler: str
    schedule: object  # the schedule (noise tables + config) it was made from
    timesteps: torch.Tensor  # (n,) the model timestep of each step (CPU; long, or float for sigma samplers)
    prev_timesteps: list[int] | None = None  # discrete samplers: the level each step lands on (-1: clean)
    sigmas: torch.Tensor | None = None  # (n + 1,) float32 for sigma samplers, ending at 0
    space: str = "vp"  # "vp" or "sigma" (module doc)
    begin: int = 0  # first step run (img2img: the tail of the plan)
    init_noise_sigma: float = 1.0  # x_T ~ N(0, init_noise_sigma^2) when starting from noise
    extra: dict = field(default_factory=dict)  # sampler-specific precomputed tables

    @property
    def num_steps(self) -> int:
        """Sampler steps in the whole plan (the run does ``num_steps - begin`` of them)."""
        return len(self.timesteps)

    def tail(self, steps: int) -> "Plan":
        """The same plan run for its last ``steps`` steps only (img2img with strength < 1)."""
        if not 1 <= steps <= self.num_steps:
            raise ValueError(f"a plan of {self.num_steps} steps has no tail of {steps}.")
        return replace(self, begin=self.num_steps - steps)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, index: int | None = None) -> torch.Tensor:
        """x_0 noised to the level the sampler is at before step ``index`` (default: the first step
        run); ``index == num_steps`` is the clean end. In the plan's space, computed in x0's dtype."""
        index = self.begin if index is None else index
        if index >= self.num_steps:
            return x0
        if self.space == "sigma" or "add_noise_sigma" in self.extra:
            sigma = self.sigmas[index].to(x0.device, x0.dtype)
            if self.space == "sigma":
                return x0 + noise * sigma
            alpha_t = (sigma**2 + 1) ** -0.5  # a VP level given by its sigma (DPM-Solver++, UniPC)
            return alpha_t * x0 + sigma * alpha_t * noise
        t = self.timesteps[index : index + 1].repeat(x0.shape[0])
        return self.schedule.add_noise(x0, noise, t)

    def model_input(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """What the model sees at step ``index``: x itself, or x / sqrt(sigma^2 + 1) in sigma space."""
        if self.space == "sigma":
            return x / ((self.sigmas[index] ** 2 + 1) ** 0.5)
        return x


@dataclass
class Guided:
    """A denoiser's answer: the guided model output, and the branches when guidance ran."""

    output: torch.Tensor
    uncond: torch.Tensor | None = None
    cond: torch.Tensor | None = None


Denoiser = Callable[[torch.Tensor, torch.Tensor, int], Guided]
Callback = Callable[[StepState], "torch.Tensor | None"]


def _run_callback(callback, state: StepState) -> torch.Tensor:
    """The callback's replacement x (checked), or the state's x."""
    if callback is None:
        return state.x
    out = callback(state)
    if out is None:
        return state.x
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"a step callback must return None or a tensor (the replacement x), got {type(out).__name__}."
        )
    if out.shape != state.x.shape:
        raise ValueError(f"the step callback returned x of shape {tuple(out.shape)}, expected {tuple(state.x.shape)}.")
    return out.to(state.x.device, state.x.dtype)


def _state(denoiser, plan: Plan, i: int, x, x0, guided: Guided, sigma=None) -> StepState:
    return StepState(
        stage=getattr(denoiser, "stage", "decoder"),
        step=i - plan.begin,
        timestep=float(plan.timesteps[i]),
        x=x,
        x0=x0,
        model_output=guided.output,
        uncond=guided.uncond,
        cond=guided.cond,
        sigma=sigma,
        num_steps=plan.num_steps - plan.begin,
    )


def check_finite(x: torch.Tensor, stage: str, step: int) -> None:
    """Stop a run whose sample became NaN or inf (e.g. fp16 overflow) instead of painting black."""
    if not torch.isfinite(x).all():
        raise FloatingPointError(
            f"the {stage} sample became non-finite (NaN or inf) at step {step}: in float16 this is usually an "
            "overflow; run in bfloat16 or float32 (--dtype bf16 / fp32), or lower the guidance scale."
        )


# ---------------------------------------------------------------------------------------------
# Discrete-time ancestral and DDIM samplers (bit-identical to the reference schedulers)
# ---------------------------------------------------------------------------------------------


def _alpha_bar(schedule, t: int, final: torch.Tensor) -> torch.Tensor:
    return schedule.alphas_cumprod[t] if t >= 0 else final


def _x0(plan: Plan, out: torch.Tensor, x: torch.Tensor, alpha_bar) -> torch.Tensor:
    """The clean estimate from the model output (clipped when the schedule says so)."""
    config = plan.schedule.config
    pred_x0 = out if config.prediction_type == "sample" else x0_from_eps(x, out, alpha_bar)
    if config.clip_sample:
        r = config.clip_sample_range
        pred_x0 = pred_x0.clamp(-r, r)
    return pred_x0


def sample_ddpm(denoiser: Denoiser, x, plan: Plan, generator=None, callback: Callback | None = None):
    """Ancestral sampling (Ho et al. 2020) over the plan's timesteps, "fixed_small" variance.

    Covers the decoder's DDPM and the prior's UnCLIP (whose one difference, the exact
    betas on t -> t - 1 jumps and a log-space standard deviation, is in ``plan.extra``)."""
    sched = plan.schedule
    unclip = plan.sampler == "unclip"
    for i in range(plan.begin, plan.num_steps):
        t, prev_t = int(plan.timesteps[i]), plan.prev_timesteps[i]
        guided = denoiser(x, plan.timesteps[i], i - plan.begin)
        out = guided.output
        alpha_bar_t = _alpha_bar(sched, t, sched.one)
        alpha_bar_prev = _alpha_bar(sched, prev_t, sched.one)
        if unclip and prev_t == t - 1:
            beta, alpha = sched.betas[t], sched.alphas[t]
        elif unclip:
            beta = 1 - alpha_bar_t / alpha_bar_prev
            alpha = 1 - beta
        else:
            alpha = alpha_bar_t / alpha_bar_prev
            beta = 1 - alpha
        pred_x0 = _x0(plan, out, x, alpha_bar_t)
        prev = posterior_mean(pred_x0, x, alpha_bar_t, alpha_bar_prev, beta, alpha)
        if t > 0:
            noise = randn(out.shape, generator, out.device, out.dtype)
            variance = posterior_variance(alpha_bar_t, alpha_bar_prev, beta)
            if unclip:
                std = torch.exp(0.5 * torch.log(torch.clamp(variance, min=1e-20)))
            else:
                std = torch.clamp(variance, min=1e-20) ** 0.5
            prev = prev + std * noise
        x = _run_callback(callback, _state(denoiser, plan, i, prev, pred_x0, guided))
    return x


def sample_ddim(denoiser: Denoiser, x, plan: Plan, generator=None, callback: Callback | None = None, eta: float = 0.0):
    """DDIM (Song et al. 2020, eq. 12); eta = 0 draws no noise."""
    sched = plan.schedule
    final = sched.final_alpha_cumprod
    for i in range(plan.begin, plan.num_steps):
        t, prev_t = int(plan.timesteps[i]), plan.prev_timesteps[i]
        guided = denoiser(x, plan.timesteps[i], i - plan.begin)
        out = guided.output
        alpha_bar_t = _alpha_bar(sched, t, final)
        alpha_bar_prev = _alpha_bar(sched, prev_t, final)
        pred_x0 = _x0(plan, out, x, alpha_bar_t)
        # sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))   (eq. 16)
        variance = ((1 - alpha_bar_prev) / (1 - alpha_bar_t)) * (1 - alpha_bar_t / alpha_bar_prev)
        std = eta * variance**0.5
        # x_prev = sqrt(a_prev) x_0 + sqrt(1 - a_prev - sigma_t^2) eps + sigma_t noise
        prev = alpha_bar_prev**0.5 * pred_x0 + (1 - alpha_bar_prev - std**2) ** 0.5 * out
        if eta > 0:
            prev = prev + std * randn(out.shape, generator, out.device, out.dtype)
        x = _run_callback(callback, _state(denoiser, plan, i, prev, pred_x0, guided))
    return x


def _discrete_plan(name: str, schedule, num_inference_steps: int, device=None) -> Plan:
    """DDPM / DDIM / UnCLIP: the reference's timesteps (computed here; the schedule object is not
    touched); each step lands on the next one (DDIM: t - T // n, the reference's rule)."""
    config = schedule.config
    if name == "unclip":
        ts = unclip_timesteps(config.num_train_timesteps, num_inference_steps)
    else:
        ts = leading_timesteps(config.num_train_timesteps, num_inference_steps, config.steps_offset)
    timesteps = torch.tensor(ts, dtype=torch.long)
    if name == "ddim":
        ratio = schedule.config.num_train_timesteps // num_inference_steps
        prev = [t - ratio for t in ts]
    else:
        prev = ts[1:] + [-1]
    return Plan(name, schedule, timesteps, prev_timesteps=prev, init_noise_sigma=1.0)


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler: its function, how a plan is made, and what the step count means."""

    name: str
    fn: Callable
    make_plan: Callable
    evals_per_step: str  # what "num_inference_steps" counts (docs)
    summary: str
    stages: tuple[str, ...] = ("decoder",)


SAMPLERS: dict[str, SamplerSpec] = {
    "unclip": SamplerSpec("unclip", sample_ddpm, _discrete_plan, "1 model evaluation per step",
                          "the prior's ancestral sampler (Karlo unCLIP)", stages=("prior",)),
    "ddpm": SamplerSpec("ddpm", sample_ddpm, _discrete_plan, "1 model evaluation per step",
                        "ancestral DDPM, the decoder checkpoint's own sampler"),
    "ddim": SamplerSpec("ddim", sample_ddim, _discrete_plan, "1 model evaluation per step",
                        "deterministic DDIM (eta = 0)"),
}


def register(spec: SamplerSpec) -> SamplerSpec:
    SAMPLERS[spec.name] = spec
    return spec


def sampler_names(stage: str = "decoder") -> list[str]:
    return [name for name, spec in SAMPLERS.items() if stage in spec.stages]


def get_sampler(name) -> SamplerSpec:
    """The sampler called ``name`` (case-insensitive; '-' and '_' alike)."""
    if isinstance(name, str):
        key = name.strip().lower().replace("-", "_")
        key = {"dpm++_2m": "dpmpp_2m", "dpm++_2m_karras": "dpmpp_2m_karras", "euler_ancestral": "euler_a",
               "unipc_bh2": "unipc"}.get(key, key)
        if key in SAMPLERS:
            return SAMPLERS[key]
    raise ValueError(f"unknown sampler {name!r}: choose one of {', '.join(sampler_names())}.")


def make_plan(name: str, schedule, num_inference_steps: int, device=None) -> Plan:
    """The plan of sampler ``name`` for ``num_inference_steps`` steps over ``schedule``."""
    spec = get_sampler(name)
    return spec.make_plan(spec.name, schedule, int(num_inference_steps), device)


def sample(name: str, denoiser: Denoiser, x, plan: Plan, generator=None, callback: Callback | None = None):
    """Run sampler ``name`` from ``x`` over ``plan`` (from ``plan.begin``)."""
    return get_sampler(name).fn(denoiser, x, plan, generator=generator, callback=callback)


# The newer solvers (DPM-Solver++, UniPC, Euler, Euler ancestral, Heun) register themselves here.
from kandinsky.sampling import solvers as _solvers  # noqa: E402,F401
