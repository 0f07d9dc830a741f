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

from dataclasses import dataclass
from typing import Callable

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
    """One sampler: its function, how a plan is made, and what the step count means."""

    name: str
    fn: Callable  # fn(denoiser, x, plan, generator=None, callback=None) -> x_0
    make_plan: Callable  # make_plan(name, schedule, num_inference_steps) -> Plan
    evals_per_step: str  # what "num_inference_steps" counts (docs)
    summary: str
    stages: tuple[str, ...] = ("decoder",)


ONE_EVAL = "1 model evaluation per step: num_inference_steps = model evaluations"

SAMPLERS: dict[str, SamplerSpec] = {spec.name: spec for spec in (
    SamplerSpec("unclip", sample_unclip, unclip_plan, "1 model evaluation per step",
                "the prior's ancestral sampler (Karlo unCLIP)", stages=("prior",)),
    SamplerSpec("ddpm", sample_ddpm, ddpm_plan, "1 model evaluation per step",
                "ancestral DDPM, the decoder checkpoint's own sampler"),
    SamplerSpec("ddim", sample_ddim, ddim_plan, "1 model evaluation per step",
                "deterministic DDIM (eta = 0)"),
    SamplerSpec("dpmpp_2m", sample_dpmpp_2m, make_multistep_plan, ONE_EVAL,
                "DPM-Solver++(2M), deterministic, second order from the previous step's prediction"),
    SamplerSpec("dpmpp_2m_karras", sample_dpmpp_2m, make_karras_plan, ONE_EVAL,
                "DPM-Solver++(2M) on Karras et al.'s noise levels (denser near the clean end)"),
    SamplerSpec("unipc", sample_unipc, make_multistep_plan, ONE_EVAL + " (the corrector reuses them)",
                "UniPC bh2: DPM-Solver++(2M) predictor plus a free corrector, deterministic"),
    SamplerSpec("euler", sample_euler, make_sigma_plan, ONE_EVAL,
                "Euler on the probability-flow ODE in sigma space, deterministic"),
    SamplerSpec("euler_a", sample_euler_ancestral, make_sigma_plan, ONE_EVAL + "; fresh noise every step",
                "Euler ancestral: an Euler step down, then fresh noise (stochastic)"),
    SamplerSpec("heun", sample_heun, make_sigma_plan,
                "2 model evaluations per step except the last (1): num_inference_steps = n noise levels "
                "costs 2n - 1 evaluations, as the reference's HeunDiscreteScheduler",
                "Heun's second-order method in sigma space, deterministic"),
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
    """The plan of sampler ``name`` for ``num_inference_steps`` steps over ``schedule``."""
    spec = get_sampler(name)
    return spec.make_plan(spec.name, schedule, int(num_inference_steps))


def sample(name: str, denoiser: Denoiser, x, plan: Plan, generator=None, callback: Callback | None = None):
    """Run sampler ``name`` from ``x`` over ``plan`` (from ``plan.begin``)."""
    return get_sampler(name).fn(denoiser, x, plan, generator=generator, callback=callback)
