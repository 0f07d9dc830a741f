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

import torch

from kandinsky.calls import BRANCHES_GUIDED, BRANCHES_SINGLE, model_call
from kandinsky.sampling.plan import Guided


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
    """

    stage = "decoder"

    def __init__(self, unet, embeds, guidance_scale: float, latent_channels: int = 4, inpaint=None, hint=None):
        self.unet = unet
        self.embeds = embeds
        self.guidance_scale = float(guidance_scale)
        self.guided = self.guidance_scale > 1
        self.branches = BRANCHES_GUIDED if self.guided else BRANCHES_SINGLE
        self.latent_channels = latent_channels
        self.inpaint = torch.cat([inpaint, inpaint]) if inpaint is not None and self.guided else inpaint
        self.hint = torch.cat([hint, hint]) if hint is not None and self.guided else hint

    def __call__(self, x: torch.Tensor, t, step: int) -> Guided:
        x_in = torch.cat([x, x]) if self.guided else x  # (2B or B, 4, h, w)
        if self.inpaint is not None:
            x_in = torch.cat([x_in, self.inpaint], dim=1)  # (., 9, h, w): latents, masked image, keep
        with model_call(self.stage, step, t, self.branches):
            out = self.unet(x_in, t, self.embeds, hint=self.hint)  # (., 8, h, w)
        eps = out[:, : self.latent_channels]  # (., 4, h, w)
        return guide(eps, self.guidance_scale) if self.guided else Guided(eps)
