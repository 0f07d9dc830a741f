"""Layers that more than one model is built from (one implementation each).

    timesteps          the diffusion step as given (number, 0-d or (B,) tensor) -> (B,)
    timestep_sinusoid  sinusoidal features of the diffusion step, (B,) -> (B, dim)
    TimestepEmbedding  sinusoid -> Linear -> SiLU -> Linear (the UNet's and the prior's ``time_embed``)
    ResBlock           norm-SiLU-conv twice plus a shortcut, parameterised by its norm (a GroupNorm in
                       the UNet and MoVQ's encoder, a SpatialNorm of the latents in MoVQ's decoder), with
                       optional scale-shift conditioning (the UNet's ``emb``) and 2x resampling
    group_norm         the GroupNorm factory a ResBlock takes
    MLP                Linear -> activation -> Linear, the transformer blocks' feed-forward (CLIP, prior)
    TransformerBlock   pre-LayerNorm block x + attn(norm1(x)), x + mlp(norm2(x)) (CLIP's and the prior's)
    Model              base of the five component models: ``dtype`` / ``device`` of one named weight,
                       ``VARIABLE`` (what users call the model, for the fixes error messages suggest)
    AvgDownsample, NearestUpsample   the weightless 2x resamplers of the UNet's ResBlocks

Module names are the hub's where the hub has one (``linear_1``, ``norm1``, ``conv1``,
``time_emb_proj``, ...), so the renaming tables in weights_convert list only containers.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

MAX_PERIOD = 10000  # the longest wavelength of the timestep sinusoid


class Model(nn.Module):
    """A component model (UNet, DiffusionPrior, MoVQ, TextEncoder, ImageEncoder).

    ``dtype`` and ``device`` are those of its ``WEIGHT`` (a dotted parameter name such as
    ``"conv_in.weight"``); ``VARIABLE`` is what users call it (``"unet"``), so an input check can
    say ``pass sample.to(unet.dtype)`` (kandinsky.checks)."""

    WEIGHT: ClassVar[str]
    VARIABLE: ClassVar[str]

    @property
    def dtype(self) -> torch.dtype:
        return functools.reduce(getattr, self.WEIGHT.split("."), self).dtype

    @property
    def device(self) -> torch.device:
        return functools.reduce(getattr, self.WEIGHT.split("."), self).device


def timesteps(timestep, batch: int, device) -> torch.Tensor:
    """int / float / 0-d tensor (one step for the whole batch) or (B,) tensor -> (B,) on ``device``."""
    return torch.as_tensor(timestep, device=device).reshape(-1).expand(batch)


def timestep_sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of t: [cos, sin] of t * MAX_PERIOD^(-k / half), k < half. (B,) -> (B, dim) fp32.

    The reference's op order (diffusers' ``get_timestep_embedding`` with flip_sin_to_cos and
    shift 0), which both the UNet and the prior use."""
    half = dim // 2
    exponent = -math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = t[:, None].float() * torch.exp(exponent)[None, :]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, dim)


class TimestepEmbedding(nn.Module):
    """timestep_sinusoid(t, dim) -> Linear -> SiLU -> Linear. (B,) -> (B, out_dim)

    UNet: dim = block_out_channels[0], hidden = out = 4 * dim. Prior: dim = out = inner width,
    hidden = time_embed_dim."""

    def __init__(self, dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.dim = dim
        self.linear_1 = nn.Linear(dim, hidden_dim)
        self.linear_2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """t (B,); the features are cast to ``dtype`` (default: the weights') before the first Linear."""
        x = timestep_sinusoid(t, self.dim).to(dtype or self.linear_1.weight.dtype)  # (B, dim)
        return self.linear_2(F.silu(self.linear_1(x)))


class MLP(nn.Module):
    """Linear -> act -> Linear: the feed-forward of a transformer block. (B, L, width) -> (B, L, width)

    CLIP: act from the config's hidden_act (GELU or QuickGELU), hidden = intermediate_size.
    Prior: exact (erf) GELU, hidden = 4 * width."""

    def __init__(self, width: int, hidden: int, act: nn.Module):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = act
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(norm1(x), ...), then x + mlp(norm2(x)). (B, L, width)

    ``attn`` is the model's own attention (CLIP: ``block(x, mask=..., causal=...)``; the prior:
    ``block(x, mask, past)``): whatever the block is called with besides x goes to it."""

    def __init__(self, width: int, attn: nn.Module, mlp: nn.Module, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = attn
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), *args, **kwargs)
        return x + self.mlp(self.norm2(x))


def group_norm(groups: int, eps: float) -> Callable[[int], nn.GroupNorm]:
    """The norm a ResBlock takes: channels -> GroupNorm(groups, channels, eps)."""
    return lambda channels: nn.GroupNorm(groups, channels, eps=eps)


class AvgDownsample(nn.Module):
    """2x2 average pooling (no weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, kernel_size=2, stride=2)  # (B, C, H/2, W/2)


class NearestUpsample(nn.Module):
    """2x nearest-neighbour upsampling (no weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)


RESAMPLERS = {None: nn.Identity, "down": AvgDownsample, "up": NearestUpsample}


class ResBlock(nn.Module):
    """Pre-norm residual block:

        h = conv1(resample(silu(norm1(x[, zq]))))
        h = norm2(h[, zq])
        h = h * (1 + scale) + shift,    (scale, shift) = time_emb_proj(silu(emb))   [if emb_dim]
        out = conv_shortcut(resample(x)) + conv2(silu(h))

    ``norm(channels)`` builds both norms: ``group_norm(groups, eps)``, or a SpatialNorm that also
    takes the latents ``zq`` (MoVQ's decoder). ``resample``: None, "down" (2x average pooling) or
    "up" (2x nearest): the UNet changes resolution with such ResBlocks. A 1x1 conv on the shortcut
    where the width changes.
    """

    def __init__(self, in_channels: int, out_channels: int, norm: Callable[[int], nn.Module],
                 emb_dim: int | None = None, resample: str | None = None):
        super().__init__()
        self.norm1 = norm(in_channels)
        self.resample = RESAMPLERS[resample]()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(emb_dim, 2 * out_channels) if emb_dim else None
        self.norm2 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C_in, h, w). cond: what conditions the block, ``emb`` (B, emb_dim) for a block built
        with emb_dim (the UNet's: ``block(x, emb)``), else the latents ``zq`` (B, c, h0, w0) its
        SpatialNorms read (MoVQ's decoder: ``block(x, zq)``); GroupNorm blocks take none."""
        zq = () if cond is None or self.time_emb_proj is not None else (cond,)
        h = self.resample(F.silu(self.norm1(x, *zq)))  # (B, C_in, h', w')
        x = self.resample(x)
        h = self.norm2(self.conv1(h), *zq)  # (B, C_out, h', w')
        if self.time_emb_proj is not None:
            scale, shift = self.time_emb_proj(F.silu(cond))[:, :, None, None].chunk(2, dim=1)  # (B, C_out, 1, 1)
            h = h * (1 + scale) + shift
        return self.conv_shortcut(x) + self.conv2(F.silu(h))  # (B, C_out, h', w')
