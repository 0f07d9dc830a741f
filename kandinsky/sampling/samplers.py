"""Samplers: the one list of them, and the two calls that run one (k-diffusion's shape).

    plan = make_plan("dpmpp_2m", schedule, num_inference_steps=20)     # the noise levels visited
    x = randn(shape, generator) * plan.init_noise_sigma
    x = sample("dpmpp_2m", denoiser, x, plan, generator=generator, callback=cb)

Each sampler is a pure function over tensors: discrete.py (UnCLIP, DDPM, DDIM, bit-identical to
the reference's schedulers) and solvers.py (DPM-Solver++, UniPC, Euler, Euler ancestral, Heun).
A *denoiser* ``denoiser(x, t, step) -> Guided`` owns the model, classifier-free guidance and the
task inputs (denoisers.py); samplers turn its outputs into the next sample. The plan, the
denoiser's answer and the callback are in plan.py; the noise schedule in schedule.py.

Names (Python ``scheduler=``, CLI ``--scheduler``) are the keys of :data:`SAMPLERS`, case-insensitive,
with '-' and '_' alike, plus the aliases in :data:`ALIASES`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

from kandinsky.callsite import user_stacklevel

from kandinsky.sampling.discrete import ddim_plan, ddpm_plan, sample_ddim, sample_ddpm, sample_unclip, unclip_plan
from kandinsky.sampling.plan import Callback, Denoiser, Guided, Plan
from kandinsky.sampling.schedule import NoiseSchedule
from kandinsky.sampling.solvers import (
    make_karras_plan,
    make_multistep_plan,
    make_sigma_plan,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_unipc,
)

__all__ = ["SAMPLERS", "ALIASES", "SamplerSpec", "Plan", "Guided", "get_sampler", "make_plan", "sample",
           "sampler_names"]


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler: its function, how a plan is made, what the step count means, and the fewest steps
    that give a usable picture (fewer warn: :func:`make_plan`)."""

    name: str
    fn: Callable  # fn(denoiser, x, plan, generator=None, callback=None) -> x_0
    make_plan: Callable  # make_plan(name, schedule, num_inference_steps) -> Plan
    evals_per_step: str  # what "num_inference_steps" counts (docs)
    summary: str
    min_steps: int  # fewer warn; measured on the shapes model: benchmarks/min_steps.py (docs/usage.md, Samplers)
    stages: tuple[str, ...] = ("decoder",)


ONE_EVAL = "1 model evaluation per step: num_inference_steps = model evaluations"

SAMPLERS: dict[str, SamplerSpec] = {spec.name: spec for spec in (
    SamplerSpec("unclip", sample_unclip, unclip_plan, "1 model evaluation per step",
                "the prior's ancestral sampler (Karlo unCLIP)", min_steps=2, stages=("prior",)),
    SamplerSpec("ddpm", sample_ddpm, ddpm_plan, "1 model evaluation per step",
                "ancestral DDPM, the decoder checkpoint's own sampler", min_steps=8),
    SamplerSpec("ddim", sample_ddim, ddim_plan, "1 model evaluation per step",
                "deterministic DDIM (eta = 0)", min_steps=8),
    SamplerSpec("dpmpp_2m", sample_dpmpp_2m, make_multistep_plan, ONE_EVAL,
                "DPM-Solver++(2M), deterministic, second order from the previous step's prediction",
                min_steps=8),
    SamplerSpec("dpmpp_2m_karras", sample_dpmpp_2m, make_karras_plan, ONE_EVAL,
                "DPM-Solver++(2M) on Karras et al.'s noise levels (denser near the clean end)",
                min_steps=10),
    SamplerSpec("unipc", sample_unipc, make_multistep_plan, ONE_EVAL + " (the corrector reuses them)",
                "UniPC bh2: DPM-Solver++(2M) predictor plus a free corrector, deterministic", min_steps=15),
    SamplerSpec("euler", sample_euler, make_sigma_plan, ONE_EVAL,
                "Euler on the probability-flow ODE in sigma space, deterministic", min_steps=8),
    SamplerSpec("euler_a", sample_euler_ancestral, make_sigma_plan, ONE_EVAL + "; fresh noise every step",
                "Euler ancestral: an Euler step down, then fresh noise (stochastic)", min_steps=10),
    SamplerSpec("heun", sample_heun, make_sigma_plan,
                "2 model evaluations per step except the last (1): num_inference_steps = n noise levels "
                "costs 2n - 1 evaluations, as the reference's HeunDiscreteScheduler",
                "Heun's second-order method in sigma space, deterministic", min_steps=10),
)}

# Other spellings of a name (after lower-casing and '-' -> '_').
ALIASES = {"dpm++_2m": "dpmpp_2m", "dpm++_2m_karras": "dpmpp_2m_karras", "euler_ancestral": "euler_a",
           "unipc_bh2": "unipc"}


def sampler_names(stage: str = "decoder") -> list[str]:
    return [name for name, spec in SAMPLERS.items() if stage in spec.stages]


def get_sampler(name) -> SamplerSpec:
    """The sampler called ``name`` (case-insensitive; '-' and '_' alike)."""
    if isinstance(name, str):
        key = name.strip().lower().replace("-", "_")
        key = ALIASES.get(key, key)
        if key in SAMPLERS:
            return SAMPLERS[key]
    raise ValueError(f"unknown sampler {name!r}: choose one of {', '.join(sampler_names())}.")


def make_plan(name: str, schedule: NoiseSchedule, num_inference_steps: int) -> Plan:
    """The plan of sampler ``name`` for ``num_inference_steps`` steps over ``schedule``; fewer steps than the
    sampler's ``min_steps`` warn."""
    spec = get_sampler(name)
    check_steps(spec, num_inference_steps)
    return spec.make_plan(spec.name, schedule, int(num_inference_steps))


def check_steps(spec: SamplerSpec, num_inference_steps: int) -> None:
    """Warn when ``num_inference_steps`` is below the sampler's measured minimum for a usable picture."""
    if num_inference_steps < spec.min_steps:
        stage = "the prior" if spec.stages == ("prior",) else "the decoder"
        warnings.warn(
            f"{num_inference_steps} steps of {spec.name} are too few for a usable picture from {stage}: "
            f"{spec.name} needs at least {spec.min_steps} (docs/usage.md, Samplers: measured on the shapes "
            f"model). Expect a blurred or noisy result; use {spec.min_steps} or more steps.",
            stacklevel=user_stacklevel())


def sample(name: str, denoiser: Denoiser, x, plan: Plan, generator=None, callback: Callback | None = None):
    """Run sampler ``name`` from ``x`` over ``plan`` (from ``plan.begin``)."""
    return get_sampler(name).fn(denoiser, x, plan, generator=generator, callback=callback)
