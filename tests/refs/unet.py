"""Tiny random reference UNets (diffusers UNet2DConditionModel) for the three Kandinsky 2.2
decoder variants, saved once per session in the hub's folder layout.

Every fixture returns ``(folder, reference_model)``: ``folder`` holds ``config.json`` and the
weights exactly as ``save_pretrained`` writes them (load it with
``weights_convert.load_component(folder)``), ``reference_model`` is the diffusers model in
eval mode with every parameter randomized (``tests.helpers.randomize_``).

Sizes are in UNET_TINY (shared by the three variants); pipeline fixtures pairing these UNets
with a tiny prior / CLIP need an image embedding of width ``UNET_TINY["encoder_hid_dim"]``
(32) and latents whose height and width are multiples of 8 (four levels).
"""
from __future__ import annotations


import pytest
import torch

from kandinsky.demo import UNET_VARIANTS as DEMO_UNET_VARIANTS
from tests.helpers import randomize_
from tests.refs import save_diffusers_forms, saved_pretrained, tiny_kwargs

# kandinsky.demo's tiny UNet with other sizes (the full-size hub values in comments) and the hub's other
# architecture keys written out; in_channels / addition_embed_type: UNET_VARIANTS (the same three as the demo's).
# As the demo's: attention_head_dim 16 (hub 64 channels per head: here 4, 4, 6 heads), encoder_hid_dim 32 (hub
# 1280: the width of image_embeds), norm_num_groups 8 (hub 32), out_channels 8 (eps + variance, as the hub).
UNET_TINY = tiny_kwargs(
    "unet",
    block_out_channels=(32, 64, 64, 96),  # (384, 768, 1152, 1536); time embedding width 4 * 32
    layers_per_block=2,  # 3
    cross_attention_dim=24,  # 768: width of the 32 image tokens
    addition_embed_type_num_heads=64,
    flip_sin_to_cos=True,
    freq_shift=0,
    act_fn="silu",
    sample_size=16,
)
UNET_VARIANTS = {name: {"in_channels": 4, "addition_embed_type": "image", **changes}
                 for name, changes in DEMO_UNET_VARIANTS.items()}  # "decoder", "inpaint", "controlnet"


def tiny_unet_config(variant: str = "decoder", **overrides) -> dict:
    """kwargs for diffusers' UNet2DConditionModel of a tiny variant ("decoder", "inpaint", "controlnet")."""
    return {**UNET_TINY, **UNET_VARIANTS[variant], **overrides}


def make_reference_unet(variant: str = "decoder", seed: int = 0, **overrides):
    """A randomized diffusers UNet2DConditionModel (eval mode) for a tiny variant."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel(**tiny_unet_config(variant, **overrides))
    return randomize_(model, seed=seed).eval()


def _saved(tmp_path_factory, variant: str, seed: int, name: str):
    return saved_pretrained(tmp_path_factory, name, make_reference_unet(variant, seed), "unet")


@pytest.fixture(scope="session")
def unet_checkpoint(tmp_path_factory):
    """(folder, reference): tiny text2img/img2img decoder UNet (in_channels 4), safetensors."""
    return _saved(tmp_path_factory, "decoder", 0, "unet_decoder")


@pytest.fixture(scope="session")
def unet_inpaint_checkpoint(tmp_path_factory):
    """(folder, reference): tiny inpainting UNet (in_channels 9 = latents 4 + masked-image latents 4
    + mask 1), safetensors."""
    return _saved(tmp_path_factory, "inpaint", 1, "unet_inpaint")


@pytest.fixture(scope="session")
def unet_controlnet_checkpoint(tmp_path_factory):
    """(folder, reference): tiny ControlNet-depth UNet (addition_embed_type "image_hint",
    in_channels 8 = latents 4 + hint 4; call it with a (B, 3, 8h, 8w) hint), safetensors."""
    return _saved(tmp_path_factory, "controlnet", 2, "unet_controlnet")


@pytest.fixture(scope="session")
def unet_checkpoint_forms(tmp_path_factory, unet_checkpoint):
    """(folders, reference): the decoder UNet of ``unet_checkpoint`` saved in the other file forms
    the hub uses. ``folders`` maps a form to its folder:

        "bin"      diffusion_pytorch_model.bin (safe_serialization=False)
        "fp16"     diffusion_pytorch_model.fp16.safetensors, float16 tensors (variant="fp16");
                   the reference's fp32 weights rounded to fp16
        "sharded"  diffusion_pytorch_model-0000k-of-0000n.safetensors + .index.json
    """
    _, model = unet_checkpoint
    return save_diffusers_forms(model, tmp_path_factory.mktemp("unet_forms"), "200KB", sub="unet"), model
