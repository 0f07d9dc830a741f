"""The newer decoder solvers: DPM-Solver++ 2M (+ Karras sigmas), UniPC (bh2), Euler, Euler ancestral, Heun.

Each is a pure function (listed in ``kandinsky.sampling.samplers.SAMPLERS``) equal to the
reference library's scheduler of the same name built ``from_config`` on the decoder's
``scheduler_config.json`` and run in a correct loop (model input scaled by
``scale_model_input``). k-diffusion's sampling.py is the model for the shape of the code.

Notation. A noise level is given by its noise-to-signal ratio s = sqrt((1 - alpha_bar) / alpha_bar)
(``plan.sigmas``, ending at 0). Two ways to hold the sample at level s:

  "vp"     x = alpha x_0 + sigma eps,  alpha = 1 / sqrt(1 + s^2),  sigma = s alpha   (DPM-Solver++, UniPC)
  "sigma"  x = x_0 + s eps, the model sees x / sqrt(1 + s^2)                         (Euler, Euler a, Heun)

and lambda = log(alpha / sigma) = -log s, the log signal-to-noise ratio (half of it).

The exponential-integrator step shared by DPM-Solver++ and UniPC (DDIM written in s): from
level s to level s' with a data prediction d,

    x' = (sigma' / sigma) x + alpha' (1 - s' / s) d          (1 - s'/s = 1 - e^{-h}, h = lambda' - lambda)

The solvers differ only in the d they plug in.

Timestep spacing. Kandinsky 2.2's scheduler_config.json names no ``timestep_spacing``, so the
reference's ``from_config`` gives every scheduler here its own default, "linspace" (the DDPM
checkpoint sampler's "leading" is DDPM's default, not these). The plan makers take
``timestep_spacing=`` for the other two ("leading", "trailing"); the spacings themselves are
in schedule.py.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from kandinsky.sampling.plan import Plan, noise_like, run_callback, step_state
from kandinsky.sampling.schedule import (
    DEFAULT_SPACING,
    SPACINGS,
    NoiseSchedule,
    karras_sigmas,
    multistep_timesteps,
    sigma_space_timesteps,
    sigmas_at,
    timestep_of_sigma,
)

# ---------------------------------------------------------------------------------------------
# Plans: which timesteps, which sigmas
# ---------------------------------------------------------------------------------------------


def _check_args(name: str, schedule: NoiseSchedule, n: int, spacing: str) -> int:
    T = schedule.num_train_timesteps
    if not isinstance(n, int) or not 1 <= n <= T:
        raise ValueError(f"{name}: num_inference_steps={n!r} must be an integer between 1 and {T}.")
    if spacing not in SPACINGS:
        raise ValueError(f"{name}: timestep_spacing={spacing!r} must be one of {', '.join(SPACINGS)}.")
    if schedule.prediction_type != "epsilon":
        raise ValueError(
            f"{name}: the schedule's prediction_type={schedule.prediction_type!r} is not supported; "
            "these solvers take an epsilon-predicting model (Kandinsky 2.2's decoder)."
        )
    return T


def _with_final_zero(sigmas: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))  # (n + 1,)


def make_multistep_plan(name: str, schedule: NoiseSchedule, num_inference_steps: int, *,
                        karras: bool = False, timestep_spacing: str = DEFAULT_SPACING) -> Plan:
    """DPM-Solver++ / UniPC: integer timesteps; with ``karras`` the levels are Karras sigmas and
    each timestep is the nearest integer to the sigma's fractional timestep (the model is asked
    at that rounded timestep, the solver keeps the exact sigma)."""
    T = _check_args(name, schedule, num_inference_steps, timestep_spacing)
    cfg, table = schedule.config, schedule.sigma_table()
    if karras:
        sigmas = karras_sigmas(table[0].item(), table[-1].item(), num_inference_steps)
        timesteps = timestep_of_sigma(sigmas, table)
        if cfg.beta_schedule != "squaredcos_cap_v2":  # as the reference: the cosine schedule keeps fractions
            timesteps = timesteps.round()
        timesteps = timesteps.astype(np.int64)
    else:
        timesteps = multistep_timesteps(timestep_spacing, T, num_inference_steps, cfg.steps_offset)
        sigmas = sigmas_at(timesteps, table)
    return Plan(schedule, torch.from_numpy(timesteps), sigmas=_with_final_zero(sigmas), space="vp",
                levels="sigmas")


def make_karras_plan(name: str, schedule: NoiseSchedule, num_inference_steps: int) -> Plan:
    """DPM-Solver++ on Karras sigmas (see make_multistep_plan)."""
    return make_multistep_plan(name, schedule, num_inference_steps, karras=True)


def make_sigma_plan(name: str, schedule: NoiseSchedule, num_inference_steps: int, *,
                    timestep_spacing: str = DEFAULT_SPACING) -> Plan:
    """Euler / Euler a / Heun: float timesteps, sigmas interpolated at them, x_T ~ N(0, s_max^2)."""
    T = _check_args(name, schedule, num_inference_steps, timestep_spacing)
    timesteps = sigma_space_timesteps(timestep_spacing, T, num_inference_steps, schedule.config.steps_offset)
    sigmas = _with_final_zero(sigmas_at(timesteps, schedule.sigma_table()))
    s_max = sigmas.max()
    # "leading" starts below the top level, so its initial noise also carries the signal's unit variance
    init = s_max if timestep_spacing in ("linspace", "trailing") else (s_max**2 + 1) ** 0.5
    return Plan(schedule, torch.from_numpy(timesteps), sigmas=sigmas, space="sigma", levels="sigmas",
                init_noise_sigma=float(init))


# ---------------------------------------------------------------------------------------------
# Shared formulas
# ---------------------------------------------------------------------------------------------


def _eps(guided, x: torch.Tensor) -> torch.Tensor:
    """The model's epsilon: its first C channels (the decoder's variance channels are unused)."""
    return guided.output[:, : x.shape[1]]


def vp_alpha_sigma(s: float) -> tuple[float, float]:
    """A VP level given by its noise-to-signal ratio: alpha = 1 / sqrt(1 + s^2), sigma = s alpha."""
    alpha = 1.0 / math.sqrt(1.0 + s * s)
    return alpha, s * alpha


def vp_x0(x: torch.Tensor, eps: torch.Tensor, s: float) -> torch.Tensor:
    """x_0 = (x - sigma eps) / alpha for a VP sample at level s."""
    alpha, sigma = vp_alpha_sigma(s)
    return (x - sigma * eps) / alpha


def exp_step(x: torch.Tensor, s: float, s_next: float, d: torch.Tensor) -> torch.Tensor:
    """x' = (sigma' / sigma) x + alpha' (1 - s'/s) d: the first-order (DDIM) step of DPM-Solver++
    from level s to s' with data prediction d; s' = 0 lands on d."""
    alpha_next, sigma_next = vp_alpha_sigma(s_next)
    _, sigma = vp_alpha_sigma(s)
    return (sigma_next / sigma) * x + (alpha_next * (1.0 - s_next / s)) * d


def log_snr(s: float) -> float:
    """lambda = log(alpha / sigma) = -log s."""
    return -math.log(s)


def multistep_d(x0: torch.Tensor, x0_prev: torch.Tensor, s_prev: float, s: float, s_next: float) -> torch.Tensor:
    """The second-order data prediction of DPM-Solver++(2M) (midpoint) and of UniPC's predictor:
    d = x0 + (x0 - x0_prev) / (2 r),  r = h_prev / h  (a linear extrapolation in lambda)."""
    h = log_snr(s_next) - log_snr(s)
    h_prev = log_snr(s) - log_snr(s_prev)
    return x0 + (x0 - x0_prev) * (0.5 * h / h_prev)


def unipc_corrected_d(x0_new, x0, x0_prev, s_prev2: float | None, s_prev: float, s: float) -> torch.Tensor:
    """UniC-bh2 (Zhao et al. 2023): the data prediction that redoes the step s_prev -> s once the
    model's x0_new at s is known; x0 and x0_prev are the predictions at s_prev and s_prev2.

        d = x0 + rho_1 (x0_new - x0) + rho_0 (x0_prev - x0) / r,   r = (lambda_prev2 - lambda_prev) / h

    First order (no s_prev2): rho = (0, 1/2). Second order: [[1, 1], [r, 1]] rho = b with
    b_k = k! (-h) phi_{k+1}(-h) / B(h), B(h) = e^{-h} - 1 ("bh2"), phi_1(z) = (e^z - 1) / z,
    phi_{k+1}(z) = (phi_k(z) - 1/k!) / z.
    """
    if s_prev2 is None:
        return x0 + 0.5 * (x0_new - x0)
    h = log_snr(s) - log_snr(s_prev)
    z = -h  # the data-prediction form integrates in -lambda
    b_h = math.expm1(z)
    z_phi2 = math.expm1(z) / z - 1  # z phi_2(z)
    z_phi3 = z_phi2 / z - 0.5  # z phi_3(z)
    b1, b2 = z_phi2 / b_h, 2 * z_phi3 / b_h
    r = (log_snr(s_prev2) - log_snr(s_prev)) / h
    rho0 = (b1 - b2) / (1 - r)
    rho1 = b1 - rho0
    return x0 + rho1 * (x0_new - x0) + rho0 * ((x0_prev - x0) / r)


# ---------------------------------------------------------------------------------------------
# DPM-Solver++ (2M) and UniPC (bh2): multistep solvers on the VP sample
# ---------------------------------------------------------------------------------------------


def _order(plan: Plan, i: int) -> int:
    """Both multistep solvers (order 2, lower_order_final): first order on the first step run
    (no history yet, also after an img2img start) and on the last step (landing on s = 0)."""
    return 1 if i == plan.begin or i == plan.num_steps - 1 else 2


def sample_dpmpp_2m(denoiser, x, plan: Plan, generator=None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022), midpoint form; one model evaluation per step.

    Same dtype handling as the reference: x_0 in the sample's dtype, the update in float32, the
    new sample in the model output's dtype."""
    s = plan.sigmas.tolist()
    x0_prev = None
    for i in range(plan.begin, plan.num_steps):
        guided = denoiser(plan.model_input(x, i), plan.timesteps[i], i - plan.begin)
        eps = _eps(guided, x)
        x0 = vp_x0(x, eps, s[i])
        d = x0 if _order(plan, i) == 1 else multistep_d(x0, x0_prev, s[i - 1], s[i], s[i + 1])
        x_next = exp_step(x.float(), s[i], s[i + 1], d).to(eps.dtype)
        x0_prev = x0
        x = run_callback(callback, step_state(denoiser, plan, i, x_next, x0, guided, sigma=s[i]))
    return x


def sample_unipc(denoiser, x, plan: Plan, generator=None, callback=None):
    """UniPC (Zhao et al. 2023), bh2, order 2; one model evaluation per step.

    Each step first *corrects* the sample it arrived at (UniC: redo the previous step with the new
    data prediction, no extra model call), then *predicts* the next one (UniP, = DPM-Solver++ 2M
    for bh2). Computed in the sample's dtype, as the reference."""
    s = plan.sigmas.tolist()
    x0s: list[torch.Tensor] = []  # data predictions of the last two steps, newest last
    x_prev, order_prev = None, 0  # the (corrected) sample the previous step started from, its order
    for i in range(plan.begin, plan.num_steps):
        guided = denoiser(plan.model_input(x, i), plan.timesteps[i], i - plan.begin)
        eps = _eps(guided, x)
        x0 = vp_x0(x, eps, s[i])  # from the uncorrected sample, as the model saw it
        if x_prev is not None:  # UniC: redo the step s[i-1] -> s[i] with x0 known
            x0_prev, s_prev2 = (x0s[-2], s[i - 2]) if order_prev == 2 else (None, None)
            d = unipc_corrected_d(x0, x0s[-1], x0_prev, s_prev2, s[i - 1], s[i])
            x = exp_step(x_prev, s[i - 1], s[i], d).to(x_prev.dtype)
        x0s = (x0s + [x0])[-2:]
        order = _order(plan, i)
        d = x0 if order == 1 else multistep_d(x0, x0s[-2], s[i - 1], s[i], s[i + 1])
        x_prev, order_prev = x, order
        x_next = exp_step(x, s[i], s[i + 1], d).to(x.dtype)
        x = run_callback(callback, step_state(denoiser, plan, i, x_next, x0, guided, sigma=s[i]))
    return x


# ---------------------------------------------------------------------------------------------
# Euler, Euler ancestral, Heun: ODE / SDE solvers on x = x_0 + s eps (k-diffusion's form)
# ---------------------------------------------------------------------------------------------


def to_d(x: torch.Tensor, s: float, x0: torch.Tensor) -> torch.Tensor:
    """dx/ds = (x - x_0) / s, the probability-flow ODE in sigma space (Karras et al. 2022, eq. 4)."""
    return (x - x0) / s


def ancestral_step(s: float, s_next: float) -> tuple[float, float]:
    """Split the move s -> s' into a deterministic part down to s_down and fresh noise s_up,
    s_down^2 + s_up^2 = s'^2, with s_up the DDPM posterior's standard deviation."""
    s_up = math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
    s_down = math.sqrt(s_next**2 - s_up**2)
    return s_down, s_up


def sample_euler(denoiser, x, plan: Plan, generator=None, callback=None):
    """Euler's method on the probability-flow ODE: x' = x + d (s' - s). Update in float32."""
    s = plan.sigmas.tolist()
    for i in range(plan.begin, plan.num_steps):
        guided = denoiser(plan.model_input(x, i), plan.timesteps[i], i - plan.begin)
        eps = _eps(guided, x)
        x32 = x.float()
        x0 = x32 - s[i] * eps
        x_next = (x32 + to_d(x32, s[i], x0) * (s[i + 1] - s[i])).to(eps.dtype)
        x = run_callback(callback, step_state(denoiser, plan, i, x_next, x0, guided, sigma=s[i]))
    return x


def sample_euler_ancestral(denoiser, x, plan: Plan, generator=None, callback=None):
    """Euler ancestral: an Euler step down to s_down, then fresh noise of std s_up
    (one draw every step, the last one included, as the reference)."""
    s = plan.sigmas.tolist()
    for i in range(plan.begin, plan.num_steps):
        guided = denoiser(plan.model_input(x, i), plan.timesteps[i], i - plan.begin)
        eps = _eps(guided, x)
        x32 = x.float()
        x0 = x32 - s[i] * eps
        s_down, s_up = ancestral_step(s[i], s[i + 1])
        x_next = x32 + to_d(x32, s[i], x0) * (s_down - s[i])
        noise = noise_like(eps, generator)
        x_next = (x_next + noise * s_up).to(eps.dtype)
        x = run_callback(callback, step_state(denoiser, plan, i, x_next, x0, guided, sigma=s[i]))
    return x


def sample_heun(denoiser, x, plan: Plan, generator=None, callback=None):
    """Heun's method (Karras et al. 2022, Alg. 1 with no churn): an Euler step to s', the model
    again at s' (the next step's timestep), and the mean of the two slopes; the last step, to
    s' = 0, is a plain Euler step. Computed in the sample's dtype, as the reference."""
    s = plan.sigmas.tolist()
    cfg = plan.schedule.config
    clip = cfg.clip_sample_range if cfg.clip_sample else None  # the reference's Heun reads clip_sample

    def denoised(x_at, eps, s_at):
        x0 = x_at - s_at * eps
        return x0.clamp(-clip, clip) if clip is not None else x0

    for i in range(plan.begin, plan.num_steps):
        step = i - plan.begin
        guided = denoiser(plan.model_input(x, i), plan.timesteps[i], step)
        x0 = denoised(x, _eps(guided, x), s[i])
        d = to_d(x, s[i], x0)
        dt = s[i + 1] - s[i]
        x_next = x + d * dt
        if i < plan.num_steps - 1:  # the reference's last step (to s' = 0) is Euler's
            guided_2 = denoiser(plan.model_input(x_next, i + 1), plan.timesteps[i + 1], step)
            d_2 = to_d(x_next, s[i + 1], denoised(x_next, _eps(guided_2, x), s[i + 1]))
            x_next = x + (d + d_2) / 2 * dt
        x = run_callback(callback, step_state(denoiser, plan, i, x_next, x0, guided, sigma=s[i]))
    return x
