"""CLIP text and image towers (OpenCLIP ViT-bigG/14, the encoders of Kandinsky 2.2's prior).

Both towers are the same pre-LayerNorm transformer (Radford et al. 2021, "Learning
Transferable Visual Models From Natural Language Supervision"):

    text:  token + position embeddings -> N x TransformerBlock (causal) -> LayerNorm
           -> hidden state at the end-of-text token -> text_projection
    image: 14x14 patches -> [class token; patches] + position embeddings -> LayerNorm
           -> N x TransformerBlock -> LayerNorm of the class token -> visual_projection

Module names (hook them by name): ``token_embedding``, ``position_embedding``,
``patch_embedding``, ``class_embedding``, ``pre_norm``, ``blocks.{i}`` with
``norm1 / attn.{q,k,v,out}_proj / norm2 / mlp.{fc1,fc2}``, ``final_norm``,
``post_norm``, ``text_projection``, ``visual_projection``.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn as nn

from kandinsky.attention import attention
from kandinsky.checks import check_tensor, fail
from kandinsky.config import ComponentConfig, ConfigError, any_sign
from kandinsky.layers import MLP, Model, TransformerBlock

# --------------------------------------------------------------------------- configs
# Defaults are the reference library's (transformers' CLIPTextConfig / CLIPVisionConfig),
# so a config.json that leaves a key out means the same network here as there.


# Generic keys of transformers' PretrainedConfig that a full config.json may hold (transformers
# 5 writes the first three with `to_json_file(use_diff=False)`; transformers 4 wrote them all):
# classification, generation and encoder-decoder settings no CLIP tower reads.
GENERIC_KEYS = frozenset({
    "chunk_size_feed_forward", "is_encoder_decoder", "problem_type",
    "add_cross_attention", "bad_words_ids", "begin_suppress_tokens", "cross_attention_hidden_size",
    "decoder_start_token_id", "diversity_penalty", "do_sample", "early_stopping", "encoder_no_repeat_ngram_size",
    "exponential_decay_length_penalty", "finetuning_task", "forced_bos_token_id", "forced_eos_token_id",
    "is_decoder", "length_penalty", "max_length", "min_length", "no_repeat_ngram_size", "num_beam_groups",
    "num_beams", "num_labels", "num_return_sequences", "output_scores", "prefix", "remove_invalid_values",
    "repetition_penalty", "return_dict_in_generate", "sep_token_id", "suppress_tokens", "task_specific_params",
    "temperature", "tf_legacy_loss", "tie_encoder_decoder", "tie_word_embeddings", "tokenizer_class", "top_k",
    "top_p", "torchscript", "typical_p", "use_bfloat16",
    # transformers 4 pruned these heads at init; the tensors' shapes then differ from the
    # config's and load_component refuses them as misshapen (transformers 5 dropped the key)
    "pruned_heads",
})


# Keys of both towers that change nothing we compute: `dropout` is read by no CLIP layer of the reference.
TOWER_IGNORED = frozenset({"dropout"}) | GENERIC_KEYS


def _fixed(class_name: str, model_type: str) -> dict:
    """A tower's FIXED keys. attention_dropout: the reference drops attention weights in train
    mode; we implement none."""
    return {"architectures": [class_name], "model_type": model_type, "attention_dropout": 0.0}


@dataclasses.dataclass
class CLIPTowerConfig(ComponentConfig):
    """The keys both towers' config.json hold (defaults: transformers' CLIPTextConfig)."""

    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def check_sizes(self, source: str = "config.json") -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"{source}: hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}."
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(
                f"{source}: hidden_act={self.hidden_act!r} is not supported by kandinsky's CLIP "
                f"(it implements {sorted(ACTIVATIONS)})."
            )


@dataclasses.dataclass
class CLIPTextConfig(CLIPTowerConfig):
    """``text_encoder/config.json`` of a CLIPTextModelWithProjection."""

    CLASS_NAME: ClassVar[str] = "CLIPTextModelWithProjection"
    FIXED: ClassVar[dict] = _fixed(CLASS_NAME, "clip_text_model")
    # bos/pad ids are the tokenizer's business (no padding_idx in the embedding)
    IGNORED: ClassVar[frozenset] = frozenset({"bos_token_id", "pad_token_id"}) | TOWER_IGNORED

    vocab_size: int = 49408
    max_position_embeddings: int = 77
    # Picks the pooled position: 2 (legacy configs, Kandinsky 2.2's) means "the largest
    # token id", anything else means "the first occurrence of this id" (transformers' rule).
    eos_token_id: int = any_sign(49407)


@dataclasses.dataclass
class CLIPVisionConfig(CLIPTowerConfig):
    """``image_encoder/config.json`` of a CLIPVisionModelWithProjection (defaults: transformers')."""

    CLASS_NAME: ClassVar[str] = "CLIPVisionModelWithProjection"
    FIXED: ClassVar[dict] = _fixed(CLASS_NAME, "clip_vision_model")
    IGNORED: ClassVar[frozenset] = TOWER_IGNORED

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224  # one side: square images and patches only
    patch_size: int = 32

    def check_sizes(self, source: str = "config.json") -> None:
        super().check_sizes(source)
        if self.patch_size > self.image_size:
            raise ConfigError(f"{source}: patch_size={self.patch_size} is larger than image_size={self.image_size}.")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# --------------------------------------------------------------------------- blocks
class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation of OpenAI's CLIP checkpoints."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


# config.json `hidden_act` -> activation ("gelu" is the exact, erf-based GELU)
ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


class Attention(nn.Module):
    """Multi-head self-attention with separate query / key / value projections."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def token_layout(self) -> dict:
        """What the keys of this layer's attention are (kandinsky.capture reads it): plain self-attention."""
        return {"kind": "self"}

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        B, L, D = x.shape
        q = self.q_proj(x).view(B, L, self.heads, -1).transpose(1, 2)  # (B, heads, L, D/heads)
        k = self.k_proj(x).view(B, L, self.heads, -1).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.heads, -1).transpose(1, 2)
        y = attention(q, k, v, mask=mask, causal=causal)  # (B, heads, L, D/heads)
        y = y.transpose(1, 2).reshape(B, L, D)  # (B, L, D)
        return self.out_proj(y)


def _blocks(cfg) -> nn.ModuleList:
    """The tower's pre-LayerNorm blocks (norm1, attn, norm2, mlp), called as block(x, mask=..., causal=...)."""
    width = cfg.hidden_size
    return nn.ModuleList(
        TransformerBlock(width, Attention(width, cfg.num_attention_heads),
                         MLP(width, cfg.intermediate_size, ACTIVATIONS[cfg.hidden_act]()), cfg.layer_norm_eps)
        for _ in range(cfg.num_hidden_layers)
    )


# --------------------------------------------------------------------------- text tower
@dataclasses.dataclass
class TextEncoderOutput:
    text_embeds: torch.Tensor  # (B, projection_dim): projected state at the end-of-text token
    last_hidden_state: torch.Tensor  # (B, L, hidden_size): every token after the final LayerNorm


class TextEncoder(Model):
    """CLIP text tower with its projection (hub class CLIPTextModelWithProjection)."""

    WEIGHT, VARIABLE = "token_embedding.weight", "text_encoder"  # dtype / device; what users call it (layers.Model)

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        width = config.hidden_size
        self.token_embedding = nn.Embedding(config.vocab_size, width)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, width)
        self.blocks = _blocks(config)
        self.final_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.text_projection = nn.Linear(width, config.projection_dim, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TextEncoderOutput:
        """input_ids: (B, L) long; attention_mask: optional (B, L), 1/True = real token.

        Without a mask every token sees itself and the tokens before it (causal);
        with one, padded positions are also hidden from every query.
        """
        self.check_inputs(input_ids, attention_mask)
        B, L = input_ids.shape
        x = self.token_embedding(input_ids) + self.position_embedding.weight[:L]  # (B, L, width)
        mask = None if attention_mask is None else causal_padding_mask(attention_mask, L)  # (B, 1, L, L)
        for block in self.blocks:
            x = block(x, mask=mask, causal=mask is None)
        x = self.final_norm(x)
        pooled = x[torch.arange(B, device=x.device), self.end_of_text(input_ids)]  # (B, width)
        return TextEncoderOutput(text_embeds=self.text_projection(pooled), last_hidden_state=x)

    def check_inputs(self, input_ids, attention_mask) -> None:
        """Clear errors for wrong types, shapes and devices (kandinsky.checks). Token ids are not
        range-checked: that would read the data; an id >= vocab_size fails in the embedding."""
        check_tensor(self, "input_ids", input_ids, kind="int", hint=" of token ids (kandinsky.clip.Tokenizer)")
        check_tensor(self, "attention_mask", attention_mask, kind="any", optional=True)
        positions = self.config.max_position_embeddings
        fail(self, [
            input_ids.ndim != 2 and f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}",
            input_ids.ndim == 2 and input_ids.shape[1] > positions and (
                f"{input_ids.shape[1]} tokens, but the text encoder has {positions} positions"),
            attention_mask is not None and attention_mask.shape != input_ids.shape and (
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}"),
        ])

    def end_of_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B,) index of the token whose state is pooled (transformers' rule)."""
        if self.config.eos_token_id == 2:
            # legacy configs (Kandinsky 2.2's): end-of-text is the largest id of the vocabulary
            return input_ids.argmax(dim=-1)
        return (input_ids == self.config.eos_token_id).int().argmax(dim=-1)  # its first occurrence


def causal_padding_mask(attention_mask: torch.Tensor, length: int) -> torch.Tensor:
    """(B, L) padding mask -> (B, 1, L, L) bool: query i may attend key j <= i that is a real token."""
    positions = torch.arange(length, device=attention_mask.device)
    causal = positions[None, :] <= positions[:, None]  # (L, L): key j <= query i
    return causal[None, None] & attention_mask.bool()[:, None, None, :]


# --------------------------------------------------------------------------- image tower
class ImageEncoder(Model):
    """CLIP vision tower with its projection (hub class CLIPVisionModelWithProjection)."""

    WEIGHT, VARIABLE = "patch_embedding.weight", "image_encoder"  # dtype / device; what users call it (layers.Model)

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        width, patch = config.hidden_size, config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, width, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.position_embedding = nn.Embedding(config.num_patches + 1, width)
        self.pre_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.blocks = _blocks(config)
        self.post_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.visual_projection = nn.Linear(width, config.projection_dim, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: (B, C, image_size, image_size), normalised -> image embeddings (B, projection_dim)."""
        self.check_inputs(pixel_values)
        B = pixel_values.shape[0]
        x = self.patch_embedding(pixel_values.to(self.dtype))  # (B, width, H/P, W/P)
        x = x.flatten(2).transpose(1, 2)  # (B, N, width)
        cls = self.class_embedding.expand(B, 1, -1)  # (B, 1, width)
        x = torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (B, N+1, width)
        x = self.pre_norm(x)
        for block in self.blocks:
            x = block(x)
        pooled = self.post_norm(x[:, 0])  # (B, width): the class token
        return self.visual_projection(pooled)  # (B, projection_dim)

    def check_inputs(self, pixel_values) -> None:
        """Clear errors for wrong types, shapes and devices (kandinsky.checks). Floating pixels of
        another dtype are cast to the weights' (as transformers does); integer pixels are refused:
        they are raw images that need ImagePreprocessor (resize, crop, CLIP mean / std)."""
        cfg = self.config
        shape = (cfg.num_channels, cfg.image_size, cfg.image_size)
        check_tensor(self, "pixel_values", pixel_values, kind="float",
                     hint=" of CLIP-normalised pixels (make it from images with kandinsky.clip.ImagePreprocessor)")
        fail(self, [
            (pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != shape) and (
                f"the image encoder takes pixel_values of shape (B, {shape[0]}, {shape[1]}, {shape[2]}), got "
                f"{tuple(pixel_values.shape)}; ImagePreprocessor resizes and crops images to that"),
        ])
