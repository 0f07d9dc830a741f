"""Session fixtures: a tiny random reference KandinskyV22PriorPipeline saved in the hub layout.

Sizes relate like the real checkpoint's: the prior's ``embedding_dim`` equals the CLIP
projection dim (text and image) and the text encoder's hidden size (the prior projects the
text hidden states with ``Linear(embedding_dim, inner_dim)``); the prior's
``num_embeddings`` (77) equals the tokenizer's ``model_max_length``; the image processor's
crop equals the vision tower's ``image_size``.
"""
from __future__ import annotations

import json
import pathlib
import shutil

import pytest
import torch

from kandinsky.demo import PRIOR_SCHEDULER, TINY, bytes_to_unicode
from tests.helpers import randomize_
from tests.refs import tiny_kwargs

# The embedding size of the tiny prior pipeline (image_embeds are (B, PRIOR_EMBED_DIM)).
PRIOR_EMBED_DIM = TINY["prior"]["embedding_dim"]  # 32
# The tiny CLIP vision tower's input size (pixel_values are (B, 3, PRIOR_IMAGE_SIZE, PRIOR_IMAGE_SIZE)).
PRIOR_IMAGE_SIZE = TINY["image_encoder"]["image_size"]  # 32


def write_tiny_clip_tokenizer(folder: pathlib.Path) -> pathlib.Path:
    """Write a small CLIP BPE tokenizer (vocab.json, merges.txt, tokenizer config) into ``folder``.

    Every byte is a token (alone and as word end ``</w>``), plus a few merges, and the two
    special tokens get the HIGHEST ids like in the real CLIP vocab (the text encoder's legacy
    pooling takes the argmax token id as end-of-text).
    """
    from transformers import CLIPTokenizer

    chars = bytes_to_unicode()
    vocab_list = chars + [c + "</w>" for c in chars]
    merges = ["c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>", "b l", "bl u", "blu e</w>"]
    for m in merges:
        vocab_list.append(m.replace(" ", ""))
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=77)
    tok.save_pretrained(folder)
    return folder


def _tokenizer(request, tmp_path_factory):
    """The CLIP author's tiny tokenizer fixture when present, else our own small one."""
    from transformers import CLIPTokenizer

    try:
        folder = request.getfixturevalue("clip_tokenizer_folder")
        if isinstance(folder, tuple):
            folder = folder[0]
    except pytest.FixtureLookupError:
        folder = write_tiny_clip_tokenizer(tmp_path_factory.mktemp("prior_pipeline_tokenizer"))
    return CLIPTokenizer.from_pretrained(folder), pathlib.Path(folder)


def build_reference_prior_pipeline(tokenizer, seed: int = 0):
    """A tiny random diffusers KandinskyV22PriorPipeline (every weight randomized, fp32)."""
    from diffusers import KandinskyV22PriorPipeline, PriorTransformer, UnCLIPScheduler
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # the reference's own

    def clip_kwargs(component, **changes):  # transformers' config classes know their own model_type
        return {k: v for k, v in tiny_kwargs(component, **changes).items() if k not in ("architectures", "model_type")}

    # kandinsky.demo's tiny towers and prior (embeddings of width PRIOR_EMBED_DIM), narrower inside; the text
    # tower pools at the largest token id (eos_token_id 2), as the real checkpoint does
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**clip_kwargs(
        "text_encoder", vocab_size=len(tokenizer), intermediate_size=37, bos_token_id=0, pad_token_id=1))).eval()
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**clip_kwargs(
        "image_encoder", hidden_size=24, intermediate_size=37))).eval()
    prior = PriorTransformer(**tiny_kwargs("prior", attention_head_dim=8)).eval()
    randomize_(text_encoder, seed)
    randomize_(image_encoder, seed + 1)
    causal = prior.causal_attention_mask.clone()  # a non-persistent buffer: keep it
    randomize_(prior, seed + 2)
    prior.causal_attention_mask.copy_(causal)
    with torch.no_grad():  # clip_std scales the output: keep it positive and O(1)
        prior.clip_std.abs_().add_(0.5)

    scheduler = UnCLIPScheduler.from_config(PRIOR_SCHEDULER)  # the real checkpoint's scheduler config
    image_processor = CLIPImageProcessor(crop_size=PRIOR_IMAGE_SIZE, size=PRIOR_IMAGE_SIZE, do_center_crop=True,
                                         do_normalize=True, do_resize=True, image_mean=OPENAI_CLIP_MEAN,
                                         image_std=OPENAI_CLIP_STD, resample=3)
    pipe = KandinskyV22PriorPipeline(prior=prior, image_encoder=image_encoder, text_encoder=text_encoder,
                                     tokenizer=tokenizer, scheduler=scheduler, image_processor=image_processor)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def prior_pipeline_folder(request, tmp_path_factory):
    """(folder, reference_pipeline): a tiny random diffusers ``KandinskyV22PriorPipeline``
    saved with ``save_pretrained`` (hub layout: model_index.json, prior/, text_encoder/,
    image_encoder/, tokenizer/, scheduler/, image_processor/), fp32.

    Embedding size PRIOR_EMBED_DIM = 32: ``image_embeds`` / ``negative_image_embeds`` are
    (B, 32), so a decoder UNet used with it needs ``encoder_hid_dim=32``. The CLIP vision tower
    takes 32x32 pixel values (PRIOR_IMAGE_SIZE). The tokenizer pads to 77 tokens.
    """
    tokenizer, tokenizer_source = _tokenizer(request, tmp_path_factory)
    pipe = build_reference_prior_pipeline(tokenizer)
    folder = tmp_path_factory.mktemp("kandinsky-2-2-prior-tiny")
    pipe.save_pretrained(folder, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):  # the hub's tokenizer folder has them too
        src, dst = tokenizer_source / name, folder / "tokenizer" / name
        if src.exists() and not dst.exists():
            shutil.copy(src, dst)
    return folder, pipe
