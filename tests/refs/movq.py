"""Session fixtures: a tiny random reference MoVQ (diffusers VQModel, norm_type "spatial").

Sizes (``MOVQ_TINY_CONFIG``): the real model's topology (4 levels, attention at the
lowest resolution, SpatialNorm decoder) with widths (32, 32, 64, 64), one ResBlock per
encoder level (two per decoder level), 4 latent channels, a 64-entry codebook. The
downsampling factor is 8 as in the real model, so:

    images   (B, 3, H, W)        H, W multiples of 8
    latents  (B, 4, H/8, W/8)    a UNet paired with it takes in_channels=4 (out_channels=8
                                 with learned variance, as Kandinsky's)

norm_num_groups is 8 (the encoder's GroupNorms); the decoder's SpatialNorms always use
32 groups, so every width is a multiple of 32. Every weight is random and non-zero
(``randomize_``). Folders are written by ``save_pretrained``: each holds config.json +
weights, i.e. the ``movq/`` sub-folder of a hub repo.
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers import randomize_
from tests.refs import save_diffusers_forms, saved_pretrained, tiny_kwargs

# kandinsky.demo's tiny MoVQ, with the keys the real config.json writes besides
MOVQ_TINY_CONFIG = tiny_kwargs("movq", act_fn="silu", sample_size=32, scaling_factor=0.18215)


def make_reference_movq(config: dict | None = None, seed: int = 0):
    """A randomized diffusers VQModel in eval mode (default: MOVQ_TINY_CONFIG)."""
    from diffusers import VQModel

    torch.manual_seed(seed)
    model = VQModel(**(config or MOVQ_TINY_CONFIG))
    randomize_(model, seed=seed)
    return model.eval()


@pytest.fixture(scope="session")
def movq_reference():
    """The tiny randomized reference VQModel (MOVQ_TINY_CONFIG, seed 0), eval mode."""
    return make_reference_movq()


@pytest.fixture(scope="session")
def movq_checkpoint(tmp_path_factory, movq_reference):
    """(folder, reference_model): the tiny MoVQ saved as config.json + diffusion_pytorch_model.safetensors."""
    return saved_pretrained(tmp_path_factory, "movq", movq_reference, "movq")


@pytest.fixture(scope="session")
def movq_checkpoint_forms(tmp_path_factory, movq_reference, movq_checkpoint):
    """{form: folder} for the same tiny MoVQ written in every file form the hub uses.

    "safetensors": diffusion_pytorch_model.safetensors
    "bin":         diffusion_pytorch_model.bin (safe_serialization=False)
    "fp16":        diffusion_pytorch_model.fp16.safetensors (variant="fp16", float16 tensors)
    "sharded":     diffusion_pytorch_model-0000x-of-0000N.safetensors + .index.json
    The reference weights are movq_reference's (rounded to float16 in "fp16").
    """
    folder, _ = movq_checkpoint
    return {"safetensors": folder, **save_diffusers_forms(movq_reference, tmp_path_factory.mktemp("movq_forms"), "200KB")}
