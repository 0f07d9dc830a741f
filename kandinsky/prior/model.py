"""The Kandinsky 2.2 diffusion prior: text -> CLIP image embedding.

A causal transformer (DALL-E 2 / unCLIP prior) that denoises a CLIP image
embedding. Its input is one sequence of 81 tokens (Kandinsky 2.2 sizes):

    77 projected CLIP text hidden states
     1 projected CLIP text embedding
     1 timestep embedding
     1 projected noisy image embedding
     1 learned "prd" token, whose final state is read out

plus a learned positional embedding. Attention is causal and padded text tokens
are masked. Both masks are additive -10000 and add up, as in the released
model: this equals a boolean mask except where a query may see nothing (an
all-padding prompt), where the additive form stays finite like the reference.

The prd token's output, after a final LayerNorm, is projected back to the CLIP
dimension: the model predicts the clean image embedding, in the normalised
space; ``unnormalize`` maps it back with the checkpoint's ``clip_mean`` /
``clip_std``.

Sizes (Kandinsky 2.2): C = inner width = num_attention_heads * attention_head_dim
= 32 x 64 = 2048, D = embedding_dim = 1280 (CLIP ViT-bigG/14 text hidden size and
projection dim), 20 blocks; 1,026,225,920 parameters.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kandinsky.attention import attention
from kandinsky.checks import check_tensor, check_timestep, fail
from kandinsky.config import ComponentConfig, ConfigError
from kandinsky.layers import MLP, Model, TimestepEmbedding, TransformerBlock, timesteps

MASK_VALUE = -10000.0  # the additive mask value the prior was trained with
N_EXTRA_TOKENS = 4  # after the text: text embedding, time, noisy image embedding, prd token


@dataclasses.dataclass
class PriorConfig(ComponentConfig):
    """``prior/config.json`` of kandinsky-2-2-prior (diffusers PriorTransformer).

    Defaults are the reference library's defaults. The optional sizes may be
    null: time_embed_dim -> inner width, embedding_proj_dim and clip_embed_dim ->
    embedding_dim.
    """

    CLASS_NAME = "PriorTransformer"
    FIXED = {
        "additional_embeddings": N_EXTRA_TOKENS,
        "dropout": 0.0,
        "time_embed_act_fn": "silu",
        "norm_in_type": None,
        "embedding_proj_norm_type": None,
        "encoder_hid_proj_type": "linear",
        "added_emb_type": "prd",
    }
    EXTRA_OUT = {"_class_name": "PriorTransformer"}

    num_attention_heads: int = 32
    attention_head_dim: int = 64
    num_layers: int = 20
    embedding_dim: int = 768  # D: image embedding and text hidden-state width
    num_embeddings: int = 77  # text tokens
    time_embed_dim: int | None = None  # hidden width of the time MLP
    embedding_proj_dim: int | None = None  # width of the pooled text embedding
    clip_embed_dim: int | None = None  # width of the predicted image embedding

    # derived sizes
    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def time_hidden_dim(self) -> int:
        return self.time_embed_dim or self.inner_dim

    @property
    def text_embed_dim(self) -> int:
        return self.embedding_proj_dim or self.embedding_dim

    @property
    def clip_dim(self) -> int:
        return self.clip_embed_dim or self.embedding_dim

    @property
    def seq_len(self) -> int:
        return self.num_embeddings + N_EXTRA_TOKENS

    def check_sizes(self, source: str = "config.json") -> None:
        if self.inner_dim % 2:
            raise ConfigError(
                f"{source}: num_attention_heads * attention_head_dim = {self.inner_dim} must be even "
                "(sinusoidal timestep features come in cos/sin pairs)."
            )


class SelfAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections."""

    def __init__(self, dim: int, n_heads: int, head_dim: int, text_tokens: int):
        super().__init__()
        self.n_heads = n_heads
        self.text_tokens = text_tokens  # the sequence's first tokens; N_EXTRA_TOKENS follow (prd last)
        self.q = nn.Linear(dim, n_heads * head_dim)
        self.k = nn.Linear(dim, n_heads * head_dim)
        self.v = nn.Linear(dim, n_heads * head_dim)
        self.out = nn.Linear(n_heads * head_dim, dim)

    def token_layout(self) -> dict:
        """What the keys of this layer's attention are (kandinsky.capture reads it): the text tokens,
        then text embedding, time, noisy image embedding and the prd token (the output), last."""
        return {"kind": "prior", "text_tokens": self.text_tokens, "prd_token": -1}

    def forward(self, x: torch.Tensor, mask: torch.Tensor, past: tuple | None = None) -> torch.Tensor:
        """x (B, L, C) -> (B, L, C). ``past``: keys and values (B, heads, P, head_dim) of P earlier
        tokens (the prior's cached prefix) that x's queries also attend to; mask is then (., L, P + L)."""
        B, L, _ = x.shape
        q, k, v = (proj(x).view(B, L, self.n_heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, heads, P + L, head_dim)
        y = attention(q, k, v, mask=mask)  # (B, heads, L, head_dim)
        y = y.transpose(1, 2).reshape(B, L, -1)  # (B, L, heads * head_dim)
        return self.out(y)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of x (B, L, C), each (B, heads, L, head_dim): what a prefix cache keeps."""
        B, L, _ = x.shape
        return tuple(proj(x).view(B, L, self.n_heads, -1).transpose(1, 2) for proj in (self.k, self.v))


def attention_bias(text_mask: torch.Tensor, n_extra: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask: -10000 on padded text tokens plus -10000 above the diagonal.

    text_mask (B, T), True / 1 = real token -> (B, 1, T + n_extra, T + n_extra).
    The n_extra conditioning tokens after the text are never padded.
    """
    padding = (1 - text_mask.to(dtype)) * MASK_VALUE  # (B, T)
    padding = F.pad(padding, (0, n_extra), value=0.0)  # (B, L)
    L = padding.shape[1]
    causal = torch.full((L, L), MASK_VALUE, dtype=dtype, device=padding.device).triu(1)  # (L, L)
    return (padding[:, None, :] + causal)[:, None]  # (B, 1, L, L)


class DiffusionPrior(Model):
    """Predicts the (normalised) clean CLIP image embedding from a noisy one and the text.

    ``prior(hidden_states, timestep, proj_embedding, encoder_hidden_states, attention_mask)``

        hidden_states          (B, D)      noisy image embedding x_t
        timestep               int, 0-d or (B,) tensor
        proj_embedding         (B, D')     CLIP text embedding (pooled + projected)
        encoder_hidden_states  (B, 77, D)  CLIP text last hidden state
        attention_mask         (B, 77)     bool, True = real text token
        -> (B, clip_dim) predicted x_0
    """

    WEIGHT, VARIABLE = "proj_out.weight", "prior"  # dtype / device; what users call it (layers.Model)

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = config
        C = config.inner_dim
        self.time_embed = TimestepEmbedding(C, config.time_hidden_dim, C)
        self.text_hidden_proj = nn.Linear(config.embedding_dim, C)
        self.text_embed_proj = nn.Linear(config.text_embed_dim, C)
        self.image_embed_proj = nn.Linear(config.embedding_dim, C)
        self.prd_token = nn.Parameter(torch.zeros(1, 1, C))
        self.positional_embedding = nn.Parameter(torch.zeros(1, config.seq_len, C))
        heads, head_dim = config.num_attention_heads, config.attention_head_dim
        self.blocks = nn.ModuleList(  # pre-LayerNorm blocks, called as block(x, mask[, past])
            TransformerBlock(C, SelfAttention(C, heads, head_dim, config.num_embeddings), MLP(C, 4 * C, nn.GELU()))
            for _ in range(config.num_layers)
        )
        self.norm_out = nn.LayerNorm(C)
        self.proj_out = nn.Linear(C, config.clip_dim)
        # statistics of the CLIP image-embedding space the prior works in
        self.clip_mean = nn.Parameter(torch.zeros(1, config.clip_dim))
        self.clip_std = nn.Parameter(torch.zeros(1, config.clip_dim))

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | int,
        proj_embedding: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        self.check_inputs(hidden_states, timestep, proj_embedding, encoder_hidden_states, attention_mask)
        prefix = self._prefix_tokens(proj_embedding, encoder_hidden_states)  # (B, 78, C)
        x = torch.cat([prefix, self._step_tokens(hidden_states, timestep)], dim=1)  # (B, 81, C)
        mask = attention_bias(attention_mask, N_EXTRA_TOKENS, x.dtype)  # (B, 1, 81, 81)
        for block in self.blocks:
            x = block(x, mask)  # (B, 81, C)
        x = self.norm_out(x[:, -1])  # (B, C): the prd token
        return self.proj_out(x)  # (B, clip_dim)

    # The sequence is [77 text hidden states, text embedding | time, noisy image embedding, prd].
    # Attention is causal, so the first 78 tokens (the prefix) never see the last 3: their keys
    # and values are the same at every sampling step. ``prefix`` computes them once;
    # ``forward_cached`` then runs only the 3 step tokens against them (same result as forward).

    def _prefix_tokens(self, proj_embedding, encoder_hidden_states) -> torch.Tensor:
        text_hidden = self.text_hidden_proj(encoder_hidden_states)  # (B, 77, C)
        text_embed = self.text_embed_proj(proj_embedding)  # (B, C)
        x = torch.cat([text_hidden, text_embed[:, None]], dim=1)  # (B, 78, C)
        return x + self.positional_embedding[:, : x.shape[1]]

    def _step_tokens(self, hidden_states, timestep) -> torch.Tensor:
        B = hidden_states.shape[0]
        time_embed = self.time_embed(timesteps(timestep, B, hidden_states.device))  # (B, C)
        image_embed = self.image_embed_proj(hidden_states)  # (B, C)
        prd = self.prd_token.expand(B, -1, -1)  # (B, 1, C)
        x = torch.cat([time_embed[:, None], image_embed[:, None], prd], dim=1)  # (B, 3, C)
        return x + self.positional_embedding[:, -3:]

    def prefix(self, proj_embedding, encoder_hidden_states, attention_mask) -> "PriorPrefix":
        """The keys and values of the 78 constant tokens in every block, for :meth:`forward_cached`."""
        B = proj_embedding.shape[0]
        dummy = torch.zeros(B, self.config.embedding_dim, device=proj_embedding.device, dtype=proj_embedding.dtype)
        self.check_inputs(dummy, 0, proj_embedding, encoder_hidden_states, attention_mask)
        x = self._prefix_tokens(proj_embedding, encoder_hidden_states)  # (B, 78, C)
        P = x.shape[1]
        mask = attention_bias(attention_mask, N_EXTRA_TOKENS, x.dtype)  # (B, 1, 81, 81)
        past = []
        for block in self.blocks:
            past.append(block.attn.keys_values(block.norm1(x)))  # 2 x (B, heads, 78, head_dim)
            x = block(x, mask[:, :, :P, :P])  # (B, 78, C)
        return PriorPrefix(past, mask[:, :, P:, :])  # the step tokens' rows of the mask: (B, 1, 3, 81)

    def forward_cached(self, hidden_states: torch.Tensor, timestep, prefix: "PriorPrefix") -> torch.Tensor:
        """Same as ``forward`` with the text conditioning given as a :meth:`prefix`. (B, D) -> (B, clip_dim)"""
        self.check_step_inputs(hidden_states, timestep, prefix.batch_size)
        x = self._step_tokens(hidden_states, timestep)  # (B, 3, C)
        for block, past in zip(self.blocks, prefix.keys_values):
            x = block(x, prefix.mask, past)  # (B, 3, C)
        x = self.norm_out(x[:, -1])  # (B, C): the prd token
        return self.proj_out(x)  # (B, clip_dim)

    def check_step_inputs(self, hidden_states, timestep, batch: int) -> None:
        """forward_cached's checks: the noisy embedding and the timestep of a prefix of ``batch`` rows."""
        check_tensor(self, "hidden_states", hidden_states)
        fail(self, [
            (hidden_states.ndim != 2 or hidden_states.shape != (batch, self.config.embedding_dim)) and (
                f"forward_cached: hidden_states must be ({batch}, {self.config.embedding_dim}) (the prefix was "
                f"computed for {batch}), got {tuple(hidden_states.shape)}"),
            check_timestep(timestep, batch),
        ])

    def check_inputs(self, hidden_states, timestep, proj_embedding, encoder_hidden_states, attention_mask):
        """Clear errors for misshapen inputs and wrong dtypes / devices (kandinsky.checks). The three
        embeddings must match the weights; the mask only has to be on the same device."""
        cfg = self.config
        T = cfg.num_embeddings
        for name, x in (("hidden_states", hidden_states), ("proj_embedding", proj_embedding),
                        ("encoder_hidden_states", encoder_hidden_states)):
            check_tensor(self, name, x)
        check_tensor(self, "attention_mask", attention_mask, kind="any", optional=True)
        B = hidden_states.shape[0]
        mask_shape = None if attention_mask is None else tuple(attention_mask.shape)
        fail(self, [
            (hidden_states.ndim != 2 or hidden_states.shape[1] != cfg.embedding_dim) and (
                f"hidden_states (noisy image embedding) must be (B, {cfg.embedding_dim}), "
                f"got {tuple(hidden_states.shape)}"),
            tuple(proj_embedding.shape) != (B, cfg.text_embed_dim) and (
                f"proj_embedding (CLIP text embedding) must be ({B}, {cfg.text_embed_dim}), "
                f"got {tuple(proj_embedding.shape)}"),
            tuple(encoder_hidden_states.shape) != (B, T, cfg.embedding_dim) and (
                f"encoder_hidden_states (CLIP last hidden state) must be ({B}, {T}, {cfg.embedding_dim}), "
                f"got {tuple(encoder_hidden_states.shape)}"),
            mask_shape != (B, T) and (
                f"attention_mask must be a ({B}, {T}) bool tensor (True = real token), got {mask_shape}"),
            check_timestep(timestep, B),
        ])

    def normalize(self, image_embed: torch.Tensor) -> torch.Tensor:
        """CLIP image embedding -> the prior's normalised space."""
        return (image_embed - self.clip_mean) / self.clip_std

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        """The prior's normalised space -> CLIP image embedding (diffusers' post_process_latents)."""
        return x * self.clip_std + self.clip_mean


@dataclass
class PriorPrefix:
    """Per block, the keys and values (B, heads, 78, head_dim) of the prior's constant tokens,
    and the mask rows (B, 1, 3, 81) of the 3 tokens that change with the step."""

    keys_values: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    def select(self, index: torch.Tensor) -> "PriorPrefix":
        """The rows ``index`` (e.g. each prompt repeated per image, [uncond; cond])."""
        return PriorPrefix([(k[index], v[index]) for k, v in self.keys_values], self.mask[index])
