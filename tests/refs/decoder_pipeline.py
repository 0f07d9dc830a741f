"""Tiny random reference decoder pipelines (diffusers KandinskyV22*Pipeline), saved once per
session with ``save_pretrained`` in the hub's layout (model_index.json, unet/, movq/, scheduler/).

Every fixture returns ``(folder, reference_pipeline)``:

    decoder_pipeline_folder     KandinskyV22Pipeline (text2img UNet, in_channels 4); build the
                                img2img reference with KandinskyV22Img2ImgPipeline(**pipe.components)
    inpaint_pipeline_folder     KandinskyV22InpaintPipeline (in_channels 9)
    controlnet_pipeline_folder  KandinskyV22ControlnetPipeline (addition_embed_type "image_hint");
                                KandinskyV22ControlnetImg2ImgPipeline(**pipe.components) for img2img

All three share one tiny MoVQ (4 levels, so the image -> latent factor is 8 as in the real
model: 64 x 64 images have 8 x 8 latents) and the hub's DDPM scheduler config. The UNets
are tests.refs.unet's tiny ones: image embeddings of width EMBED_DIM (32).
"""
from __future__ import annotations

import json

import pytest
import torch

from kandinsky.demo import DECODER_REPOS
from tests.conftest import DATA
from tests.helpers import randomize_
from tests.refs import tiny_kwargs
from tests.refs.unet import UNET_TINY, make_reference_unet

EMBED_DIM = UNET_TINY["encoder_hid_dim"]  # width of image_embeds for these pipelines

# diffusers VQModel kwargs of the shared tiny MoVQ: kandinsky.demo's, narrower (hub values in comments;
# as the demo's: layers_per_block 1 (hub 2), norm_num_groups 8 (hub 32)).
MOVQ_TINY = tiny_kwargs(
    "movq",
    block_out_channels=(32, 32, 32, 32),  # (128, 256, 256, 512); multiples of 32 (SpatialNorm groups)
    num_vq_embeddings=16,  # 16384
    sample_size=32,
    act_fn="silu",
)


# After randomize_, the output convolutions of the UNet and the MoVQ decoder are scaled down
# so that the predicted noise is ~0.2 and the decoded images ~1 in size: otherwise the random
# UNet's guided noise (std ~5) blows the latents up and "np"/"pil" outputs are almost all
# clamped to 0 or 1, which would make the comparisons of those outputs weak.
UNET_OUT_SCALE = 0.1
MOVQ_OUT_SCALE = 0.3


@torch.no_grad()
def _scale_(conv: torch.nn.Module, factor: float) -> None:
    conv.weight.mul_(factor)
    conv.bias.mul_(factor)


def make_reference_movq(seed: int = 10):
    """The tiny randomized diffusers VQModel (eval mode) shared by the three pipelines."""
    from diffusers import VQModel

    torch.manual_seed(seed)
    movq = randomize_(VQModel(**MOVQ_TINY), seed=seed).eval()
    _scale_(movq.decoder.conv_out, MOVQ_OUT_SCALE)
    return movq


def make_reference_scheduler():
    """The hub decoder's DDPMScheduler (tests/data/kandinsky-2-2-decoder/scheduler)."""
    from diffusers import DDPMScheduler

    config = json.loads((DATA / "kandinsky-2-2-decoder" / "scheduler" / "scheduler_config.json").read_text())
    return DDPMScheduler.from_config(config)


@pytest.fixture(scope="session")
def _decoder_reference_movq():
    return make_reference_movq()


def _saved_pipeline(tmp_path_factory, task: str, seed: int, movq):
    """The reference pipeline of a decoder task ("decoder", "inpaint", "controlnet": its hub class in
    kandinsky.demo.DECODER_REPOS) with the task's tiny UNet, saved. -> (folder, pipeline)."""
    import diffusers

    cls = getattr(diffusers, DECODER_REPOS[task][1])
    unet = make_reference_unet(task, seed)
    _scale_(unet.conv_out, UNET_OUT_SCALE)
    pipe = cls(unet=unet, scheduler=make_reference_scheduler(), movq=movq)
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp(f"{task}_pipeline")
    pipe.save_pretrained(folder)
    return folder, pipe


def _ours(saved):
    """(folder, reference) -> (our DecoderPipeline loaded from the folder, reference)."""
    from kandinsky.pipelines.decoder import DecoderPipeline

    folder, ref = saved
    return DecoderPipeline.from_pretrained(folder), ref


@pytest.fixture(scope="session")
def decoder_pipeline_folder(tmp_path_factory, _decoder_reference_movq):
    """(folder, KandinskyV22Pipeline): tiny text2img / img2img decoder checkpoint."""
    return _saved_pipeline(tmp_path_factory, "decoder", 20, _decoder_reference_movq)


@pytest.fixture(scope="session")
def inpaint_pipeline_folder(tmp_path_factory, _decoder_reference_movq):
    """(folder, KandinskyV22InpaintPipeline): tiny decoder-inpaint checkpoint (UNet in_channels 9)."""
    return _saved_pipeline(tmp_path_factory, "inpaint", 21, _decoder_reference_movq)


@pytest.fixture(scope="session")
def controlnet_pipeline_folder(tmp_path_factory, _decoder_reference_movq):
    """(folder, KandinskyV22ControlnetPipeline): tiny controlnet-depth checkpoint (hint images
    (B, 3, H, W) in [0, 1])."""
    return _saved_pipeline(tmp_path_factory, "controlnet", 22, _decoder_reference_movq)


# Ours loaded from those folders, paired with the reference: (DecoderPipeline, reference pipeline).
@pytest.fixture(scope="session")
def decoder(decoder_pipeline_folder):
    return _ours(decoder_pipeline_folder)


@pytest.fixture(scope="session")
def inpainter(inpaint_pipeline_folder):
    return _ours(inpaint_pipeline_folder)


@pytest.fixture(scope="session")
def controlnet(controlnet_pipeline_folder):
    return _ours(controlnet_pipeline_folder)
