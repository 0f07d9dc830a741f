"""Kandinsky (the prompt-level API: prior + decoder sharing one generator) vs diffusers'
KandinskyV22{,Img2Img,Inpaint}CombinedPipeline, and vs the reference's own prior and
decoder pipelines chained by hand for the tasks diffusers has no combined pipeline for
(variations, interpolate, controlnet). Tiny random checkpoints (tests/refs/prior_pipeline.py,
tests/refs/decoder_pipeline.py), same seeds, fp32, 1e-4 relative error.
"""
from __future__ import annotations

import os

import numpy as np
import PIL.Image
import pytest
import torch

from kandinsky.pipelines.combined import Kandinsky
from kandinsky.pipelines.decoder import DecoderPipeline
from kandinsky.pipelines.prior import PriorPipeline
from tests.helpers import unit, rel_err

TOL = 1e-4
SIZE = dict(height=64, width=64)
STEPS = dict(num_inference_steps=2, prior_num_inference_steps=2)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rgb(seed: int, size: int = 64) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def repaint_mask(seed: int, size: int = 64) -> np.ndarray:
    """float {0, 1} (H, W), 1 = repaint: a block and a few scattered pixels."""
    rng = np.random.default_rng(seed)
    m = (rng.random((size, size)) < 0.03).astype(np.float32)
    m[8:30, 20:44] = 1
    return m


def combined_reference(cls_name: str, prior_ref, decoder_ref):
    """A diffusers combined pipeline built from the components of two reference pipelines."""
    import diffusers

    pipe = getattr(diffusers, cls_name)(
        unet=decoder_ref.unet,
        scheduler=decoder_ref.scheduler,
        movq=decoder_ref.movq,
        prior_prior=prior_ref.prior,
        prior_image_encoder=prior_ref.image_encoder,
        prior_text_encoder=prior_ref.text_encoder,
        prior_tokenizer=prior_ref.tokenizer,
        prior_scheduler=prior_ref.scheduler,
        prior_image_processor=prior_ref.image_processor,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def prior(prior_pipeline_folder):
    folder, ref = prior_pipeline_folder
    return PriorPipeline.from_pretrained(folder), ref


@pytest.fixture(scope="module")
def text2img(prior, decoder_pipeline_folder):
    """(ours built from two pipelines, reference combined pipeline)."""
    folder, decoder_ref = decoder_pipeline_folder
    ours = Kandinsky(prior[0], DecoderPipeline.from_pretrained(folder))
    return ours, combined_reference("KandinskyV22CombinedPipeline", prior[1], decoder_ref)


@pytest.fixture(scope="module")
def inpainter(prior_pipeline_folder, inpaint_pipeline_folder):
    """(ours via Kandinsky.from_pretrained(decoder, prior=...), reference combined inpaint pipeline)."""
    ours = Kandinsky.from_pretrained(inpaint_pipeline_folder[0], prior=prior_pipeline_folder[0])
    ref = combined_reference("KandinskyV22InpaintCombinedPipeline", prior_pipeline_folder[1],
                             inpaint_pipeline_folder[1])
    return ours, ref


@pytest.fixture(scope="module")
def controlnet(prior, controlnet_pipeline_folder):
    folder, ref = controlnet_pipeline_folder
    return Kandinsky(prior[0], DecoderPipeline.from_pretrained(folder)), ref


# --------------------------------------------------------------------------- vs the combined pipelines
def test_text2img(text2img):
    ours, ref = text2img
    kw = dict(negative_prompt="a blue dog", num_images_per_prompt=2, **SIZE, **STEPS)
    got = ours.text2img("a red cat", generator=gen(0), output_type="pt", progress=False, **kw).images
    exp = unit(ref("a red cat", generator=gen(0), output_type="pt", **kw).images)
    assert got.shape == (2, 3, 64, 64)
    assert rel_err(got, exp) < TOL


def test_text2img_prompt_list_np(text2img):
    ours, ref = text2img
    kw = dict(negative_prompt=["low quality", "blurry"], **SIZE, **STEPS)
    prompts = ["a red cat", "a blue dog"]
    got = ours.text2img(prompts, generator=gen(1), output_type="np", progress=False, **kw).images
    exp = ref(prompts, generator=gen(1), output_type="np", **kw).images
    assert got.shape == (2, 64, 64, 3)
    assert rel_err(torch.from_numpy(got), torch.from_numpy(exp)) < TOL


def test_img2img(text2img):
    from diffusers import KandinskyV22Img2ImgCombinedPipeline

    ours, base = text2img
    ref = KandinskyV22Img2ImgCombinedPipeline(**base.components)
    ref.set_progress_bar_config(disable=True)
    kw = dict(negative_prompt="a blue dog", num_images_per_prompt=2, strength=0.5, **SIZE,
              num_inference_steps=4, prior_num_inference_steps=2)
    image = rgb(1)
    got = ours.img2img("a red cat", image, generator=gen(2), output_type="np", progress=False, **kw).images
    exp = ref("a red cat", image=image, generator=gen(2), output_type="np", **kw).images
    assert got.shape == (2, 64, 64, 3)
    assert rel_err(torch.from_numpy(got), torch.from_numpy(exp)) < TOL


def test_inpaint(inpainter):
    ours, ref = inpainter
    kw = dict(negative_prompt="a blue dog", **SIZE, **STEPS)
    image, mask = rgb(2), repaint_mask(0)
    got = ours.inpaint("a hat", image, mask, generator=gen(3), output_type="pt", progress=False, **kw).images
    exp = unit(ref("a hat", image=image, mask_image=mask.copy(), generator=gen(3), output_type="pt", **kw).images)
    assert got.shape == (1, 3, 64, 64)
    assert rel_err(got, exp) < TOL


def test_reference_latents_are_our_prior_latents(text2img):
    """The reference combined pipeline hands its ``latents`` to the PRIOR (the decoder draws its
    own noise): that is our ``prior_latents``. Our ``latents`` are the decoder's starting noise."""
    ours, ref = text2img
    prior_latents = torch.randn(1, 32, generator=gen(10))
    kw = dict(**SIZE, **STEPS)
    exp = unit(ref("a red cat", latents=prior_latents, generator=gen(4), output_type="pt", **kw).images)
    got = ours.text2img("a red cat", prior_latents=prior_latents, generator=gen(4), output_type="pt",
                        progress=False, **kw).images
    assert rel_err(got, exp) < TOL

    # both given: the reference's prior then decoder, chained by hand
    latents = torch.randn(1, 4, 8, 8, generator=gen(11))
    g = gen(5)
    embeds, negative = ref.prior_pipe("a red cat", latents=prior_latents, generator=g, num_inference_steps=2,
                                      return_dict=False)
    exp = unit(ref.decoder_pipe(image_embeds=embeds, negative_image_embeds=negative, latents=latents, generator=g,
                                num_inference_steps=2, output_type="pt", **SIZE).images)
    got = ours.text2img("a red cat", prior_latents=prior_latents, latents=latents, generator=gen(5),
                        output_type="pt", progress=False, **kw).images
    assert rel_err(got, exp) < TOL


# --------------------------------------------------------------------------- vs the reference chained by hand
def test_variations(text2img):
    """variations = decoder text2img on the image's CLIP embedding, the zero image's as negative."""
    ours, ref = text2img
    image = rgb(3, size=48)
    prior_ref, decoder_ref = ref.prior_pipe, ref.decoder_pipe
    pixels = prior_ref.image_processor(image, return_tensors="pt").pixel_values
    embeds = prior_ref.image_encoder(pixels).image_embeds
    negative = prior_ref.get_zero_embed(batch_size=1)
    exp = unit(decoder_ref(image_embeds=embeds, negative_image_embeds=negative, num_images_per_prompt=2,
                      generator=gen(6), num_inference_steps=2, output_type="pt", **SIZE).images)
    got = ours.variations(image, num_images_per_prompt=2, generator=gen(6), num_inference_steps=2,
                          output_type="pt", progress=False, **SIZE).images
    assert got.shape == (2, 3, 64, 64)
    assert rel_err(got, exp) < TOL


def test_interpolate(text2img):
    """interpolate = the prior's interpolate, then decoder text2img, one generator for both."""
    ours, ref = text2img
    items, weights = ["a red cat", rgb(4, size=40), "a blue dog"], [0.5, 0.3, 0.2]
    g = gen(7)
    out = ref.prior_pipe.interpolate(items, weights, num_inference_steps=2, generator=g, negative_prompt="blurry")
    exp = unit(ref.decoder_pipe(image_embeds=out.image_embeds, negative_image_embeds=out.negative_image_embeds,
                           generator=g, num_inference_steps=2, output_type="pt", **SIZE).images)
    got = ours.interpolate(items, weights, negative_prompt="blurry", generator=gen(7), output_type="pt",
                           progress=False, **SIZE, **STEPS).images
    assert rel_err(got, exp) < TOL


def test_controlnet(prior, controlnet):
    """controlnet = prior then decoder controlnet, one generator; one hint for every image."""
    ours, decoder_ref = controlnet
    prior_ref = prior[1]
    hint = torch.rand(1, 3, 64, 64, generator=gen(8))
    g = gen(9)
    embeds, negative = prior_ref("a robot", negative_prompt="a cat", num_images_per_prompt=2, num_inference_steps=2,
                                 generator=g, return_dict=False)
    exp = unit(decoder_ref(image_embeds=embeds, negative_image_embeds=negative, hint=hint.repeat(2, 1, 1, 1),
                      generator=g, num_inference_steps=2, output_type="pt", **SIZE).images)
    got = ours.controlnet("a robot", hint, negative_prompt="a cat", num_images_per_prompt=2, generator=gen(9),
                          output_type="pt", progress=False, **SIZE, **STEPS).images
    assert got.shape == (2, 3, 64, 64)
    assert rel_err(got, exp) < TOL


def test_controlnet_img2img(prior, controlnet):
    """controlnet_img2img (new at the prompt level) = the reference prior, then the reference's
    controlnet img2img pipeline, one generator."""
    import diffusers

    ours, decoder_ref = controlnet
    prior_ref = prior[1]
    hint = torch.rand(1, 3, 64, 64, generator=gen(12))
    image = rgb(12)
    g = gen(13)
    embeds, negative = prior_ref("a robot", num_inference_steps=2, generator=g, return_dict=False)
    ref = diffusers.KandinskyV22ControlnetImg2ImgPipeline(**decoder_ref.components)
    ref.set_progress_bar_config(disable=True)
    exp = ref(image_embeds=embeds, negative_image_embeds=negative, image=image, hint=hint, strength=0.5,
              generator=g, num_inference_steps=2, output_type="np", **SIZE).images
    got = ours.controlnet_img2img("a robot", image, hint, strength=0.5, generator=gen(13), output_type="np",
                                  progress=False, **SIZE, **STEPS).images
    assert rel_err(torch.from_numpy(got), torch.from_numpy(exp)) < TOL


def test_emb2emb(text2img):
    """emb2emb (new at the prompt level) = the reference's KandinskyV22PriorEmb2EmbPipeline, then its
    decoder, one generator."""
    import diffusers

    ours, ref = text2img
    image = rgb(14, size=48)
    g = gen(15)
    emb2emb = diffusers.KandinskyV22PriorEmb2EmbPipeline(**ref.prior_pipe.components)
    emb2emb.set_progress_bar_config(disable=True)
    out = emb2emb("a red cat", image, strength=0.5, num_inference_steps=4, generator=g)
    exp = unit(ref.decoder_pipe(image_embeds=out.image_embeds, negative_image_embeds=out.negative_image_embeds,
                                generator=g, num_inference_steps=2, output_type="pt", **SIZE).images)
    got = ours.emb2emb("a red cat", image, prior_strength=0.5, prior_num_inference_steps=4, num_inference_steps=2,
                       generator=gen(15), output_type="pt", progress=False, **SIZE).images
    assert rel_err(got, exp) < TOL


# --------------------------------------------------------------------------- loading
def _decoder_with_card(src, dst, card: str | None):
    """A decoder folder (links to ``src``'s files) with the model card ``card`` (README.md)."""
    dst.mkdir()
    for item in src.iterdir():
        if item.name != "README.md":
            os.symlink(item, dst / item.name)
    if card is not None:
        (dst / "README.md").write_text(card)
    return dst


def test_from_pretrained_reads_the_prior_from_the_model_card(text2img, prior_pipeline_folder,
                                                             decoder_pipeline_folder, tmp_path):
    _, ref = text2img
    card = f"---\nlicense: apache-2.0\nprior:\n- {prior_pipeline_folder[0]}\ntags:\n- kandinsky\n---\n# decoder\n"
    folder = _decoder_with_card(decoder_pipeline_folder[0], tmp_path / "decoder", card)
    ours = Kandinsky.from_pretrained(folder)
    kw = dict(**SIZE, **STEPS)
    got = ours.text2img("a red cat", generator=gen(12), output_type="latent", progress=False, **kw).images
    exp = ref("a red cat", generator=gen(12), output_type="latent", **kw).images
    assert got.shape == (1, 4, 8, 8)
    assert rel_err(got, exp) < TOL


@pytest.mark.parametrize("card", [None, "---\nlicense: apache-2.0\n---\n# no prior named\n"])
def test_from_pretrained_without_prior_in_card(decoder_pipeline_folder, tmp_path, card):
    folder = _decoder_with_card(decoder_pipeline_folder[0], tmp_path / "decoder", card)
    with pytest.raises(ValueError, match=r"names no prior .*pass prior="):
        Kandinsky.from_pretrained(folder)


def test_embedding_size_mismatch(prior, decoder_pipeline_folder):
    from kandinsky.demo import TINY
    from weights_convert import build_model

    decoder = DecoderPipeline.from_pretrained(decoder_pipeline_folder[0])
    unet = build_model({**TINY["unet"], "encoder_hid_dim": 48})  # our prior makes 32-dim embeddings
    wrong = DecoderPipeline(unet, decoder.movq, decoder.scheduler)
    with pytest.raises(ValueError, match="makes 32-dim image embeddings but the decoder expects 48"):
        Kandinsky(prior[0], wrong)


def test_wrong_checkpoint_fails_before_the_prior_runs(text2img, monkeypatch):
    ours, _ = text2img

    class NoPrior:
        def __call__(self, *args, **kwargs):
            raise AssertionError("the prior ran")

    monkeypatch.setattr(ours, "prior", NoPrior())
    with pytest.raises(ValueError, match=r"inpaint\(\) needs a.*inpaint"):
        ours.inpaint("a hat", rgb(0), repaint_mask(0), progress=False, **SIZE, **STEPS)
    with pytest.raises(ValueError, match=r"controlnet\(\) needs a controlnet checkpoint"):
        ours.controlnet("a robot", torch.rand(3, 64, 64), progress=False, **SIZE, **STEPS)
