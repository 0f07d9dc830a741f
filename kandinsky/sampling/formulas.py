"""The few formulas every sampler shares (DDPM paper notation, https://arxiv.org/abs/2006.11239).

No imports: the schedules (kandinsky/schedulers) and the samplers (kandinsky/sampling) both use
these, so each formula is written once. The operation order is the reference's, so results stay
bit-identical to it.
"""
from __future__ import annotations


# ---------------------------------------------------------------------------------------------


def x0_from_eps(x_t, eps, alpha_bar):
    """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)   (DDPM eq. 15)."""
    return (x_t - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5


def eps_from_x0(x_t, x0, alpha_bar):
    """eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t)."""
    return (x_t - alpha_bar**0.5 * x0) / (1 - alpha_bar) ** 0.5


def posterior_mean(x0, x_t, alpha_bar_t, alpha_bar_prev, beta, alpha):
    """Mean of q(x_prev | x_t, x_0) (DDPM eq. 7):
    mu = sqrt(alpha_bar_prev) beta / (1 - alpha_bar_t) x_0 + sqrt(alpha) (1 - alpha_bar_prev) / (1 - alpha_bar_t) x_t"""
    beta_bar_t, beta_bar_prev = 1 - alpha_bar_t, 1 - alpha_bar_prev
    coef_x0 = (alpha_bar_prev**0.5 * beta) / beta_bar_t
    coef_xt = alpha**0.5 * beta_bar_prev / beta_bar_t
    return coef_x0 * x0 + coef_xt * x_t


def posterior_variance(alpha_bar_t, alpha_bar_prev, beta):
    """Variance of q(x_prev | x_t, x_0): (1 - alpha_bar_prev) / (1 - alpha_bar_t) beta ("fixed_small")."""
    return (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta


def sigma_from_alpha_bar(alpha_bar):
    """The noise-to-signal ratio of a VP level: sigma = sqrt((1 - alpha_bar) / alpha_bar)."""
    return ((1 - alpha_bar) / alpha_bar) ** 0.5
