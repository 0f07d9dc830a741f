"""kandinsky.training losses against the reference's training-example formulas (diffusers models
with the same weights, the same noise and timesteps) and guided-diffusion's variational bound.

* prior: x_0 MSE on clip_mean / clip_std-normalised embeddings under a fresh cosine DDPM schedule
  (diffusers' train_text_to_image_prior.py), with and without Min-SNR (diffusers' compute_snr);
* decoder / inpaint: eps MSE on the first 4 output channels of
  ``unet(noisy, t, None, added_cond_kwargs={"image_embeds": e}).sample`` (train_text_to_image_decoder.py);
* VLB: the per-sample bound equals a float64 numpy transcription of guided-diffusion's
  ``_vb_terms_bpd`` (learned_range variance, t = 0 and t > 0), and hand-checked values;
  the hybrid loss stops the mean's gradient;
* condition dropout replaces exactly the drawn rows.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kandinsky.demo import DECODER_SCHEDULER, PRIOR_SCHEDULER
from kandinsky.sampling.schedule import NoiseSchedule
from kandinsky.training.losses import (
    decoder_loss,
    discretized_gaussian_log_likelihood,
    drop_image_embeds,
    drop_text,
    dropped_rows,
    normal_kl,
    prior_loss,
    prior_schedule,
    vlb_terms,
)
from tests.refs.prior import prior_inputs
from weights_convert import load_component


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is fastest, and the suite runs one test process per core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def reference_snr(scheduler, t):
    from diffusers.training_utils import compute_snr

    return compute_snr(scheduler, t)


@pytest.fixture(scope="module")
def prior_pair(prior_checkpoint):
    folder, ref = prior_checkpoint
    return load_component(folder), ref


@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_prior_loss_equals_reference_recipe(prior_pair, snr_gamma):
    from diffusers import DDPMScheduler

    ours, ref = prior_pair
    ref_sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample")
    sched = prior_schedule()
    assert torch.equal(sched.alphas_cumprod, ref_sched.alphas_cumprod)

    image_embeds, text_embeds, hidden, mask = prior_inputs(batch=4, seed=1)
    g = torch.Generator().manual_seed(0)
    noise, t = torch.randn(4, 16, generator=g), torch.tensor([0, 17, 500, 999])

    # the reference script's formulas
    with torch.no_grad():
        target = (image_embeds - ref.clip_mean) / ref.clip_std
        noisy = ref_sched.add_noise(target, noise, t)
        pred = ref(noisy, timestep=t, proj_embedding=text_embeds, encoder_hidden_states=hidden,
                   attention_mask=mask).predicted_image_embedding
        if snr_gamma is None:
            expected = F.mse_loss(pred.float(), target.float())
        else:
            snr = reference_snr(ref_sched, t)
            w = torch.stack([snr, snr_gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]  # x_0 form
            per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=1)
            expected = (per * w).mean()
        got = prior_loss(ours, sched, image_embeds, text_embeds, hidden, mask,
                         noise=noise, timesteps=t, snr_gamma=snr_gamma)
    assert abs(got.item() - expected.item()) <= 1e-5 * expected.item(), (got.item(), expected.item())


def test_training_schedules_are_the_samplers_schedule(prior_pair):
    """One schedule class for training and sampling: the prior's training schedule has the prior
    checkpoint's tables, the decoder's is read from its scheduler_config.json; anything else is refused."""
    from kandinsky.training import NoiseSchedule as exported

    ours = prior_schedule()
    hub = NoiseSchedule.from_config(PRIOR_SCHEDULER)
    assert exported is NoiseSchedule and isinstance(ours, NoiseSchedule) and ours.prediction_type == "sample"
    assert torch.equal(ours.betas, hub.betas) and torch.equal(ours.alphas_cumprod, hub.alphas_cumprod)
    with pytest.raises(TypeError, match="NoiseSchedule"):
        prior_loss(prior_pair[0], hub.alphas_cumprod, *prior_inputs(batch=2, seed=1))


def test_prior_loss_draws_from_the_generator(prior_pair):
    ours, _ = prior_pair
    x = prior_inputs(batch=2, seed=2)
    with torch.no_grad():
        a = prior_loss(ours, prior_schedule(), *x, generator=torch.Generator().manual_seed(3))
        b = prior_loss(ours, prior_schedule(), *x, generator=torch.Generator().manual_seed(3))
        c = prior_loss(ours, prior_schedule(), *x, generator=torch.Generator().manual_seed(4))
    assert a.item() == b.item() != c.item()


def _decoder_inputs(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, 32, generator=g),
            torch.randn(B, 4, 8, 8, generator=g), torch.tensor([0, 321, 999][:B]))


@pytest.mark.parametrize("variant", ["decoder", "inpaint"])
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_decoder_loss_equals_reference_recipe(unet_checkpoint, unet_inpaint_checkpoint, variant, snr_gamma):
    from diffusers import DDPMScheduler

    folder, ref = unet_checkpoint if variant == "decoder" else unet_inpaint_checkpoint
    ours = load_component(folder)
    ref_sched = DDPMScheduler.from_config(DECODER_SCHEDULER)
    sched = NoiseSchedule.from_config(DECODER_SCHEDULER)
    latents, embeds, noise, t = _decoder_inputs()
    extra = {}
    if variant == "inpaint":
        keep = torch.ones(3, 1, 8, 8)
        keep[:, :, 2:6, 1:5] = 0
        extra = {"masked_latents": latents * keep, "mask": keep}
    with torch.no_grad():
        noisy = ref_sched.add_noise(latents, noise, t)
        x = noisy if variant == "decoder" else torch.cat([noisy, extra["masked_latents"], extra["mask"]], dim=1)
        pred = ref(x, t, None, added_cond_kwargs={"image_embeds": embeds}).sample[:, :4]
        if snr_gamma is None:
            expected = F.mse_loss(pred.float(), noise.float())
        else:
            snr = reference_snr(ref_sched, t)
            w = torch.stack([snr, snr_gamma * torch.ones_like(t)], dim=1).min(dim=1)[0] / snr  # eps form
            expected = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * w).mean()
        got = decoder_loss(ours, sched, latents, embeds, noise=noise, timesteps=t, snr_gamma=snr_gamma, **extra)
    assert abs(got.item() - expected.item()) <= 1e-5 * expected.item(), (got.item(), expected.item())


# --------------------------------------------------------------------------- the variational bound


def guided_diffusion_vb(betas, x0, x_t, t, eps, v):
    """guided-diffusion's ``_vb_terms_bpd`` for an eps / learned_range model (clip_denoised=False),
    transcribed with float64 numpy tables and float32 torch arithmetic as the original."""
    betas = np.array(betas, dtype=np.float64)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    post_log_var = np.log(np.append(post_var[1], post_var[1:]))
    coef1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
    coef2 = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)

    def ex(arr):  # _extract_into_tensor
        return torch.from_numpy(arr)[t].float().reshape(-1, 1, 1, 1).expand(x0.shape)

    true_mean = ex(coef1) * x0 + ex(coef2) * x_t
    pred_x0 = ex(np.sqrt(1.0 / ac)) * x_t - ex(np.sqrt(1.0 / ac - 1)) * eps
    model_mean = ex(coef1) * pred_x0 + ex(coef2) * x_t
    frac = (v + 1) / 2
    model_log_var = frac * ex(np.log(betas)) + (1 - frac) * ex(post_log_var)
    kl = 0.5 * (-1.0 + model_log_var - ex(post_log_var) + torch.exp(ex(post_log_var) - model_log_var)
                + (true_mean - model_mean) ** 2 * torch.exp(-model_log_var))
    kl = kl.mean(dim=(1, 2, 3)) / np.log(2.0)
    centered, inv = x0 - model_mean, torch.exp(-0.5 * model_log_var)

    def cdf(x):
        return 0.5 * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * torch.pow(x, 3))))

    plus, minus = cdf(inv * (centered + 1 / 255)), cdf(inv * (centered - 1 / 255))
    logp = torch.where(x0 < -0.999, torch.log(plus.clamp(min=1e-12)),
                       torch.where(x0 > 0.999, torch.log((1 - minus).clamp(min=1e-12)),
                                   torch.log((plus - minus).clamp(min=1e-12))))
    nll = -logp.mean(dim=(1, 2, 3)) / np.log(2.0)
    return torch.where(t == 0, nll, kl)


def test_vlb_equals_guided_diffusion():
    sched = NoiseSchedule.from_config(DECODER_SCHEDULER)
    g = torch.Generator().manual_seed(5)
    B = 4
    x0 = torch.rand(B, 4, 8, 8, generator=g) * 2.2 - 1.1  # some values beyond +-0.999 (the edge bins)
    noise, eps = torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, 4, 8, 8, generator=g)
    v = torch.rand(B, 4, 8, 8, generator=g) * 2 - 1
    t = torch.tensor([0, 1, 250, 999])
    x_t = sched.add_noise(x0, noise, t)
    ours = vlb_terms(sched.betas, x0, x_t, t, eps, v)
    ref = guided_diffusion_vb(sched.betas.numpy(), x0, x_t, t, eps, v)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6), (ours, ref)


def test_vlb_hand_checked():
    # KL(N(1, 2) || N(0, 1)) = (2 - log 2) / 2
    kl = normal_kl(torch.tensor(1.0), torch.tensor(math.log(2.0)), torch.tensor(0.0), torch.tensor(0.0))
    assert abs(kl.item() - (2 - math.log(2)) / 2) < 1e-6
    # the bin [-1/255, 1/255] of a N(0, s^2) has mass ~ 2/255 * pdf(0) / s for a wide Gaussian
    s = 0.5
    logp = discretized_gaussian_log_likelihood(torch.zeros(1), torch.zeros(1), torch.full((1,), math.log(s)))
    assert abs(logp.item() - math.log(2 / 255 / (s * math.sqrt(2 * math.pi)))) < 1e-3
    # the top bin holds everything above 1 - 1/255: a narrow Gaussian at 1 puts (almost) all its mass there
    logp = discretized_gaussian_log_likelihood(torch.ones(1), torch.ones(1), torch.full((1,), math.log(1e-3)))
    assert abs(logp.item()) < 1e-4  # log 1 (the tanh approximation of the CDF is off by ~3e-5 at 3.9 sigma)
    # a perfect model (eps exact) with the posterior's own variance (v = -1) has KL 0 for t >= 1
    sched = NoiseSchedule.from_config(DECODER_SCHEDULER)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([1, 40, 999])
    x_t = sched.add_noise(x0, noise, t)
    vb = vlb_terms(sched.betas, x0, x_t, t, noise, -torch.ones_like(x0))
    assert vb.abs().max() < 1e-3
    # while the largest variance (v = +1) costs: KL(N(m, var~) || N(m, beta)) per dim in bits
    vb = vlb_terms(sched.betas, x0, x_t, t, noise, torch.ones_like(x0))
    b = sched.betas.double()[t]
    ac = torch.cumprod(1 - sched.betas.double(), 0)
    var_post = b * (1 - ac[t - 1]) / (1 - ac[t])
    expected = 0.5 * (torch.log(b / var_post) + var_post / b - 1) / math.log(2)
    assert torch.allclose(vb.double(), expected, rtol=1e-3, atol=1e-6)


def test_hybrid_loss_stops_the_mean_gradient():
    """With vlb_weight, eps channels get exactly the MSE gradient; variance channels get the VLB's."""
    sched = NoiseSchedule.from_config(DECODER_SCHEDULER)
    g = torch.Generator().manual_seed(1)
    latents, embeds = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 32, generator=g)
    noise, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 600])
    out = torch.randn(2, 8, 8, 8, generator=g).requires_grad_(True)

    def fake_unet(x, t, e, hint=None):
        return out * 1.0

    decoder_loss(fake_unet, sched, latents, embeds, noise=noise, timesteps=t, vlb_weight=1.0).backward()
    hybrid = out.grad.clone()
    out.grad = None
    decoder_loss(fake_unet, sched, latents, embeds, noise=noise, timesteps=t).backward()
    assert torch.equal(hybrid[:, :4], out.grad[:, :4])
    assert out.grad[:, 4:].abs().max() == 0 and hybrid[:, 4:].abs().max() > 0
    with pytest.raises(ValueError, match="variance channels"):
        decoder_loss(lambda *a, **k: out[:, :4], sched, latents, embeds, noise=noise, timesteps=t, vlb_weight=1.0)


def test_condition_dropout_replaces_drawn_rows():
    g = torch.Generator().manual_seed(0)
    B = 64
    embeds, hidden = torch.randn(B, 8, generator=g), torch.randn(B, 77, 8, generator=g)
    mask = torch.ones(B, 77, dtype=torch.bool)
    empty = (torch.zeros(1, 8), torch.zeros(1, 77, 8), torch.zeros(1, 77, dtype=torch.bool))
    drop = dropped_rows(B, 0.25, torch.Generator().manual_seed(1))
    assert drop.dtype == torch.bool and 4 < drop.sum() < 30  # about a quarter
    e2, h2, m2 = drop_text(embeds, hidden, mask, empty, drop)
    assert torch.equal((e2 == 0).all(1), drop)
    assert (h2[drop] == 0).all() and (~m2[drop]).all()
    assert torch.equal(e2[~drop], embeds[~drop]) and torch.equal(h2[~drop], hidden[~drop]) and m2[~drop].all()
    out = drop_image_embeds(embeds, torch.full((1, 8), 7.0), drop)
    assert torch.equal((out == 7.0).all(1), drop) and torch.equal(out[~drop], embeds[~drop])
    assert not dropped_rows(B, 0.0).any()
