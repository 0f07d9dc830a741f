"""MoVQ: the image autoencoder of Kandinsky 2.2 (MoVQGAN, arXiv:2209.09002).

    image (B, 3, H, W)
      -> Encoder -> quant_conv          continuous latents (B, 4, H/8, W/8)   [encode]
      -> VectorQuantizer (optional)      snapped to the nearest codebook entry [quantize]
      -> post_quant_conv -> Decoder      image (B, 3, H, W)                    [decode]

The encoder is a plain convolutional VQGAN encoder. The decoder is "modulated":
every normalisation in it is a SpatialNorm, a GroupNorm whose scale and shift are
1x1 convs of the (nearest-upsampled) latents, so the latents steer every level of
the decoder, not only its input.

Kandinsky's diffusion model works on the continuous latents: the pipelines call
``encode`` and ``decode(latents, force_not_quantize=True)``; the codebook is only
used when ``force_not_quantize=False`` (or through ``quantize``).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from kandinsky.attention import attention
from kandinsky.checks import check_tensor, fail
from kandinsky.config import ComponentConfig, ConfigError, ResolutionLevels
from kandinsky.layers import Model, ResBlock, group_norm
from kandinsky.movq.tiling import resolve_tile, tiled_decode, tiled_encode

EPS = 1e-6  # every GroupNorm of the autoencoder
SPATIAL_NORM_GROUPS = 32  # SpatialNorm's GroupNorm always has 32 groups (norm_num_groups is the encoder's)


@dataclasses.dataclass
class MoVQConfig(ResolutionLevels, ComponentConfig):
    """Sizes of the autoencoder; field names are the diffusers ``VQModel`` config keys.

    The defaults are Kandinsky 2.2's (67,832,495 parameters).
    """

    CLASS_NAME: ClassVar[str] = "VQModel"
    FIXED: ClassVar[dict] = {
        "act_fn": "silu",
        "norm_type": "spatial",  # the decoder's norms are SpatialNorms
        "mid_block_add_attention": True,
        "lookup_from_codebook": False,  # decode() takes latents, not codebook indices
        "force_upcast": False,
    }
    EXTRA_OUT: ClassVar[dict] = {"_class_name": "VQModel"}
    # Keys whose diffusers default builds a network other than Kandinsky's: a config
    # that omits them does not describe a MoVQ, so from_dict asks for them.
    REQUIRED: ClassVar[tuple] = (
        "block_out_channels",
        "down_block_types",
        "up_block_types",
        "layers_per_block",
        "latent_channels",
        "num_vq_embeddings",
        "norm_type",
    )

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    num_vq_embeddings: int = 16384
    norm_num_groups: int = 32
    vq_embed_dim: int | None = 4  # None means latent_channels
    sample_size: int = 32  # metadata only
    scaling_factor: float = 0.18215  # metadata only: Kandinsky does not scale MoVQ latents

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> "MoVQConfig":
        missing = [key for key in cls.REQUIRED if key not in config]
        if missing:
            raise ConfigError(
                f"{source}: missing {missing}; diffusers' VQModel defaults for these keys "
                "describe a different network than Kandinsky 2.2's MoVQ."
            )
        return super().from_dict(config, source)

    def check_sizes(self, source: str = "config.json") -> None:
        def bad(key, why):
            raise ConfigError(f"{source}: {key}={getattr(self, key)!r} is not supported: {why}")

        n = self.depth
        # Kandinsky's topology: attention only at the lowest resolution
        down = ("DownEncoderBlock2D",) * (n - 1) + ("AttnDownEncoderBlock2D",)
        up = ("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * (n - 1)
        if tuple(self.down_block_types) != down:
            bad("down_block_types", f"with {n} levels (len(block_out_channels)) MoVQ uses {list(down)}")
        if tuple(self.up_block_types) != up:
            bad("up_block_types", f"with {n} levels (len(block_out_channels)) MoVQ uses {list(up)}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups or c % SPATIAL_NORM_GROUPS:
                bad("block_out_channels", f"every width must be a multiple of norm_num_groups="
                    f"{self.norm_num_groups} and of {SPATIAL_NORM_GROUPS} (the SpatialNorm groups)")
        if self.vq_embed_dim not in (None, self.latent_channels):
            # the decoder's SpatialNorms read the codebook vectors with latent_channels inputs
            bad("vq_embed_dim", f"must equal latent_channels={self.latent_channels} (or be null)")


# ----------------------------------------------------------------------------- norms


class SpatialNorm(nn.Module):
    """GroupNorm of the features, scaled and shifted per pixel by the latents.

    f: (B, C, h, w); zq: (B, latent_channels, H/8, W/8), nearest-upsampled to (h, w).
    ``conv_y`` makes the scale and ``conv_b`` the shift (the paper's names).

    The reference upsamples zq to (h, w) and runs both 1x1 convs there. A 1x1 conv commutes
    with nearest upsampling, so here they run at the latents' resolution and each latent
    pixel's scale and shift are broadcast over the s x s block of features it covers: no
    full-resolution conv, no upsampled copies (the same numbers; measured in
    benchmarks/bench_movq_means.py).
    """

    def __init__(self, channels: int, zq_channels: int):
        super().__init__()
        self.norm_layer = nn.GroupNorm(SPATIAL_NORM_GROUPS, channels, eps=EPS)
        self.conv_y = nn.Conv2d(zq_channels, channels, 1)
        self.conv_b = nn.Conv2d(zq_channels, channels, 1)

    def forward(self, f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        B, C, h, w = f.shape
        h0, w0 = zq.shape[-2:]
        if h % h0 or w % w0:  # not a whole upsampling factor: the reference's way
            zq = F.interpolate(zq, size=(h, w), mode="nearest")  # (B, zq_channels, h, w)
            return self.norm_layer(f) * self.conv_y(zq) + self.conv_b(zq)
        sh, sw = h // h0, w // w0
        scale = self.conv_y(zq)[:, :, :, None, :, None]  # (B, C, h0, 1, w0, 1)
        shift = self.conv_b(zq)[:, :, :, None, :, None]
        n = self.norm_layer(f).view(B, C, h0, sh, w0, sw)  # each latent pixel's block of features
        return torch.addcmul(shift, n, scale).reshape(B, C, h, w)


# ----------------------------------------------------------------------------- blocks


# The encoder's ResBlocks normalise with GroupNorms, the decoder's with SpatialNorms of the
# latents (kandinsky.layers.ResBlock: norm1, conv1, norm2, conv2, conv_shortcut; no emb).


def spatial_norm(zq_channels: int):
    """The decoder's ResBlock norm: channels -> SpatialNorm(channels, zq_channels)."""
    return functools.partial(SpatialNorm, zq_channels=zq_channels)


class AttentionBlock(nn.Module):
    """Single-head self-attention over all pixels, with a residual connection."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def token_layout(self) -> dict:
        """What the keys of this layer's attention are (kandinsky.capture reads it): the pixels only."""
        return {"kind": "self"}

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        B, C, H, W = h.shape
        h = h.flatten(2).transpose(1, 2)  # (B, H*W, C)
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, H*W, C)
        h = attention(q, k, v).squeeze(1)  # (B, H*W, C)
        return self.to_out(h).transpose(1, 2).reshape(B, C, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attend(self.norm(x))


class SpatialAttentionBlock(AttentionBlock):
    """The decoder's AttentionBlock: its norm is a SpatialNorm of the latents zq."""

    def __init__(self, channels: int, zq_channels: int):
        super().__init__(channels, SPATIAL_NORM_GROUPS)
        self.norm = SpatialNorm(channels, zq_channels)

    def forward(self, x: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        return x + self.attend(self.norm(x, zq))


class Downsample(nn.Module):
    """Halve H and W: pad right/bottom by one, then a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


# ----------------------------------------------------------------------------- encoder


class EncoderLevel(nn.Module):
    """ResBlocks at one resolution (each followed by attention at the lowest one), then downsample."""

    def __init__(self, in_channels: int, out_channels: int, num_res: int, groups: int,
                 with_attention: bool, with_downsample: bool):
        super().__init__()
        norm = group_norm(groups, EPS)
        self.res = nn.ModuleList(
            ResBlock(in_channels if j == 0 else out_channels, out_channels, norm) for j in range(num_res)
        )
        # absent parts are None (no module, no name), as in the UNet
        self.attn = (
            nn.ModuleList(AttentionBlock(out_channels, groups) for _ in range(num_res)) if with_attention else None
        )
        self.downsample = Downsample(out_channels) if with_downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for j, res in enumerate(self.res):
            x = res(x)
            if self.attn is not None:
                x = self.attn[j](x)
        if self.downsample is not None:
            x = self.downsample(x)  # (B, C, H/2, W/2)
        return x


class EncoderMid(nn.Module):
    """ResBlock, attention, ResBlock at the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.res1 = ResBlock(channels, channels, group_norm(groups, EPS))
        self.attn = AttentionBlock(channels, groups)
        self.res2 = ResBlock(channels, channels, group_norm(groups, EPS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: MoVQConfig):
        super().__init__()
        ch = cfg.block_out_channels
        g = cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList(
            EncoderLevel(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g,
                         with_attention=i == cfg.depth - 1, with_downsample=i < cfg.depth - 1)
            for i in range(cfg.depth)
        )
        self.mid = EncoderMid(ch[-1], g)
        self.norm_out = nn.GroupNorm(g, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.stem(x))  # (B, latent_channels, H/8, W/8)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """The full-resolution part: conv_in and every level but the last (convolutions only,
        so it can run tile by tile). (B, 3, H, W) -> (B, ch[-2], H/8, W/8)."""
        h = self.conv_in(x)  # (B, ch[0], H, W)
        for level in self.down[:-1]:
            h = level(h)  # halves H and W
        return h

    def trunk(self, h: torch.Tensor) -> torch.Tensor:
        """The latent-resolution part: the last level (with attention), mid block, output conv."""
        h = self.mid(self.down[-1](h))  # (B, ch[-1], H/8, W/8)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, latent_channels, H/8, W/8)


# ----------------------------------------------------------------------------- quantizer


class VectorQuantizer(nn.Module):
    """Snaps each latent pixel to its nearest codebook vector (Euclidean distance)."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.codebook = nn.Embedding(num_embeddings, dim)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z: (B, dim, h, w) -> (snapped (B, dim, h, w), indices (B, h, w))."""
        B, C, h, w = z.shape
        z = z.permute(0, 2, 3, 1)  # (B, h, w, dim)
        flat = z.reshape(-1, C)  # (B*h*w, dim)
        # torch.cdist and argmin (first index on ties), exactly as the reference computes them
        indices = torch.cdist(flat, self.codebook.weight).argmin(dim=1)  # (B*h*w,)
        zq = self.codebook(indices).view(z.shape)
        zq = z + (zq - z).detach()  # straight-through gradient, as in training
        return zq.permute(0, 3, 1, 2).contiguous(), indices.view(B, h, w)


# ----------------------------------------------------------------------------- decoder


def conv_layout(x: torch.Tensor) -> torch.Tensor:
    """The decoder's working memory layout. On the CPU, channels-last (NHWC): oneDNN's convolutions
    run faster in it and every module keeps the layout it is given, so converting the decoder's
    inputs once suffices (a 512 px decode: 0.91x the time, benchmarks/bench_stages.py; the same
    numbers up to float rounding). Elsewhere (GPUs: not measured) the input's layout is kept."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x


class DecoderMid(nn.Module):
    def __init__(self, channels: int, zq_channels: int):
        super().__init__()
        self.res1 = ResBlock(channels, channels, spatial_norm(zq_channels))
        self.attn = SpatialAttentionBlock(channels, zq_channels)
        self.res2 = ResBlock(channels, channels, spatial_norm(zq_channels))

    def forward(self, x: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x, zq), zq), zq)


class DecoderLevel(nn.Module):
    """ResBlocks at one resolution (each followed by attention at the lowest one), then upsample."""

    def __init__(self, in_channels: int, out_channels: int, num_res: int, zq_channels: int,
                 with_attention: bool, with_upsample: bool):
        super().__init__()
        self.res = nn.ModuleList(
            ResBlock(in_channels if j == 0 else out_channels, out_channels, spatial_norm(zq_channels))
            for j in range(num_res)
        )
        self.attn = (
            nn.ModuleList(SpatialAttentionBlock(out_channels, zq_channels) for _ in range(num_res))
            if with_attention
            else None
        )
        self.upsample = Upsample(out_channels) if with_upsample else None

    def forward(self, x: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        return self.upsampled(self.blocks(x, zq))

    def blocks(self, x: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        for j, res in enumerate(self.res):
            x = res(x, zq)
            if self.attn is not None:
                x = self.attn[j](x, zq)
        return x

    def upsampled(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.upsample is None else self.upsample(x)  # (B, C, 2H, 2W)


class Decoder(nn.Module):
    def __init__(self, cfg: MoVQConfig):
        super().__init__()
        ch = tuple(reversed(cfg.block_out_channels))  # lowest resolution first
        zc = cfg.latent_channels
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid = DecoderMid(ch[0], zc)
        self.up = nn.ModuleList(
            DecoderLevel(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, zc,
                         with_attention=i == 0, with_upsample=i < cfg.depth - 1)
            for i in range(cfg.depth)
        )
        self.norm_out = SpatialNorm(ch[-1], zc)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        """z: post-quant latents; zq: the latents that modulate every norm (both (B, 4, H/8, W/8))."""
        return self.head(self.trunk(z, zq), zq)  # (B, out_channels, H, W)

    def trunk(self, z: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        """The latent-resolution part: conv_in, mid block, the first level's blocks (with
        attention). (B, 4, H/8, W/8) -> (B, ch[0], H/8, W/8)."""
        z, zq = conv_layout(z), conv_layout(zq)
        return self.up[0].blocks(self.mid(self.conv_in(z), zq), zq)

    def head(self, h: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        """The upsampling part (convolutions and norms only, so it can run tile by tile):
        (B, ch[0], H/8, W/8) -> (B, out_channels, H, W)."""
        h, zq = conv_layout(h), conv_layout(zq)
        h = self.up[0].upsampled(h)
        for level in self.up[1:]:
            h = level(h, zq)  # (B, ch[-1], H, W) after the last
        return self.conv_out(F.silu(self.norm_out(h, zq)))  # (B, out_channels, H, W)


# ----------------------------------------------------------------------------- model


class MoVQ(Model):
    """The Kandinsky 2.2 autoencoder (diffusers ``VQModel`` with ``norm_type="spatial"``)."""

    WEIGHT, VARIABLE = "quant_conv.weight", "movq"  # dtype / device; what users call it (layers.Model)

    def __init__(self, config: MoVQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        self.quantizer = VectorQuantizer(config.num_vq_embeddings, config.latent_channels)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        self.decoder = Decoder(config)

    def check_inputs(self, x: torch.Tensor, channels: int, what: str, multiple: int = 1) -> None:
        """Clear errors for the input mistakes torch would report deep inside a conv (kandinsky.checks)."""
        hint = " in [-1, 1] (convert uint8 images with x / 127.5 - 1)" if what == "images" else ""
        check_tensor(self, what, x, hint=hint)
        fail(self, [
            (x.ndim != 4 or x.shape[1] != channels) and f"{what} must be (B, {channels}, H, W); got {tuple(x.shape)}",
            x.ndim == 4 and (x.shape[2] % multiple or x.shape[3] % multiple) and (
                f"{what} height and width must be multiples of {multiple} (the downsampling factor); "
                f"got {tuple(x.shape[2:])}"),
        ])

    def encode(self, images: torch.Tensor, tile: bool | int | None = None) -> torch.Tensor:
        """images (B, 3, H, W), H and W multiples of 8 -> continuous latents (B, 4, H/8, W/8), not quantized.

        tile: None tiles images of more than 1024 x 1024 pixels, True always, False never, an
        int sets the tile side in pixels (see kandinsky.movq.tiling).
        """
        f = self.config.downsampling_factor
        self.check_inputs(images, self.config.in_channels, "images", f)
        size = resolve_tile(tile, images.shape[2], images.shape[3], f)
        if size is not None:
            return tiled_encode(self, images, size)
        return self.quant_conv(self.encoder(images))

    def quantize(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents (B, 4, h, w) -> (nearest codebook vectors (B, 4, h, w), codebook indices (B, h, w))."""
        self.check_inputs(latents, self.config.latent_channels, "latents")
        return self.quantizer(latents)

    def decode(self, latents: torch.Tensor, force_not_quantize: bool = False,
               tile: bool | int | None = None) -> torch.Tensor:
        """latents (B, 4, h, w) -> images (B, 3, 8h, 8w).

        With force_not_quantize=False (the reference's default) the latents are first
        snapped to the codebook; Kandinsky's pipelines pass True. tile: None tiles images of
        more than 1024 x 1024 pixels, True always, False never, an int sets the tile side in
        pixels (see kandinsky.movq.tiling).
        """
        self.check_inputs(latents, self.config.latent_channels, "latents")
        f = self.config.downsampling_factor
        size = resolve_tile(tile, latents.shape[2] * f, latents.shape[3] * f, f)
        if size is not None:
            return tiled_decode(self, latents, size, force_not_quantize=force_not_quantize)
        zq = latents if force_not_quantize else self.quantizer(latents)[0]
        images = self.decoder(self.post_quant_conv(zq), zq)  # channels-last on the CPU (conv_layout)
        return images if latents.is_contiguous(memory_format=torch.channels_last) else images.contiguous()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the codebook, as the reference's VQModel.forward."""
        return self.decode(self.encode(images), force_not_quantize=False)
