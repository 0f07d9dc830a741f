"""The training losses of Kandinsky 2.2, as plain functions.

Notation (DDPM, https://arxiv.org/abs/2006.11239): x_0 the clean sample, eps ~ N(0, I),
t a training timestep in [0, T), alpha_bar_t = prod_{s<=t} (1 - beta_s) and

    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps            (the forward process)

prior_loss      the published prior recipe: a cosine (``squaredcos_cap_v2``) schedule, the
                prior predicts x_0 = the CLIP image embedding normalised with its
                clip_mean / clip_std; loss = MSE(prediction, x_0).
decoder_loss    the decoder recipe: the UNet predicts eps in its first 4 output channels;
                loss = MSE(eps_pred, eps). With ``vlb_weight > 0`` the 4 variance channels
                are trained too, through guided-diffusion's variational-bound term
                (Nichol & Dhariwal's hybrid loss; the mean's gradient is stopped there):
                loss = MSE + vlb_weight * L_vlb. The original authors trained with
                vlb_weight = 1 (T = 1000).
Min-SNR         (Hang et al. 2023) ``snr_gamma``: each sample's MSE is weighted by
                min(SNR_t, gamma) for an x_0 target (the prior), min(SNR_t, gamma) / SNR_t
                for an eps target (the decoder); SNR_t = alpha_bar_t / (1 - alpha_bar_t).

Every loss takes explicit ``noise`` and ``timesteps`` (for tests and for exact resumes) or
draws them from ``generator`` (on the CPU, then moved: a seed means the same everywhere).
``schedule`` is a ``kandinsky.sampling.schedule.NoiseSchedule`` (the samplers' own tables and
``add_noise``; ``prior_schedule()`` for the prior).

Condition dropout for classifier-free guidance (off by default) is applied to the batch
before the loss: ``drop_text`` replaces a row's text with the empty prompt's encoding (what
the prior sampler uses as its unconditional branch), ``drop_image_embeds`` replaces a row's
image embedding by the zero-image embedding (what the decoder pipeline uses), as the
authors' 2.1 training configs did.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kandinsky.sampling.schedule import NoiseSchedule, UnCLIPSchedulerConfig, posterior_tables

# --------------------------------------------------------------------------------------
# Noise schedules: kandinsky.sampling.schedule.NoiseSchedule, the samplers' own
# --------------------------------------------------------------------------------------


def prior_schedule(num_train_timesteps: int = 1000) -> NoiseSchedule:
    """The prior's training schedule: cosine betas (``squaredcos_cap_v2``), x_0 prediction (the
    prior checkpoint's UnCLIP config)."""
    return NoiseSchedule(UnCLIPSchedulerConfig(num_train_timesteps=num_train_timesteps, prediction_type="sample"))


def check_schedule(schedule) -> NoiseSchedule:
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(
            f"schedule must be a kandinsky NoiseSchedule (prior_schedule(), or NoiseSchedule.from_folder("
            f"'<decoder>/scheduler') for the decoder), got {type(schedule).__name__}."
        )
    return schedule


def min_snr_weights(schedule: NoiseSchedule, t: torch.Tensor, gamma: float, target: str) -> torch.Tensor:
    """Min-SNR-gamma weights per sample: min(SNR, gamma) (x_0 target) or that / SNR (eps target)."""
    s = schedule.snr(t)  # (B,)
    w = torch.clamp(s, max=gamma)
    return w if target == "sample" else w / s


# --------------------------------------------------------------------------------------
# Random draws
# --------------------------------------------------------------------------------------


def draw_timesteps(batch: int, num_train_timesteps: int, generator, device) -> torch.Tensor:
    """(B,) long timesteps uniform in [0, T), drawn on the CPU."""
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator).to(device)


def draw_noise(like: torch.Tensor, generator) -> torch.Tensor:
    return torch.randn(like.shape, generator=generator, dtype=torch.float32).to(like.device, like.dtype)


def _noise_and_timesteps(x0, schedule: NoiseSchedule, noise, timesteps, generator):
    B = x0.shape[0]
    if noise is None:
        noise = draw_noise(x0, generator)
    elif noise.shape != x0.shape:
        raise ValueError(f"noise must have the shape of the clean sample {tuple(x0.shape)}, got {tuple(noise.shape)}.")
    if timesteps is None:
        timesteps = draw_timesteps(B, schedule.num_train_timesteps, generator, x0.device)
    timesteps = torch.as_tensor(timesteps, device=x0.device).long().reshape(-1).expand(B)
    return noise.to(x0.dtype), timesteps


def _weighted_mse(pred, target, weights=None) -> torch.Tensor:
    """Mean over everything; with per-sample weights: mean_b(w_b * mean(err_b^2))."""
    if weights is None:
        return F.mse_loss(pred.float(), target.float())
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)  # (B,)
    return (per_sample * weights).mean()


def _unwrap(model):
    """The model inside a DistributedDataParallel wrapper (its attributes live there)."""
    return getattr(model, "module", model)


# --------------------------------------------------------------------------------------
# The prior
# --------------------------------------------------------------------------------------


def prior_loss(
    prior,
    schedule: NoiseSchedule,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_hidden_states: torch.Tensor,
    text_mask: torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """x_0-prediction MSE of the diffusion prior.

    image_embeds (B, D) CLIP image embeddings (the target, before normalisation);
    text_embeds (B, D), text_hidden_states (B, 77, D), text_mask (B, 77) bool: the CLIP text
    encoding of the captions. ``schedule``: the training schedule (``prior_schedule()``).
    """
    check_schedule(schedule)
    stats = _unwrap(prior)
    x0 = (image_embeds - stats.clip_mean.detach()) / stats.clip_std.detach()  # (B, D) normalised target
    noise, t = _noise_and_timesteps(x0, schedule, noise, timesteps, generator)
    x_t = schedule.add_noise(x0, noise, t)  # (B, D)
    pred = prior(x_t, t, text_embeds, text_hidden_states, text_mask)  # (B, D) predicted x_0
    weights = None if snr_gamma is None else min_snr_weights(schedule, t, snr_gamma, "sample")
    return _weighted_mse(pred, x0, weights)


# --------------------------------------------------------------------------------------
# The decoder
# --------------------------------------------------------------------------------------


def decoder_loss(
    unet,
    schedule: NoiseSchedule,
    latents: torch.Tensor,
    image_embeds: torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    snr_gamma: float | None = None,
    vlb_weight: float = 0.0,
    hint: torch.Tensor | None = None,
    masked_latents: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """eps-prediction MSE of the decoder UNet (+ vlb_weight * the variational bound).

    latents (B, 4, h, w) MoVQ latents of the images (``movq.encode``); image_embeds (B, D).
    Inpainting UNets (9 input channels) also take ``masked_latents`` (B, 4, h, w) = latents
    of the image with the area to repaint zeroed, and ``mask`` (B, 1, h, w) = 1 where kept,
    0 where repainted (what the inpaint pipeline feeds). ControlNet UNets take ``hint``
    (B, 3, 8h, 8w).
    """
    if (masked_latents is None) != (mask is None):
        raise ValueError("inpainting needs both masked_latents (B, 4, h, w) and mask (B, 1, h, w), or neither.")
    check_schedule(schedule)
    noise, t = _noise_and_timesteps(latents, schedule, noise, timesteps, generator)
    x_t = schedule.add_noise(latents, noise, t)  # (B, 4, h, w)
    model_input = x_t if mask is None else torch.cat([x_t, masked_latents, mask], dim=1)  # (B, 4 or 9, h, w)
    out = unet(model_input, t, image_embeds, hint=hint)  # (B, 8, h, w): eps, variance values
    C = latents.shape[1]
    eps_pred = out[:, :C]
    weights = None if snr_gamma is None else min_snr_weights(schedule, t, snr_gamma, "epsilon")
    loss = _weighted_mse(eps_pred, noise, weights)
    if vlb_weight:
        if out.shape[1] != 2 * C:
            raise ValueError(f"vlb_weight > 0 trains the variance channels, but the UNet outputs "
                             f"{out.shape[1]} channels (expected {2 * C}).")
        vb = vlb_terms(schedule.betas, latents, x_t, t, eps_pred.detach(), out[:, C:])  # (B,)
        loss = loss + vlb_weight * vb.mean()
    return loss


# --------------------------------------------------------------------------------------
# The variational bound (guided-diffusion, Nichol & Dhariwal 2021)
# --------------------------------------------------------------------------------------


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """log-probability of x (in [-1, 1], 256 bins) under a Gaussian discretised to the bins, elementwise."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vlb_terms(betas, x0, x_t, t, eps_pred, var_values) -> torch.Tensor:
    """L_vlb per sample in bits per dimension: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0,
    -log p(x_0|x_1) for t = 0 (guided-diffusion's ``_vb_terms_bpd``, clip_denoised=False).

    The model's variance is "learned_range": log var = frac log beta_t + (1 - frac) log var~_t,
    frac = (v + 1) / 2. Its mean comes from ``eps_pred`` (pass it detached: the hybrid loss
    trains only the variance through this term). All (B, C, h, w); t (B,). -> (B,)
    """
    shape = (-1,) + (1,) * (x0.ndim - 1)
    # each coefficient at each row's timestep, (B, 1, 1, 1)
    tab = {k: v.to(x0.device)[t].to(x0.dtype).reshape(shape) for k, v in posterior_tables(betas).items()}
    true_mean = tab["coef1"] * x0 + tab["coef2"] * x_t
    pred_x0 = tab["sqrt_recip_ac"] * x_t - tab["sqrt_recipm1_ac"] * eps_pred
    model_mean = tab["coef1"] * pred_x0 + tab["coef2"] * x_t
    frac = (var_values.float() + 1) / 2
    model_log_var = frac * tab["log_betas"] + (1 - frac) * tab["log_var_clipped"]
    kl = normal_kl(true_mean, tab["log_var_clipped"], model_mean, model_log_var).flatten(1).mean(1) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var).flatten(1).mean(1) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


# --------------------------------------------------------------------------------------
# Condition dropout (classifier-free guidance)
# --------------------------------------------------------------------------------------


def dropped_rows(batch: int, prob: float, generator=None, device=None) -> torch.Tensor:
    """(B,) bool: which rows lose their condition (each with probability ``prob``), drawn on the CPU."""
    return (torch.rand(batch, generator=generator) < prob).to(device)


def drop_text(text_embeds, text_hidden_states, text_mask, empty, drop: torch.Tensor):
    """Rows where ``drop`` (B,) is True get ``empty`` = the encoding of "" ((1, D), (1, 77, D),
    (1, 77)) instead of their text encoding. Returns the three tensors."""
    drop = drop.to(text_embeds.device)
    e_embeds, e_hidden, e_mask = (x.to(text_embeds.device) for x in empty)
    return (
        torch.where(drop[:, None], e_embeds.to(text_embeds.dtype), text_embeds),
        torch.where(drop[:, None, None], e_hidden.to(text_hidden_states.dtype), text_hidden_states),
        torch.where(drop[:, None], e_mask.bool(), text_mask.bool()),
    )


def drop_image_embeds(image_embeds, zero_embeds, drop: torch.Tensor):
    """Rows where ``drop`` (B,) is True get ``zero_embeds`` (1, D) (the CLIP embedding of an
    all-zero picture) instead of their image embedding."""
    return torch.where(drop.to(image_embeds.device)[:, None], zero_embeds.to(image_embeds), image_embeds)
