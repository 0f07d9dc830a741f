"""Building blocks of the Kandinsky 2.2 decoder UNet (guided-diffusion style).

    ImageEmbedding       CLIP image embedding -> a vector added to `emb`
    ImageTokens          CLIP image embedding -> 32 tokens the attention layers attend to
    HintEncoder          ControlNet hint image (B, 3, H, W) -> (B, 4, H/8, W/8)
    AddedKVAttention     self-attention over the feature map whose keys and values are
                         prefixed with the image tokens

The timestep embedding and the ResBlock (GroupNorm-SiLU-conv twice, scale-shift conditioned
on `emb`, 2x up/down-sampling) are shared with the prior and MoVQ: kandinsky/layers.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kandinsky.attention import attention

# The image embedding becomes this many tokens (diffusers' ImageProjection default).
NUM_IMAGE_TOKENS = 32
# Channels the hint encoder adds to the UNet input.
HINT_CHANNELS = 4


class ImageEmbedding(nn.Module):
    """The CLIP image embedding's contribution to the conditioning vector: Linear + LayerNorm."""

    def __init__(self, image_dim: int, emb_dim: int):
        super().__init__()
        self.proj = nn.Linear(image_dim, emb_dim)
        self.norm = nn.LayerNorm(emb_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(image_embeds))  # (B, emb_dim)


class ImageTokens(nn.Module):
    """The CLIP image embedding as NUM_IMAGE_TOKENS tokens: one Linear, reshape, LayerNorm."""

    def __init__(self, image_dim: int, token_dim: int):
        super().__init__()
        self.proj = nn.Linear(image_dim, NUM_IMAGE_TOKENS * token_dim)
        self.norm = nn.LayerNorm(token_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(image_embeds).reshape(image_embeds.shape[0], NUM_IMAGE_TOKENS, -1)
        return self.norm(tokens)  # (B, 32, token_dim)


class HintEncoder(nn.Module):
    """ControlNet-depth hint (B, 3, H, W) -> (B, 4, H/8, W/8): eight 3x3 convs with SiLU
    between them; the 3rd, 5th and 7th halve the resolution."""

    # (in, out, stride) of each conv
    LAYERS = [(3, 16, 1), (16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 96, 2), (96, 96, 1), (96, 256, 2),
              (256, HINT_CHANNELS, 1)]

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1) for c_in, c_out, stride in self.LAYERS
        )

    def forward(self, hint: torch.Tensor) -> torch.Tensor:
        x = hint  # (B, 3, H, W)
        for conv in self.convs[:-1]:
            x = F.silu(conv(x))
        return self.convs[-1](x)  # (B, 4, H/8, W/8)


class AddedKVAttention(nn.Module):
    """Self-attention over the pixels of a feature map, with the image tokens prepended
    to its keys and values ("added KV"):

        h = group_norm(x) as (B, h*w, C)
        q = to_q(h);  k = [add_k_proj(tokens), to_k(h)];  v = [add_v_proj(tokens), to_v(h)]
        out = x + to_out(attention(q, k, v))

    The tokens are used as given (no norm); 1/sqrt(head_dim) scaling; no mask.
    """

    def __init__(self, channels: int, head_dim: int, token_dim: int, groups: int):
        super().__init__()
        self.heads = channels // head_dim
        # The reference's attention GroupNorm always uses eps 1e-5, whatever norm_eps says.
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-5)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.add_k_proj = nn.Linear(token_dim, channels)
        self.add_v_proj = nn.Linear(token_dim, channels)
        self.to_out = nn.Linear(channels, channels)

    def token_layout(self) -> dict:
        """What the keys of this layer's attention are (kandinsky.capture reads it): keys [0, 32) are
        the image tokens, the pixels follow."""
        return {"kind": "added_kv", "image_tokens": NUM_IMAGE_TOKENS}

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        return x.view(B, L, self.heads, C // self.heads).transpose(1, 2)  # (B, heads, L, d)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        q = self.split_heads(self.to_q(h))  # (B, heads, H*W, d)
        k = torch.cat([self.split_heads(self.add_k_proj(tokens)), self.split_heads(self.to_k(h))], dim=2)
        v = torch.cat([self.split_heads(self.add_v_proj(tokens)), self.split_heads(self.to_v(h))], dim=2)
        # k, v: (B, heads, 32 + H*W, d)
        out = attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)  # (B, H*W, C)
        out = self.to_out(out).transpose(1, 2).reshape(B, C, H, W)
        return x + out
