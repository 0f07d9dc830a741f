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
from tests.helpers import (
    BF16_TOL,
    combined_reference,
    gen,
    reference_variant,
    rel_err,
    repaint_mask,
    rgb,
    unit,
)

TOL = 1e-4
SIZE = dict(height=64, width=64)
STEPS = dict(num_inference_steps=2, prior_num_inference_steps=2)


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
def combined_inpaint(prior_pipeline_folder, inpaint_pipeline_folder):
    """(ours via Kandinsky.from_pretrained(decoder, prior=...), reference combined inpaint pipeline)."""
    ours = Kandinsky.from_pretrained(inpaint_pipeline_folder[0], prior=prior_pipeline_folder[0])
    ref = combined_reference("KandinskyV22InpaintCombinedPipeline", prior_pipeline_folder[1],
                             inpaint_pipeline_folder[1])
    return ours, ref


@pytest.fixture(scope="module")
def combined_controlnet(prior, controlnet_pipeline_folder):
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
    ours, base = text2img
    ref = reference_variant(base, "KandinskyV22Img2ImgCombinedPipeline")
    kw = dict(negative_prompt="a blue dog", num_images_per_prompt=2, strength=0.5, **SIZE,
              num_inference_steps=4, prior_num_inference_steps=2)
    image = rgb(1)
    got = ours.img2img("a red cat", image, generator=gen(2), output_type="np", progress=False, **kw).images
    exp = ref("a red cat", image=image, generator=gen(2), output_type="np", **kw).images
    assert got.shape == (2, 64, 64, 3)
    assert rel_err(torch.from_numpy(got), torch.from_numpy(exp)) < TOL


def test_inpaint(combined_inpaint):
    ours, ref = combined_inpaint
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
    image = rgb(3, 48, 48)
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
    items, weights = ["a red cat", rgb(4, 40, 40), "a blue dog"], [0.5, 0.3, 0.2]
    g = gen(7)
    out = ref.prior_pipe.interpolate(items, weights, num_inference_steps=2, generator=g, negative_prompt="blurry")
    exp = unit(ref.decoder_pipe(image_embeds=out.image_embeds, negative_image_embeds=out.negative_image_embeds,
                           generator=g, num_inference_steps=2, output_type="pt", **SIZE).images)
    got = ours.interpolate(items, weights, negative_prompt="blurry", generator=gen(7), output_type="pt",
                           progress=False, **SIZE, **STEPS).images
    assert rel_err(got, exp) < TOL


def test_controlnet(prior, combined_controlnet):
    """controlnet = prior then decoder controlnet, one generator; one hint for every image."""
    ours, decoder_ref = combined_controlnet
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


def test_controlnet_img2img(prior, combined_controlnet):
    """controlnet_img2img (new at the prompt level) = the reference prior, then the reference's
    controlnet img2img pipeline, one generator."""
    ours, decoder_ref = combined_controlnet
    prior_ref = prior[1]
    hint = torch.rand(1, 3, 64, 64, generator=gen(12))
    image = rgb(12)
    g = gen(13)
    embeds, negative = prior_ref("a robot", num_inference_steps=2, generator=g, return_dict=False)
    ref = reference_variant(decoder_ref, "KandinskyV22ControlnetImg2ImgPipeline")
    exp = ref(image_embeds=embeds, negative_image_embeds=negative, image=image, hint=hint, strength=0.5,
              generator=g, num_inference_steps=2, output_type="np", **SIZE).images
    got = ours.controlnet_img2img("a robot", image, hint, strength=0.5, generator=gen(13), output_type="np",
                                  progress=False, **SIZE, **STEPS).images
    assert rel_err(torch.from_numpy(got), torch.from_numpy(exp)) < TOL


def test_emb2emb(text2img):
    """emb2emb (new at the prompt level) = the reference's KandinskyV22PriorEmb2EmbPipeline, then its
    decoder, one generator."""
    ours, ref = text2img
    image = rgb(14, 48, 48)
    g = gen(15)
    emb2emb = reference_variant(ref.prior_pipe, "KandinskyV22PriorEmb2EmbPipeline")
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


# --------------------------------------------------------------------------- deviations from the reference
def test_combined_reference_cannot_take_decoder_latents(text2img):
    """diffusers' combined pipeline hands ``latents`` to the prior: decoder-shaped latents fail
    there. Ours takes them (``latents``) and equals the reference's two pipelines chained by hand."""
    ours, ref = text2img
    latents = torch.randn(1, 4, 8, 8, generator=gen(18))
    kw = dict(**SIZE, num_inference_steps=2, prior_num_inference_steps=2)
    with pytest.raises(ValueError, match="Unexpected latents shape"):
        ref("a red cat", latents=latents, generator=gen(19), **kw)
    got = ours.text2img("a red cat", latents=latents, generator=gen(19), output_type="latent", progress=False,
                        **kw).images
    g = gen(19)
    e, n = ref.prior_pipe("a red cat", generator=g, num_inference_steps=2, return_dict=False)
    exp = ref.decoder_pipe(image_embeds=e, negative_image_embeds=n, latents=latents, generator=g,
                           num_inference_steps=2, output_type="latent", **SIZE).images
    assert rel_err(got, exp) < TOL


def test_one_picture_per_prompt_with_several_images_per_prompt(prior_pipeline_folder, decoder_pipeline_folder,
                                                              controlnet_pipeline_folder):
    """Kandinsky with B prompts, B pictures (or hints) and num_images_per_prompt = n: each picture
    serves its prompt's n images, as the reference prior and decoder chained by hand with every
    picture repeated n times (the reference's combined pipeline fails on this)."""
    prior_folder, prior_ref = prior_pipeline_folder
    prompts, pictures = ["a red cat", "a blue dog"], [rgb(30), rgb(31)]
    kw = dict(**SIZE, num_inference_steps=2, num_images_per_prompt=2)

    folder, ref = decoder_pipeline_folder
    ref = reference_variant(ref, "KandinskyV22Img2ImgPipeline")
    ours = Kandinsky.from_pretrained(folder, prior=prior_folder)
    got = ours.img2img(prompts, pictures, strength=1.0, prior_num_inference_steps=2, generator=gen(32),
                       output_type="latent", progress=False, **kw).images
    g = gen(32)
    e, n = prior_ref(prompts, num_images_per_prompt=2, num_inference_steps=2, generator=g, return_dict=False)
    repeated = [pictures[0], pictures[0], pictures[1], pictures[1]]
    exp = ref(image_embeds=e, image=repeated, negative_image_embeds=n, strength=1.0, generator=g,
              output_type="latent", **SIZE, num_inference_steps=2).images
    assert got.shape == (4, 4, 8, 8)
    assert rel_err(got, exp) < TOL

    folder, ref = controlnet_pipeline_folder
    ours = Kandinsky.from_pretrained(folder, prior=prior_folder)
    hints = torch.rand(2, 3, 64, 64, generator=gen(33))
    got = ours.controlnet(prompts, hints, prior_num_inference_steps=2, generator=gen(34), output_type="pt",
                          progress=False, **kw).images
    g = gen(34)
    e, n = prior_ref(prompts, num_images_per_prompt=2, num_inference_steps=2, generator=g, return_dict=False)
    exp = unit(ref(image_embeds=e, negative_image_embeds=n, hint=hints.repeat_interleave(2, dim=0), generator=g,
              output_type="pt", **SIZE, num_inference_steps=2).images)
    assert rel_err(got, exp) < TOL


# --------------------------------------------------------------------------- dtypes, devices, compile
def test_bfloat16_chain_and_to(prior_pipeline_folder, decoder_pipeline_folder):
    """The whole chain loaded in bf16 runs on the CPU and stays close to the fp32 reference;
    ``.to(dtype=bf16)`` on an fp32 pipeline gives exactly the bf16-loaded result."""
    (prior_folder, prior_ref), (decoder_folder, decoder_ref) = prior_pipeline_folder, decoder_pipeline_folder
    ref = combined_reference("KandinskyV22CombinedPipeline", prior_ref, decoder_ref)
    kw = dict(negative_prompt="a dog", **SIZE, num_inference_steps=2, prior_num_inference_steps=2)
    half = Kandinsky.from_pretrained(decoder_folder, prior=prior_folder, dtype=torch.bfloat16)
    assert half.prior.dtype == half.decoder.dtype == torch.bfloat16
    got = half.text2img("a red cat", generator=gen(26), output_type="pt", progress=False, **kw).images
    assert got.dtype == torch.bfloat16
    exp = unit(ref("a red cat", generator=gen(26), output_type="pt", **kw).images)
    assert rel_err(got.float(), exp) < BF16_TOL
    arr = half.text2img("a red cat", generator=gen(26), output_type="np", progress=False, **kw).images
    assert arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1

    moved = Kandinsky.from_pretrained(decoder_folder, prior=prior_folder).to(dtype=torch.bfloat16)
    assert moved.prior.dtype == moved.decoder.dtype == torch.bfloat16
    again = moved.text2img("a red cat", generator=gen(26), output_type="pt", progress=False, **kw).images
    assert torch.equal(again, got)


def test_pipe_to_dtype_and_devices(prior_pipeline_folder, decoder_pipeline_folder, monkeypatch):
    """``.to(bfloat16)`` moves both stages; a device that does not exist or is no device is refused
    before any weight is read."""
    decoder, prior = decoder_pipeline_folder[0], prior_pipeline_folder[0]
    pipe = Kandinsky.from_pretrained(decoder, prior=prior).to(torch.bfloat16)
    assert pipe.prior.dtype == pipe.decoder.dtype == torch.bfloat16
    import kandinsky.pipelines.decoder as decoder_module
    import kandinsky.pipelines.prior as prior_module

    monkeypatch.setattr(decoder_module, "load_component", lambda *a, **k: pytest.fail("weights were read"))
    monkeypatch.setattr(prior_module, "load_component", lambda *a, **k: pytest.fail("weights were read"))
    for device in ("cuda:7", "nonsense"):
        with pytest.raises(ValueError, match="device"):
            Kandinsky.from_pretrained(decoder, prior=prior, device=device)
        with pytest.raises(ValueError, match="device"):
            PriorPipeline.from_pretrained(prior, device=device)


def test_compile_keeps_outputs(prior_pipeline_folder, decoder_pipeline_folder):
    """Kandinsky.compile() (here with the eager backend: the same tracing, no C++ build) gives the
    same latents."""
    pipe = Kandinsky.from_pretrained(decoder_pipeline_folder[0], prior=prior_pipeline_folder[0])
    kw = dict(output_type="latent", progress=False, **SIZE, **STEPS)
    plain = pipe.text2img("a red cat", generator=gen(3), **kw).images
    compiled = pipe.compile(backend="eager").text2img("a red cat", generator=gen(3), **kw).images
    assert torch.allclose(compiled, plain, atol=1e-5)


# --------------------------------------------------------------------------- arguments
def test_non_finite_and_misnamed_arguments(text2img):
    ours, _ = text2img
    kw = dict(progress=False, **SIZE, **STEPS)
    with pytest.raises(ValueError, match="`weights\\[i\\]` must be a finite number"):
        ours.interpolate(["a", "b"], [0.5, float("nan")], **kw)
    with pytest.raises(ValueError, match="`prior_latents` must have shape"):
        ours.text2img("a", prior_latents=torch.zeros(3, 7), **kw)
    with pytest.raises(TypeError, match="unexpected argument.*negative_prompt"):
        ours.variations(rgb(0), negative_prompt="x", progress=False, num_inference_steps=2, **SIZE)
