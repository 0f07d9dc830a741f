"""The three discrete-time samplers, bit-identical to the reference's schedulers (k-diffusion's shape:
one function per sampler, a plan maker each).

    sample_unclip   the prior's: Karlo's unCLIP ancestral sampler (the reference's UnCLIPScheduler)
    sample_ddpm     the decoder checkpoint's own: DDPM ancestral sampling (Ho et al. 2020)
    sample_ddim     DDIM (Song et al. 2020), deterministic with eta = 0

All three step x_t -> x_prev between the plan's timesteps (``prev_timesteps[i]``; -1 is the clean
end) with the schedule's alpha_bar; the ancestral two add the posterior's noise (none on the last
step). Notation and formulas: schedule.py.
"""
from __future__ import annotations

import torch

from kandinsky.sampling.plan import Callback, Denoiser, Plan, noise_like, run_callback, step_state
from kandinsky.sampling.schedule import (
    NoiseSchedule,
    leading_timesteps,
    posterior_mean,
    posterior_variance,
    unclip_timesteps,
    x0_from_eps,
)

# ---------------------------------------------------------------------------------------------
# Plans: the reference's timesteps, and where each step lands
# ---------------------------------------------------------------------------------------------


def unclip_plan(name: str, schedule: NoiseSchedule, num_inference_steps: int) -> Plan:
    """UnCLIP spacing (both ends included); each step lands on the next timestep, the last on -1."""
    ts = unclip_timesteps(schedule.num_train_timesteps, num_inference_steps)
    return Plan(schedule, torch.tensor(ts, dtype=torch.long), prev_timesteps=ts[1:] + [-1])


def ddpm_plan(name: str, schedule: NoiseSchedule, num_inference_steps: int) -> Plan:
    """"leading" spacing; each step lands on the next timestep, the last on -1."""
    ts = leading_timesteps(schedule.num_train_timesteps, num_inference_steps, schedule.config.steps_offset)
    return Plan(schedule, torch.tensor(ts, dtype=torch.long), prev_timesteps=ts[1:] + [-1])


def ddim_plan(name: str, schedule: NoiseSchedule, num_inference_steps: int) -> Plan:
    """"leading" spacing; each step lands on t - T // n (the reference's rule)."""
    T = schedule.num_train_timesteps
    ts = leading_timesteps(T, num_inference_steps, schedule.config.steps_offset)
    ratio = T // num_inference_steps
    return Plan(schedule, torch.tensor(ts, dtype=torch.long), prev_timesteps=[t - ratio for t in ts])


# ---------------------------------------------------------------------------------------------
# Shared steps
# ---------------------------------------------------------------------------------------------


def jump(plan: Plan, i: int, final=None):
    """Step i's jump t -> prev_t and the alpha_bar of both (prev_t = -1: ``final``, default 1)."""
    t, prev_t = int(plan.timesteps[i]), plan.prev_timesteps[i]
    return t, prev_t, plan.schedule.alpha_bar(t, final), plan.schedule.alpha_bar(prev_t, final)


def predicted_x0(schedule: NoiseSchedule, out: torch.Tensor, x: torch.Tensor, alpha_bar) -> torch.Tensor:
    """The clean estimate from the model output (as the config's prediction_type says), clipped
    to +-clip_sample_range when the config says so."""
    config = schedule.config
    pred_x0 = out if config.prediction_type == "sample" else x0_from_eps(x, out, alpha_bar)
    if config.clip_sample:
        r = config.clip_sample_range
        pred_x0 = pred_x0.clamp(-r, r)
    return pred_x0


def ancestral_step(x, pred_x0, t: int, alpha_bar_t, alpha_bar_prev, beta, alpha, std_of, out, generator):
    """x_prev ~ q(x_prev | x_t, x_0 = pred_x0): the posterior mean, plus noise of std
    ``std_of(posterior variance)`` unless t = 0 (the step to x_0 draws nothing)."""
    x_prev = posterior_mean(pred_x0, x, alpha_bar_t, alpha_bar_prev, beta, alpha)
    if t > 0:
        variance = posterior_variance(alpha_bar_t, alpha_bar_prev, beta)
        x_prev = x_prev + std_of(variance) * noise_like(out, generator)
    return x_prev


def _std_fixed_small(variance: torch.Tensor) -> torch.Tensor:
    """DDPM's "fixed_small": sqrt(max(var, 1e-20))."""
    return torch.clamp(variance, min=1e-20) ** 0.5


def _std_fixed_small_log(variance: torch.Tensor) -> torch.Tensor:
    """UnCLIP's "fixed_small_log": exp(log(max(var, 1e-20)) / 2) (same value, the reference's rounding)."""
    return torch.exp(0.5 * torch.log(torch.clamp(variance, min=1e-20)))


# ---------------------------------------------------------------------------------------------
# The samplers
# ---------------------------------------------------------------------------------------------


def sample_unclip(denoiser: Denoiser, x, plan: Plan, generator=None, callback: Callback | None = None):
    """The prior's ancestral sampler: cosine betas; a t -> t - 1 jump uses the table's beta_t, a
    longer jump re-derives its beta from alpha_bar (1 - beta = alpha_bar_t / alpha_bar_prev)."""
    schedule = plan.schedule
    for i in range(plan.begin, plan.num_steps):
        guided = denoiser(x, plan.timesteps[i], i - plan.begin)
        t, prev_t, alpha_bar_t, alpha_bar_prev = jump(plan, i)
        if prev_t == t - 1:
            beta, alpha = schedule.betas[t], schedule.alphas[t]
        else:
            beta = 1 - alpha_bar_t / alpha_bar_prev
            alpha = 1 - beta
        pred_x0 = predicted_x0(schedule, guided.output, x, alpha_bar_t)
        x_prev = ancestral_step(x, pred_x0, t, alpha_bar_t, alpha_bar_prev, beta, alpha, _std_fixed_small_log,
                                guided.output, generator)
        x = run_callback(callback, step_state(denoiser, plan, i, x_prev, pred_x0, guided))
    return x


def sample_ddpm(denoiser: Denoiser, x, plan: Plan, generator=None, callback: Callback | None = None):
    """Ancestral DDPM over the plan's timesteps, "fixed_small" variance; the jump t -> prev_t has
    alpha = alpha_bar_t / alpha_bar_prev."""
    schedule = plan.schedule
    for i in range(plan.begin, plan.num_steps):
        guided = denoiser(x, plan.timesteps[i], i - plan.begin)
        t, _, alpha_bar_t, alpha_bar_prev = jump(plan, i)
        alpha = alpha_bar_t / alpha_bar_prev
        beta = 1 - alpha
        pred_x0 = predicted_x0(schedule, guided.output, x, alpha_bar_t)
        x_prev = ancestral_step(x, pred_x0, t, alpha_bar_t, alpha_bar_prev, beta, alpha, _std_fixed_small,
                                guided.output, generator)
        x = run_callback(callback, step_state(denoiser, plan, i, x_prev, pred_x0, guided))
    return x


def sample_ddim(denoiser: Denoiser, x, plan: Plan, generator=None, callback: Callback | None = None,
                eta: float = 0.0):
    """DDIM (Song et al. 2020, eq. 12); eta = 0 draws no noise. The last step lands on the
    schedule's ``final_alpha_cumprod`` (1, or alpha_bar_0 with set_alpha_to_one=False)."""
    schedule = plan.schedule
    for i in range(plan.begin, plan.num_steps):
        guided = denoiser(x, plan.timesteps[i], i - plan.begin)
        out = guided.output
        _, _, alpha_bar_t, alpha_bar_prev = jump(plan, i, final=schedule.final_alpha_cumprod)
        pred_x0 = predicted_x0(schedule, out, x, alpha_bar_t)
        # sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))   (eq. 16)
        variance = ((1 - alpha_bar_prev) / (1 - alpha_bar_t)) * (1 - alpha_bar_t / alpha_bar_prev)
        std = eta * variance**0.5
        # x_prev = sqrt(a_prev) x_0 + sqrt(1 - a_prev - sigma_t^2) eps + sigma_t noise
        x_prev = alpha_bar_prev**0.5 * pred_x0 + (1 - alpha_bar_prev - std**2) ** 0.5 * out
        if eta > 0:
            x_prev = x_prev + std * noise_like(out, generator)
        x = run_callback(callback, step_state(denoiser, plan, i, x_prev, pred_x0, guided))
    return x
