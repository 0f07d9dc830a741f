"""The Kandinsky 2.2 decoder UNet: predicts the noise (and variance) of MoVQ latents,
conditioned on the diffusion step and a CLIP image embedding.

Topology (guided-diffusion style), with C = block_out_channels and L = layers_per_block:

    conv_in                                           (B, in_channels, h, w) -> (B, C0, h, w)
    down[0..n-1] L ResBlocks per level (+ added-KV attention after each, levels 1..n-1),
                then a down-sampling ResBlock (all but the last level)        -> (B, C[-1], h/2^(n-1), w/2^(n-1))
    mid         ResBlock, attention, ResBlock
    up[0..n-1]  L+1 ResBlocks per level, each fed the matching skip tensor of the
                down path (+ attention, all but the top level), then an up-sampling ResBlock

n = len(block_out_channels) is 4 in Kandinsky 2.2 (h/8 at the bottom); any n >= 1 of this
topology loads (diffusers' own tiny Kandinsky test configs use 2).
    norm_out, SiLU, conv_out                          -> (B, out_channels, h, w)

Conditioning: emb = time_embed(sinusoid(t)) + image_embed(image_embeds) drives the
ResBlocks' scale-shift; image_tokens(image_embeds) (32 tokens) are the extra keys and
values of every attention layer. The ControlNet-depth variant (addition_embed_type
"image_hint") also encodes a hint image to 4 channels at latent resolution and
concatenates it to the input.

The forward is named parts, ``embed``, ``levels_down``, ``mid``, ``levels_up``, ``head``;
``forward_cached`` runs them with a :class:`DeepCache` (feature caching across sampler steps: the
levels below a cut reused, only those above it run).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from kandinsky.checks import check_tensor, check_timestep, fail
from kandinsky.config import AnyOf, ComponentConfig, ConfigError, ResolutionLevels
from kandinsky.layers import Model, ResBlock, TimestepEmbedding, group_norm, timesteps
from kandinsky.unet.blocks import HINT_CHANNELS, AddedKVAttention, HintEncoder, ImageEmbedding, ImageTokens

NUM_LEVELS = 4  # Kandinsky 2.2's depth (the default config); any depth >= 1 is accepted
DOWN_PLAIN, DOWN_ATTN = "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"
UP_ATTN, UP_PLAIN = "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"


def block_types(depth: int) -> tuple[list[str], list[str]]:
    """down_block_types and up_block_types of this topology at ``depth`` levels."""
    return [DOWN_PLAIN] + [DOWN_ATTN] * (depth - 1), [UP_ATTN] * (depth - 1) + [UP_PLAIN]


@dataclasses.dataclass
class UNetConfig(ResolutionLevels, ComponentConfig):
    """Sizes of the decoder UNet; field names are the keys of the hub's unet/config.json."""

    CLASS_NAME = "UNet2DConditionModel"
    FIXED = {
        "act_fn": "silu",
        "addition_time_embed_dim": None,
        "attention_type": "default",
        "center_input_sample": False,
        "class_embed_type": None,
        "class_embeddings_concat": False,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "cross_attention_norm": None,
        "dropout": 0.0,
        "encoder_hid_dim_type": "image_proj",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "mid_block_only_cross_attention": AnyOf(None, False),
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
        "num_attention_heads": None,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "projection_class_embeddings_input_dim": None,
        "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": False,
        "resnet_time_scale_shift": "scale_shift",
        "time_cond_proj_dim": None,
        "time_embedding_act_fn": None,
        "time_embedding_dim": None,
        "time_embedding_type": "positional",
        "timestep_post_act": None,
    }
    # Keys the reference only reads for block types this UNet does not have: no effect here.
    # EXTRA_OUT writes them back with the hub's values, so to_dict() reproduces the hub config.
    _NO_OPS = {
        "addition_embed_type_num_heads": 64,  # only for addition_embed_type "text"
        "downsample_padding": 1,  # only for conv down-samplers
        "dual_cross_attention": False,  # only for transformer cross-attention blocks
        "transformer_layers_per_block": 1,
        "upcast_attention": False,
        "use_linear_projection": False,
    }
    # (newer diffusers also write reverse_transformer_layers_per_block: null; the hub configs lack it)
    IGNORED = frozenset(_NO_OPS) | {"reverse_transformer_layers_per_block"}
    EXTRA_OUT = {"_class_name": CLASS_NAME, **_NO_OPS}

    in_channels: int = 4  # 4 (text2img/img2img), 9 (inpaint), 8 (ControlNet-depth: 4 + hint)
    out_channels: int = 8  # predicted noise (4) and variance (4)
    block_out_channels: tuple[int, ...] = (384, 768, 1152, 1536)
    down_block_types: tuple[str, ...] = tuple(block_types(NUM_LEVELS)[0])  # must follow block_out_channels' length
    up_block_types: tuple[str, ...] = tuple(block_types(NUM_LEVELS)[1])
    layers_per_block: int = 3
    attention_head_dim: int = 64  # channels per head (diffusers' misnomer is right here)
    cross_attention_dim: int = 768  # width of the image tokens
    encoder_hid_dim: int = 1280  # width of the CLIP image embedding
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    addition_embed_type: str = "image"  # "image", or "image_hint" (ControlNet-depth)
    sample_size: int = 64  # latent size the model was trained at; no effect on the network

    def check_sizes(self, source: str = "config.json") -> None:
        def fail(key, why):
            raise ConfigError(f"{source}: {key}={getattr(self, key)!r} is not supported: {why}.")

        channels = self.block_out_channels
        down, up = block_types(len(channels))
        if list(self.down_block_types) != down:
            fail("down_block_types", f"with {len(channels)} levels this UNet's topology is {down}")
        if list(self.up_block_types) != up:
            fail("up_block_types", f"with {len(channels)} levels this UNet's topology is {up}")
        if any(c % self.norm_num_groups for c in channels):
            fail("norm_num_groups", f"it must divide every entry of block_out_channels {list(channels)}")
        if channels[0] % 2:
            fail("block_out_channels", "the first width (the timestep feature size) must be even")
        if any(c % self.attention_head_dim for c in channels[1:]):
            fail("attention_head_dim", f"it must divide the attention levels' widths {list(channels[1:])}")
        if self.addition_embed_type not in ("image", "image_hint"):
            fail("addition_embed_type", "Kandinsky 2.2 uses 'image' or 'image_hint' (ControlNet)")
        if self.addition_embed_type == "image_hint" and self.in_channels <= HINT_CHANNELS:
            fail("in_channels", f"with addition_embed_type 'image_hint' it counts the {HINT_CHANNELS} hint "
                 "channels too, so it must exceed them")

    @property
    def sample_channels(self) -> int:
        """Channels of the `sample` the caller passes (the hint's channels are added inside)."""
        return self.in_channels - (HINT_CHANNELS if self.addition_embed_type == "image_hint" else 0)


class DownLevel(nn.Module):
    """One resolution of the encoder: `layers` ResBlocks (each followed by attention when
    `attention`), then a down-sampling ResBlock unless it is the bottom level. Every
    output is pushed on `skips` for the decoder."""

    def __init__(self, in_ch: int, out_ch: int, cfg: UNetConfig, emb_dim: int, attention: bool, downsample: bool):
        super().__init__()
        groups, norm = cfg.norm_num_groups, group_norm(cfg.norm_num_groups, cfg.norm_eps)
        self.res = nn.ModuleList(
            ResBlock(in_ch if j == 0 else out_ch, out_ch, norm, emb_dim) for j in range(cfg.layers_per_block)
        )
        self.attn = (
            nn.ModuleList(
                AddedKVAttention(out_ch, cfg.attention_head_dim, cfg.cross_attention_dim, groups)
                for _ in range(cfg.layers_per_block)
            )
            if attention
            else None
        )
        self.downsample = ResBlock(out_ch, out_ch, norm, emb_dim, resample="down") if downsample else None

    def forward(self, x, emb, tokens, skips: list):
        x = self.blocks(x, emb, tokens, skips)
        if self.downsample is not None:
            x = self.downsample(x, emb)  # (B, C, h/2, w/2)
            skips.append(x)
        return x

    def blocks(self, x, emb, tokens, skips: list):
        """The level's ResBlocks (+ attention), without the down-sampler."""
        for j, res in enumerate(self.res):
            x = res(x, emb)
            if self.attn is not None:
                x = self.attn[j](x, tokens)
            skips.append(x)
        return x


class MidBlock(nn.Module):
    """ResBlock, attention, ResBlock at the lowest resolution."""

    def __init__(self, ch: int, cfg: UNetConfig, emb_dim: int):
        super().__init__()
        norm = group_norm(cfg.norm_num_groups, cfg.norm_eps)
        self.res_in = ResBlock(ch, ch, norm, emb_dim)
        self.attn = AddedKVAttention(ch, cfg.attention_head_dim, cfg.cross_attention_dim, cfg.norm_num_groups)
        self.res_out = ResBlock(ch, ch, norm, emb_dim)

    def forward(self, x, emb, tokens):
        return self.res_out(self.attn(self.res_in(x, emb), tokens), emb)


class UpLevel(nn.Module):
    """One resolution of the decoder: `layers + 1` ResBlocks, each fed the concatenation
    of the running tensor and the next skip tensor popped from `skips` (+ attention when
    `attention`), then an up-sampling ResBlock unless it is the top level."""

    def __init__(self, in_ch: int, out_ch: int, skip_chs: list[int], cfg: UNetConfig, emb_dim: int,
                 attention: bool, upsample: bool):
        super().__init__()
        groups, norm = cfg.norm_num_groups, group_norm(cfg.norm_num_groups, cfg.norm_eps)
        self.res = nn.ModuleList(
            ResBlock((in_ch if j == 0 else out_ch) + skip_ch, out_ch, norm, emb_dim)
            for j, skip_ch in enumerate(skip_chs)
        )
        self.attn = (
            nn.ModuleList(
                AddedKVAttention(out_ch, cfg.attention_head_dim, cfg.cross_attention_dim, groups)
                for _ in skip_chs
            )
            if attention
            else None
        )
        self.upsample = ResBlock(out_ch, out_ch, norm, emb_dim, resample="up") if upsample else None

    def forward(self, x, emb, tokens, skips: list):
        for j, res in enumerate(self.res):
            x = res(torch.cat([x, skips.pop()], dim=1), emb)
            if self.attn is not None:
                x = self.attn[j](x, tokens)
        if self.upsample is not None:
            x = self.upsample(x, emb)  # (B, C, 2h, 2w)
        return x


class UNet(Model):
    """Kandinsky 2.2 decoder UNet. Call as ``unet(sample, timestep, image_embeds, hint=None)``.

    sample:       (B, in_channels, h, w) latents (for "image_hint": in_channels - 4 channels),
                  h and w multiples of 8
    timestep:     int / float / 0-d tensor, or a (B,) tensor
    image_embeds: (B, encoder_hid_dim) CLIP image embedding
    hint:         (B, 3, 8h, 8w) ControlNet hint image; required iff addition_embed_type is
                  "image_hint", refused otherwise
    returns       (B, out_channels, h, w)
    """

    WEIGHT, VARIABLE = "conv_in.weight", "unet"  # dtype / device; what users call it (layers.Model)

    def __init__(self, config: UNetConfig):
        super().__init__()
        config.validate()
        self.config = config
        C, L = config.block_out_channels, config.layers_per_block
        emb_dim = 4 * C[0]

        self.time_embed = TimestepEmbedding(C[0], emb_dim, emb_dim)
        self.image_embed = ImageEmbedding(config.encoder_hid_dim, emb_dim)
        self.image_tokens = ImageTokens(config.encoder_hid_dim, config.cross_attention_dim)
        self.hint_encoder = HintEncoder() if config.addition_embed_type == "image_hint" else None

        self.conv_in = nn.Conv2d(config.in_channels, C[0], 3, padding=1)
        depth = config.depth
        last = depth - 1
        self.down = nn.ModuleList(
            DownLevel(C[max(i - 1, 0)], C[i], config, emb_dim, attention=i > 0, downsample=i < last)
            for i in range(depth)
        )
        self.mid = MidBlock(C[last], config, emb_dim)
        # Channels of the skip tensors as the encoder pushes them (conv_in, then per level its L
        # ResBlocks and its down-sampler), reversed: the order the decoder pops them, L + 1 per level.
        pushed = [C[0]] + [C[i] for i in range(depth) for _ in range(L + (i < last))]
        skip_chs = pushed[::-1]
        up = []
        for i in range(depth):
            level = last - i  # resolution level, bottom first
            up.append(UpLevel(C[min(level + 1, last)], C[level], skip_chs[i * (L + 1) : (i + 1) * (L + 1)],
                              config, emb_dim, attention=level > 0, upsample=level > 0))
        self.up = nn.ModuleList(up)
        self.norm_out = nn.GroupNorm(config.norm_num_groups, C[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(C[0], config.out_channels, 3, padding=1)

    def check_inputs(self, sample, timestep, image_embeds, hint) -> None:
        """Clear errors for the input mistakes torch would report deep inside a layer (kandinsky.checks)."""
        cfg = self.config
        check_tensor(self, "sample", sample)  # image_embeds and hint are cast to the sample's dtype
        check_tensor(self, "image_embeds", image_embeds, kind="float")
        check_tensor(self, "hint", hint, kind="float", hint=" in [0, 1] (convert a uint8 image with x / 255)",
                     optional=True)
        if sample.ndim != 4 or sample.shape[1] != cfg.sample_channels:
            extra = " (+4 hint channels added inside)" if cfg.addition_embed_type == "image_hint" else ""
            fail(self, [f"sample must be (B, {cfg.sample_channels}, h, w){extra} for this UNet "
                        f"(in_channels={cfg.in_channels}), got {tuple(sample.shape)}"])
        B, _, h, w = sample.shape
        factor = cfg.downsampling_factor
        fail(self, [
            (h % factor or w % factor) and f"sample height and width must be multiples of {factor}, got {h}x{w}",
            image_embeds.shape != (B, cfg.encoder_hid_dim) and (
                f"image_embeds must be (B, encoder_hid_dim) = ({B}, {cfg.encoder_hid_dim}), "
                f"got {tuple(image_embeds.shape)}"),
            self.hint_problem(hint, B, h, w),
            check_timestep(timestep, B),
        ])

    def hint_problem(self, hint, B: int, h: int, w: int) -> str | None:
        """What is wrong with ``hint`` for a (B, ., h, w) sample, or None."""
        if self.hint_encoder is None:
            return None if hint is None else (
                "`hint` was given but this UNet has no hint encoder (addition_embed_type "
                f"{self.config.addition_embed_type!r}); use the ControlNet-depth checkpoint")
        if hint is None:
            return "this ControlNet UNet (addition_embed_type 'image_hint') needs a `hint` image"
        if tuple(hint.shape) != (B, 3, 8 * h, 8 * w):  # the hint is at pixel resolution: 8x the latents
            return f"hint must be (B, 3, 8h, 8w) = ({B}, 3, {8 * h}, {8 * w}), got {tuple(hint.shape)}"
        return None

    def forward(self, sample: torch.Tensor, timestep, image_embeds: torch.Tensor,
                hint: torch.Tensor | None = None) -> torch.Tensor:
        self.check_inputs(sample, timestep, image_embeds, hint)
        x, emb, tokens = self.embed(sample, timestep, image_embeds, hint)  # (B, C0, h, w)
        skips = [x]
        x = self.levels_down(x, emb, tokens, skips)  # (B, C[-1], h/8, w/8) at the bottom (depth 4)
        x = self.mid(x, emb, tokens)
        x = self.levels_up(x, emb, tokens, skips)  # (B, C0, h, w) at the top
        return self.head(x)  # (B, out_channels, h, w)

    # The forward's named parts (also run one by one by forward_cached).
    def embed(self, sample, timestep, image_embeds, hint):
        """-> conv_in(sample [+ hint features]) (B, C0, h, w), emb (B, 4*C0), tokens (B, 32, cross_attention_dim)."""
        image_embeds = image_embeds.to(sample.dtype)
        t = timesteps(timestep, sample.shape[0], sample.device)  # (B,)
        emb = self.time_embed(t, sample.dtype) + self.image_embed(image_embeds)  # (B, 4*C0)
        tokens = self.image_tokens(image_embeds)  # (B, 32, cross_attention_dim)
        if self.hint_encoder is not None:
            sample = torch.cat([sample, self.hint_encoder(hint.to(sample.dtype))], dim=1)  # (B, in_channels, h, w)
        return self.conv_in(sample), emb, tokens

    def levels_down(self, x, emb, tokens, skips: list, stop: int | None = None):
        """Down levels, pushing their skip tensors. ``stop=k``: only levels 0..k-1, the last without its
        down-sampler (whose output feeds only the levels below k): the encoder above a cut at level k."""
        if stop is None:
            for level in self.down:
                x = level(x, emb, tokens, skips)
            return x
        for level in self.down[: stop - 1]:
            x = level(x, emb, tokens, skips)
        return self.down[stop - 1].blocks(x, emb, tokens, skips)  # (B, C[k-1], h/2^(k-1), w/2^(k-1))

    def levels_up(self, x, emb, tokens, skips: list, start: int = 0, stop: int | None = None):
        """Up levels ``up[start:stop]`` (bottom first), popping skip tensors."""
        for level in self.up[start:stop]:
            x = level(x, emb, tokens, skips)
        return x

    def head(self, x):
        return self.conv_out(F.silu(self.norm_out(x)))

    def forward_cached(self, sample: torch.Tensor, timestep, image_embeds: torch.Tensor, hint, cache: "DeepCache"):
        """The forward with the levels at and below ``cache.level`` (and the mid block) cached (DeepCache,
        Ma et al. 2024): when ``cache.deep`` is None, a full evaluation (the same operations as forward)
        that stores those levels' output, (B, C[k-1], h/2^(k-1), w/2^(k-1)) after the up-sampler of the
        up level at resolution k; otherwise only the levels above the cut run, on the stored output."""
        self.check_inputs(sample, timestep, image_embeds, hint)
        x, emb, tokens = self.embed(sample, timestep, image_embeds, hint)
        skips = [x]
        below = self.config.depth - cache.level  # up levels below the cut (bottom first)
        if cache.deep is None:
            x = self.levels_down(x, emb, tokens, skips)
            x = self.mid(x, emb, tokens)
            cache.deep = self.levels_up(x, emb, tokens, skips, stop=below)
        else:
            self.levels_down(x, emb, tokens, skips, stop=cache.level)
        x = self.levels_up(cache.deep, emb, tokens, skips, start=below)
        return self.head(x)


@dataclasses.dataclass
class DeepCache:
    """What UNet.forward_cached keeps between evaluations: the cut's resolution level (1..depth:
    level k caches down levels k.., the mid block and the up levels at resolutions >= k; depth caches
    the mid block alone) and the output of the cached part (None: the next evaluation is a full one)."""

    level: int = 1
    deep: torch.Tensor | None = None
