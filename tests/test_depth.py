"""UNet depth is a size: 1-, 2- and 3-level UNets saved by diffusers load, match the reference, and
run through every decoder task (diffusers' own Kandinsky 2.2 test configs use 2 levels)."""
from __future__ import annotations

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch

from kandinsky import DecoderPipeline
from kandinsky.unet.model import block_types
from tests.helpers import rel_err, unit
from tests.refs.decoder_pipeline import UNET_OUT_SCALE, _scale_, make_reference_scheduler
from tests.refs.unet import make_reference_unet
from weights_convert import load_component

TOL = 1e-4
WIDTHS = {1: (32,), 2: (32, 64), 3: (32, 64, 64)}


def depth_overrides(depth: int) -> dict:
    down, up = block_types(depth)
    return dict(block_out_channels=WIDTHS[depth], down_block_types=tuple(down), up_block_types=tuple(up))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("variant", ["decoder", "inpaint", "controlnet"])
def test_shallow_unet_matches_reference(tmp_path, depth, variant):
    ref = make_reference_unet(variant, seed=depth, **depth_overrides(depth))
    ref.save_pretrained(tmp_path)
    ours = load_component(tmp_path)
    assert ours.config.depth == depth and ours.config.downsampling_factor == 2 ** (depth - 1)
    g = gen(depth)
    sample = torch.randn(2, 4, 8, 16, generator=g)
    embeds = torch.randn(2, 32, generator=g)
    kwargs, extra = {}, {}
    if variant == "inpaint":
        sample = torch.randn(2, 9, 8, 16, generator=g)
    if variant == "controlnet":
        hint = torch.rand(2, 3, 64, 128, generator=g)
        kwargs, extra = {"hint": hint}, {"hint": hint}
    with torch.no_grad():
        exp = ref(sample, 321, None, added_cond_kwargs={"image_embeds": embeds, **extra}).sample
        got = ours(sample, 321, embeds, **kwargs)
    assert rel_err(got, exp) < 1e-5


def test_depth_refusals_name_the_key(tmp_path):
    from kandinsky.config import ConfigError
    from kandinsky.unet.model import UNetConfig

    down, up = block_types(2)
    with pytest.raises(ConfigError, match="down_block_types"):
        UNetConfig(block_out_channels=(32, 64, 64), down_block_types=tuple(down), up_block_types=tuple(up),
                   norm_num_groups=8, attention_head_dim=16).validate()


@pytest.fixture(scope="module")
def shallow_decoders(tmp_path_factory):
    """(our pipeline, reference pipeline) for each 2-level decoder variant, sharing the tiny MoVQ."""
    from tests.refs.decoder_pipeline import make_reference_movq

    movq = make_reference_movq()
    out = {}
    for variant, cls in [("decoder", "KandinskyV22Pipeline"), ("inpaint", "KandinskyV22InpaintPipeline"),
                         ("controlnet", "KandinskyV22ControlnetPipeline")]:
        unet = make_reference_unet(variant, seed=40, **depth_overrides(2))
        _scale_(unet.conv_out, UNET_OUT_SCALE)
        ref = getattr(diffusers, cls)(unet=unet, scheduler=make_reference_scheduler(), movq=movq)
        ref.set_progress_bar_config(disable=True)
        folder = tmp_path_factory.mktemp(f"shallow_{variant}")
        ref.save_pretrained(folder)
        out[variant] = (DecoderPipeline.from_pretrained(folder), ref)
    return out


def test_shallow_pipeline_every_task(shallow_decoders):
    """Every decoder task runs on a 2-level UNet; text2img, inpaint and controlnet equal the reference."""
    g = gen(3)
    e, n = torch.randn(1, 32, generator=g), torch.randn(1, 32, generator=g)
    image = PIL.Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy())
    mask = np.zeros((64, 64), dtype=np.float32)
    mask[16:40, 8:48] = 1
    hint = torch.rand(1, 3, 64, 64, generator=g)
    kw = dict(height=64, width=64, num_inference_steps=2, guidance_scale=4.0)

    ours, ref = shallow_decoders["decoder"]
    assert ours.size_multiple == 8 * 2  # MoVQ's 8 x the UNet's one halving
    got = ours.text2img(e, n, generator=gen(1), output_type="pt", progress=False, **kw).images
    exp = unit(ref(image_embeds=e, negative_image_embeds=n, generator=gen(1), output_type="pt", **kw).images)
    assert rel_err(got, exp) < TOL
    got = ours.img2img(e, image, n, strength=0.5, generator=gen(1), output_type="np", progress=False, **kw).images
    exp = diffusers.KandinskyV22Img2ImgPipeline(**ref.components)(
        image_embeds=e, image=image, negative_image_embeds=n, strength=0.5, generator=gen(1), output_type="np",
        **kw).images
    assert rel_err(torch.from_numpy(got), torch.from_numpy(exp)) < TOL
    # a size that is a multiple of 16 but not of 64 is generated as asked
    assert ours.text2img(e, n, output_type="latent", progress=False, **{**kw, "height": 48, "width": 32}
                         ).images.shape == (1, 4, 6, 4)

    ours, ref = shallow_decoders["inpaint"]
    got = ours.inpaint(e, image, mask, n, generator=gen(2), output_type="pt", progress=False, **kw).images
    exp = unit(ref(image_embeds=e, image=image, mask_image=mask.copy(), negative_image_embeds=n, generator=gen(2),
                   output_type="pt", **kw).images)
    assert rel_err(got, exp) < TOL

    ours, ref = shallow_decoders["controlnet"]
    got = ours.controlnet(e, n, hint, generator=gen(4), output_type="pt", progress=False, **kw).images
    exp = unit(ref(image_embeds=e, negative_image_embeds=n, hint=hint, generator=gen(4), output_type="pt",
                   **kw).images)
    assert rel_err(got, exp) < TOL
    out = ours.controlnet_img2img(e, image, n, hint, strength=0.5, output_type="np", progress=False, **kw).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
