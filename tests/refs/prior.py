"""Session fixtures: a tiny random reference diffusion prior (diffusers PriorTransformer).

Sizes (``PRIOR_TINY_CONFIG``): 2 layers, 2 heads x 12 dims = inner width 24,
embedding_dim 16. Like the real model (32 heads x 64 = 2048 inner, embedding_dim
1280) the inner width differs from embedding_dim, so the in/out projections are
exercised. The prior reads:

    hidden_states / proj_embedding   (B, 16)      -> pair it with a tiny CLIP whose
    encoder_hidden_states            (B, 77, 16)     projection_dim == hidden_size == 16
    attention_mask                   (B, 77) bool    and max_position_embeddings == 77

Every weight (clip_mean / clip_std included) is random and non-zero (``randomize_``),
clip_std is made positive; the reference's non-persistent ``causal_attention_mask``
buffer is restored after randomizing (``randomize_`` fills float buffers too). Folders are written by ``save_pretrained``: each holds
``config.json`` + weights, i.e. the ``prior/`` sub-folder of a hub repo.
"""
from __future__ import annotations


import pytest
import torch

from tests.helpers import randomize_
from tests.refs import save_diffusers_forms, saved_pretrained, tiny_kwargs

# kandinsky.demo's tiny prior, narrower (embedding_dim 16, 2 heads x 12 = inner width 24), the optional sizes
# written out as null (the real config.json writes them)
PRIOR_TINY_CONFIG = tiny_kwargs("prior", attention_head_dim=12, embedding_dim=16, time_embed_dim=None,
                                embedding_proj_dim=None, clip_embed_dim=None)


def make_reference_prior(config: dict | None = None, seed: int = 0):
    """A randomized diffusers PriorTransformer in eval mode (default: PRIOR_TINY_CONFIG)."""
    from diffusers import PriorTransformer

    torch.manual_seed(seed)
    model = PriorTransformer(**(config or PRIOR_TINY_CONFIG))
    causal = model.causal_attention_mask.clone()  # a float buffer randomize_ would overwrite
    randomize_(model, seed=seed)
    with torch.no_grad():
        model.causal_attention_mask.copy_(causal)
        model.clip_std.abs_().add_(0.5)  # a standard deviation: positive
    return model.eval()


def prior_inputs(batch: int = 3, dim: int = 16, seq: int = 77, lengths=None, seed: int = 0):
    """Random prior inputs: (hidden_states, proj_embedding, encoder_hidden_states, attention_mask).

    ``lengths`` gives each sample's number of real text tokens (default: 77, 5, 1, ...).
    """
    g = torch.Generator().manual_seed(seed)
    lengths = lengths if lengths is not None else [seq, 5, 1, 12, 40][:batch]
    mask = torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]  # (B, seq) bool
    return (
        torch.randn(batch, dim, generator=g),
        torch.randn(batch, dim, generator=g),
        torch.randn(batch, seq, dim, generator=g),
        mask,
    )


@pytest.fixture(scope="session")
def prior_reference():
    """The tiny randomized reference PriorTransformer (fp32, eval) behind every prior folder."""
    return make_reference_prior()


@pytest.fixture(scope="session")
def prior_checkpoint(tmp_path_factory, prior_reference):
    """(folder, reference_model): tiny prior saved as config.json + diffusion_pytorch_model.safetensors."""
    return saved_pretrained(tmp_path_factory, "prior", prior_reference, "prior")


@pytest.fixture(scope="session")
def prior_checkpoint_forms(tmp_path_factory, prior_checkpoint):
    """Same tiny prior in every file form the hub uses: {form: folder}.

    "safetensors"  diffusion_pytorch_model.safetensors
    "bin"          diffusion_pytorch_model.bin (safe_serialization=False)
    "fp16"         only diffusion_pytorch_model.fp16.safetensors, tensors in float16
                   (compare against the reference re-loaded with variant="fp16")
    "sharded"      diffusion_pytorch_model-0000k-of-0000n.safetensors + index.json
    """
    folder, ref = prior_checkpoint
    return {"safetensors": folder, **save_diffusers_forms(ref, tmp_path_factory.mktemp("prior_forms"), "20KB")}
