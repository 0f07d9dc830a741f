"""Denoisers: ``denoiser(x, t, step) -> Guided``, one per stage.

A denoiser owns everything a sampler must not know about: the model, classifier-free
guidance (the [negative, positive] batch, ``guidance_scale``, one branch alone when
guidance_scale <= 1), the prior's text conditioning (as a cached prefix), and the decoder's
task inputs (inpainting: masked-image latents and mask; ControlNet: the hint). It marks each
model evaluation with :func:`kandinsky.calls.model_call`, so hooks know the stage,
the step and where each guidance branch sits in the batch.

    guided:    out = out_uncond + s * (out_cond - out_uncond)     (Ho & Salimans 2022)
"""
from __future__ import annotations

import numbers

import torch

from kandinsky.calls import BRANCHES_GUIDED, BRANCHES_SINGLE, model_call
from kandinsky.sampling.plan import Guided
from kandinsky.unet.model import DeepCache


def guide(out: torch.Tensor, guidance_scale: float) -> Guided:
    """Split a [uncond; cond] batch and combine it."""
    uncond, cond = out.chunk(2)
    return Guided(uncond + guidance_scale * (cond - uncond), uncond, cond)


class PriorDenoiser:
    """The prior as a denoiser: predicts the normalised clean image embedding x_0 (N, D).

    ``conditioning``: text_embeds (M, D'), text hidden states (M, 77, D), mask (M, 77), for the
    M distinct texts; ``rows``: which text each row of the batch uses ([uncond rows; cond rows]
    with guidance). With ``cache=True`` the 78 constant tokens are computed once
    (``DiffusionPrior.prefix``) and each step runs only the 3 that change.
    """

    stage = "prior"

    def __init__(self, prior, conditioning, rows: torch.Tensor, guidance_scale: float, cache: bool = True):
        self.prior = prior
        self.guidance_scale = float(guidance_scale)
        self.guided = self.guidance_scale > 1
        self.branches = BRANCHES_GUIDED if self.guided else BRANCHES_SINGLE
        if cache:
            self.prefix = prior.prefix(*conditioning).select(rows)
            self.conditioning = None
        else:
            self.prefix = None
            self.conditioning = [c[rows] for c in conditioning]

    def __call__(self, x: torch.Tensor, t, step: int) -> Guided:
        x_in = torch.cat([x, x]) if self.guided else x  # (2N or N, D)
        with model_call(self.stage, step, t, self.branches):
            if self.prefix is not None:
                out = self.prior.forward_cached(x_in, t, self.prefix)
            else:
                out = self.prior(x_in, t, *self.conditioning)
        return guide(out, self.guidance_scale) if self.guided else Guided(out)


class DecoderDenoiser:
    """The decoder UNet as a denoiser: predicts the noise eps (B, 4, h, w).

    ``embeds``: image embeddings for the UNet, [negative; positive] (2B, D) with guidance, else
    (B, D). ``inpaint``: (B, 5, h, w) masked-image latents and keep-mask appended to the input
    channels; ``hint``: (B, 3, H, W) ControlNet hint. The UNet's 4 variance channels are
    dropped (every decoder sampler here uses a fixed variance).

    Two ways to spend fewer UNet evaluations (both off by default; off, the run is bit-identical):

    * ``cache_interval=N`` (feature caching across steps, DeepCache): one full UNet evaluation every
      N model evaluations (every N steps; Heun counts its 2 per step); in between only the levels
      above ``cache_level`` run, on the deep levels' output cached at the last full evaluation
      (``UNet.forward_cached``). A cached evaluation is marked ``cached=True`` on its ModelCall.
    * ``guidance_interval=(lo, hi)``: classifier-free guidance only at the steps whose position in
      the plan, ``(plan.begin + step) / plan.num_steps`` (0 = the first step from pure noise, 1 = clean),
      lies in [lo, hi); elsewhere the conditional branch runs alone (batch halved; Kynkäänniemi et al.
      2024). Needs ``plan``.
    """

    stage = "decoder"

    def __init__(self, unet, embeds, guidance_scale: float, latent_channels: int = 4, inpaint=None, hint=None,
                 cache_interval: int = 1, cache_level: int = 1, guidance_interval=None, plan=None):
        config = getattr(unet, "config", None)  # any callable with the UNet's signature runs uncached
        check_speedups(cache_interval, cache_level, guidance_interval, getattr(config, "depth", None), plan)
        self.unet = unet
        self.embeds = embeds
        self.guidance_scale = float(guidance_scale)
        self.guided = self.guidance_scale > 1
        self.branches = BRANCHES_GUIDED if self.guided else BRANCHES_SINGLE
        self.latent_channels = latent_channels
        self.inpaint = torch.cat([inpaint, inpaint]) if inpaint is not None and self.guided else inpaint
        self.hint = torch.cat([hint, hint]) if hint is not None and self.guided else hint
        self.cache_interval = int(cache_interval)
        self.cache = DeepCache(int(cache_level)) if self.cache_interval > 1 else None
        self.evaluations = 0
        self.guidance_interval = None if guidance_interval is None else tuple(float(v) for v in guidance_interval)
        self.plan = plan

    def guides(self, step: int) -> bool:
        """Whether step ``step`` of the run is guided (guidance_scale > 1, inside the guidance interval)."""
        if not self.guided or self.guidance_interval is None:
            return self.guided
        lo, hi = self.guidance_interval
        return lo <= (self.plan.begin + step) / self.plan.num_steps < hi

    def __call__(self, x: torch.Tensor, t, step: int) -> Guided:
        guided = self.guides(step)
        embeds, inpaint, hint = self.embeds, self.inpaint, self.hint
        if guided:
            x_in, branches = torch.cat([x, x]), BRANCHES_GUIDED  # (2B, 4, h, w)
        else:
            x_in, branches = x, BRANCHES_SINGLE  # (B, 4, h, w)
            if self.guided:  # outside the guidance interval: the conditional halves alone
                embeds, inpaint, hint = (None if v is None else v.chunk(2)[1] for v in (embeds, inpaint, hint))
        if inpaint is not None:
            x_in = torch.cat([x_in, inpaint], dim=1)  # (., 9, h, w): latents, masked image, keep
        cache = self.cache_for(x_in.shape[0])
        with model_call(self.stage, step, t, branches, cached=cache is not None and cache.deep is not None):
            if cache is None:
                out = self.unet(x_in, t, embeds, hint=hint)  # (., 8, h, w)
            else:
                out = self.unet.forward_cached(x_in, t, embeds, hint, cache)
        self.evaluations += 1
        eps = out[:, : self.latent_channels]  # (., 4, h, w)
        return guide(eps, self.guidance_scale) if guided else Guided(eps)

    def cache_for(self, batch: int):
        """The DeepCache this evaluation uses (its ``deep`` None: a full evaluation), or None (no caching).
        Full every ``cache_interval`` evaluations; a guided cache serves an unguided evaluation with its
        conditional half; an unguided one cannot serve a guided evaluation (a full one runs)."""
        cache = self.cache
        if cache is None:
            return None
        if self.evaluations % self.cache_interval == 0 or cache.deep is None:
            cache.deep = None
        elif cache.deep.shape[0] == 2 * batch:  # cached guided, now the conditional branch alone
            return DeepCache(cache.level, cache.deep.chunk(2)[1])
        elif cache.deep.shape[0] != batch:
            cache.deep = None
        return cache


def check_speedups(cache_interval, cache_level, guidance_interval, depth: int | None, plan=None) -> None:
    """Clear errors for bad ``cache_interval``, ``cache_level`` (against the UNet's ``depth``, when known)
    and ``guidance_interval`` values."""
    def whole(value) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    if not whole(cache_interval) or cache_interval < 1:
        raise ValueError(f"cache_interval must be a whole number >= 1 (1 = off: a full UNet evaluation every "
                         f"step), got {cache_interval!r}.")
    if not whole(cache_level) or not 1 <= cache_level <= (depth or cache_level):
        raise ValueError(f"cache_level must be a UNet resolution level from 1 to {depth or 'the depth'} (this "
                         f"UNet's depth): the levels from it down are cached, got {cache_level!r}.")
    if guidance_interval is None:
        return
    try:
        lo, hi = (float(v) for v in guidance_interval)
    except (TypeError, ValueError):
        lo = hi = None
    if lo is None or not 0 <= lo <= hi <= 1:
        raise ValueError(f"guidance_interval must be (lo, hi) with 0 <= lo <= hi <= 1, fractions of the run "
                         f"(0 = the first step from noise, 1 = the clean end), or None (always); got "
                         f"{guidance_interval!r}.")
    if plan is None:
        raise ValueError("guidance_interval needs the run's plan (DecoderDenoiser(..., plan=plan)).")
