"""DecoderPipeline (kandinsky/pipelines/decoder.py) vs diffusers'
KandinskyV22{,Img2Img,Inpaint,Controlnet,ControlnetImg2Img}Pipeline on tiny random checkpoints
(tests/refs/decoder_pipeline.py), same seeds, fp32, 1e-4 relative error: every task and its options
(schedulers, given latents, several images per embedding, generator lists, guidance <= 1, strength,
callbacks, output types, sizes, dtypes), the deliberate deviations from the reference, and the
checks on bad arguments. The picture inputs themselves (forms, modes, masks) are tests/test_images.py's.
"""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from kandinsky.pipelines.decoder import DecoderPipeline
from tests.helpers import BF16_TOL, embeds, gen, reference_variant, rel_err, repaint_mask, rgb, unit, with_ddim
from tests.refs.decoder_pipeline import EMBED_DIM

TOL = 1e-4
STEPS = 2
SIZE = dict(height=64, width=64)
IMG2IMG = "KandinskyV22Img2ImgPipeline"
CONTROLNET_IMG2IMG = "KandinskyV22ControlnetImg2ImgPipeline"


# fixtures `decoder`, `inpainter`, `controlnet`: (our DecoderPipeline, reference) in tests/refs/decoder_pipeline.py


# --------------------------------------------------------------------------- text2img
@pytest.mark.parametrize("scale, batch, per_prompt", [(4.0, 1, 2), (1.0, 2, 1), (0.5, 2, 1)])
def test_text2img(decoder, scale, batch, per_prompt):
    """Guided (two images per embedding) and unguided (guidance_scale <= 1: the positive embedding alone)."""
    ours, ref = decoder
    e, n = embeds(batch, seed=9)
    kw = dict(**SIZE, num_inference_steps=STEPS, guidance_scale=scale, num_images_per_prompt=per_prompt)
    out = ours.text2img(e, n, generator=gen(1), output_type="pt", progress=False, **kw).images
    exp = unit(ref(image_embeds=e, negative_image_embeds=n, generator=gen(1), output_type="pt", **kw).images)
    assert out.shape == (2, 3, 64, 64)
    assert rel_err(out, exp) < TOL


def test_text2img_unguided_non_square(decoder):
    ours, ref = decoder
    e, n = embeds(1, seed=1)
    kw = dict(height=64, width=128, num_inference_steps=STEPS, guidance_scale=1.0)
    out = ours.text2img(e, n, generator=gen(2), output_type="pt", progress=False, **kw).images
    exp = unit(ref(image_embeds=e, negative_image_embeds=n, generator=gen(2), output_type="pt", **kw).images)
    assert out.shape == (1, 3, 64, 128)
    assert rel_err(out, exp) < TOL
    # guidance off needs no negative embedding
    again = ours.text2img(e, None, generator=gen(2), output_type="pt", progress=False, **kw).images
    assert rel_err(again, exp) < TOL


def test_text2img_ddim(decoder_pipeline_folder):
    folder, ref = decoder_pipeline_folder
    ours = DecoderPipeline.from_pretrained(folder, scheduler="ddim")
    ref = with_ddim(ref)
    e, n = embeds(1, seed=2)
    kw = dict(height=64, width=64, num_inference_steps=2, guidance_scale=4.0)
    out = ours.text2img(e, n, generator=gen(3), output_type="pt", progress=False, **kw).images
    exp = unit(ref(image_embeds=e, negative_image_embeds=n, generator=gen(3), output_type="pt", **kw).images)
    assert rel_err(out, exp) < TOL


def test_text2img_given_latents_and_callback(decoder):
    """Given starting latents; a callback that replaces the latents (halves them) after every step."""
    ours, ref = decoder
    e, n = embeds(1, seed=3)
    latents = torch.randn(1, 4, 8, 8, generator=gen(4))
    seen = []

    def ours_cb(state):
        seen.append((state.step, int(state.timestep)))
        assert state.stage == "decoder" and state.x0.shape == state.x.shape
        return state.x * 0.5

    def ref_cb(pipe, step, t, kwargs):
        return {"latents": kwargs["latents"] * 0.5}

    kw = dict(height=64, width=64, num_inference_steps=STEPS, guidance_scale=3.0)
    out = ours.text2img(e, n, latents=latents, generator=gen(5), output_type="latent", progress=False,
                        callback_on_step_end=ours_cb, **kw).images
    exp = ref(image_embeds=e, negative_image_embeds=n, latents=latents, generator=gen(5), output_type="latent",
              callback_on_step_end=ref_cb, **kw).images
    assert rel_err(out, exp) < TOL
    assert seen == [(i, int(t)) for i, t in enumerate(ref.scheduler.timesteps)]


def test_output_types(decoder):
    ours, ref = decoder
    e, n = embeds(2, seed=4)
    kw = dict(height=64, width=128, num_inference_steps=1, guidance_scale=1.0)
    run = lambda kind: ours.text2img(e, n, generator=gen(6), output_type=kind, progress=False, **kw).images
    exp_np = ref(image_embeds=e, negative_image_embeds=n, generator=gen(6), output_type="np", **kw).images
    exp_pil = ref(image_embeds=e, negative_image_embeds=n, generator=gen(6), output_type="pil", **kw).images

    arr = run("np")
    assert isinstance(arr, np.ndarray) and arr.shape == (2, 64, 128, 3) and arr.dtype == np.float32
    assert 0 <= arr.min() and arr.max() <= 1
    assert 0.1 < ((arr > 0) & (arr < 1)).mean()  # not all clamped: the comparison means something
    assert rel_err(torch.from_numpy(arr), torch.from_numpy(exp_np)) < TOL

    pil = run("pil")
    assert isinstance(pil, list) and len(pil) == 2 and all(p.size == (128, 64) and p.mode == "RGB" for p in pil)
    for a, b in zip(pil, exp_pil):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1

    pt = run("pt")
    assert isinstance(pt, torch.Tensor) and pt.shape == (2, 3, 64, 128)
    assert 0 <= pt.min() and pt.max() <= 1  # [0, 1], as diffusers' img2img / inpaint and torchvision
    assert rel_err(pt.permute(0, 2, 3, 1), torch.from_numpy(exp_np)) < TOL

    latent = run("latent")
    assert latent.shape == (2, 4, 8, 16)
    assert rel_err(unit(ours.movq.decode(latent, force_not_quantize=True)), pt) < 1e-6


def test_pt_output_range(decoder):
    """Deviation: the reference's text2img returns the raw decoder tensor (~[-1, 1]) for "pt" while
    its img2img returns [0, 1]; ours is (B, 3, H, W) in [0, 1] for every task."""
    ours, ref = decoder
    e, n = embeds(1, seed=4)
    kw = dict(height=64, width=64, num_inference_steps=1, guidance_scale=1.0)
    raw = ref(image_embeds=e, negative_image_embeds=n, generator=gen(6), output_type="pt", **kw).images
    got = ours.text2img(e, n, generator=gen(6), output_type="pt", progress=False, **kw).images
    assert raw.min() < 0  # the reference's "pt" is not an image in [0, 1]
    assert 0 <= got.min() and got.max() <= 1
    assert rel_err(got, unit(raw)) < TOL


def test_progress_bar(decoder, capsys):
    ours, _ = decoder
    e, n = embeds(1)
    ours.text2img(e, n, height=64, width=64, num_inference_steps=1, output_type="latent", progress=False)
    assert capsys.readouterr().err == ""
    ours.text2img(e, n, height=64, width=64, num_inference_steps=1, output_type="latent", progress=True)
    assert "decoder" in capsys.readouterr().err


# --------------------------------------------------------------------------- img2img
def test_img2img_square(decoder):
    ours, ref = decoder
    ref = reference_variant(ref, IMG2IMG)
    e, n = embeds(2, seed=5)
    images = [rgb(1), rgb(2)]
    kw = dict(height=64, width=64, num_inference_steps=4, guidance_scale=4.0, strength=0.5)
    out = ours.img2img(e, images, n, generator=gen(7), output_type="np", progress=False, **kw).images
    exp = ref(image_embeds=e, image=images, negative_image_embeds=n, generator=gen(7), output_type="np", **kw).images
    assert rel_err(torch.from_numpy(out), torch.from_numpy(exp)) < TOL
    # a [0, 1] tensor image, latents out
    t = torch.from_numpy(np.array(images[0])).permute(2, 0, 1)[None].float() / 255
    out = ours.img2img(e[:1], t, n[:1], generator=gen(8), output_type="latent", progress=False, **kw).images
    exp = ref(image_embeds=e[:1], image=t, negative_image_embeds=n[:1], generator=gen(8), output_type="latent",
              **kw).images
    assert rel_err(out, exp) < TOL


def test_img2img_non_square_size(decoder):
    """The reference resizes to (width, height) swapped; we return the requested size."""
    ours, ref = decoder
    ref = reference_variant(ref, IMG2IMG)
    e, n = embeds(1, seed=6)
    image = rgb(3, 64, 128)  # 64 high, 128 wide
    kw = dict(num_inference_steps=2, guidance_scale=4.0, strength=1.0)
    out = ours.img2img(e, image, n, height=64, width=128, generator=gen(9), output_type="np", progress=False,
                       **kw).images
    assert out.shape == (1, 64, 128, 3)
    swapped = ref(image_embeds=e, image=image, negative_image_embeds=n, height=64, width=128, generator=gen(9),
                  output_type="np", **kw).images
    assert swapped.shape == (1, 128, 64, 3)  # the reference's bug
    # passing it the swapped arguments gives the requested size: then it must agree with us
    exp = ref(image_embeds=e, image=image, negative_image_embeds=n, height=128, width=64, generator=gen(9),
              output_type="np", **kw).images
    assert rel_err(torch.from_numpy(out), torch.from_numpy(exp)) < TOL


# --------------------------------------------------------------------------- inpaint
@pytest.mark.parametrize("mask_kind", ["numpy", "pil"])
def test_inpaint(inpainter, mask_kind):
    ours, ref = inpainter
    e, n = embeds(1, seed=7)
    image = rgb(4)
    mask = repaint_mask(1)
    if mask_kind == "pil":
        mask = PIL.Image.fromarray((mask * 255).astype(np.uint8), mode="L")
    kw = dict(height=64, width=64, num_inference_steps=3, guidance_scale=4.0, num_images_per_prompt=2)
    out = ours.inpaint(e, image, mask, n, generator=gen(10), output_type="pt", progress=False, **kw).images
    ref_mask = mask.copy()  # the reference binarises numpy masks in place
    exp = unit(ref(image_embeds=e, image=image, mask_image=ref_mask, negative_image_embeds=n, generator=gen(10),
              output_type="pt", **kw).images)
    assert out.shape == (2, 3, 64, 64)
    assert rel_err(out, exp) < TOL


def test_inpaint_unguided_tensor_inputs(inpainter):
    """Tensor image ([0, 1] for us, [-1, 1] for the reference) and a (1, H, W) tensor mask."""
    ours, ref = inpainter
    e, n = embeds(1, seed=8)
    image = torch.from_numpy(np.array(rgb(5))).permute(2, 0, 1).float() / 255  # (3, H, W)
    mask = torch.from_numpy(repaint_mask(2))[None]  # (1, H, W)
    kw = dict(height=64, width=64, num_inference_steps=2, guidance_scale=1.0)
    out = ours.inpaint(e, image, mask, n, generator=gen(11), output_type="latent", progress=False, **kw).images
    exp = ref(image_embeds=e, image=image * 2 - 1, mask_image=mask.clone(), negative_image_embeds=n,
              generator=gen(11), output_type="latent", **kw).images
    assert rel_err(out, exp) < TOL


def test_inpaint_batch_uses_each_images_own_mask(inpainter):
    """The reference blends every image of a batch with the FIRST image and mask; we use each
    one's own: a batch of two equals the two done alone (one generator per image)."""
    ours, ref = inpainter
    e, n = embeds(2, seed=9)
    images = [rgb(6), rgb(7)]
    masks = [repaint_mask(3), repaint_mask(4)]
    kw = dict(height=64, width=64, num_inference_steps=2, guidance_scale=4.0, output_type="pt", progress=False)
    batch = ours.inpaint(e, images, masks, n, generator=[gen(12), gen(13)], **kw).images
    alone = [ours.inpaint(e[i : i + 1], images[i], masks[i], n[i : i + 1], generator=gen(12 + i), **kw).images
             for i in range(2)]
    for i in range(2):
        assert rel_err(batch[i : i + 1], alone[i]) < TOL
    # and the one done alone is the reference's result
    kw.pop("progress")
    exp = unit(ref(image_embeds=e[1:], image=images[1], mask_image=masks[1].copy(), negative_image_embeds=n[1:],
                   generator=gen(13), **kw).images)
    assert rel_err(alone[1], exp) < TOL
    # the reference's batch gets image 1 wrong (blended with image 0's latents and mask)
    ref_batch = ref(image_embeds=e, image=images, mask_image=[m.copy() for m in masks], negative_image_embeds=n,
                    generator=[gen(12), gen(13)], **kw).images
    assert rel_err(ref_batch[1:], alone[1]) > 1e-2


# --------------------------------------------------------------------------- controlnet
def test_controlnet(controlnet):
    ours, ref = controlnet
    e, n = embeds(1, seed=10)
    hint = torch.rand(1, 3, 64, 64, generator=gen(15))
    kw = dict(height=64, width=64, num_inference_steps=STEPS, guidance_scale=4.0, num_images_per_prompt=2)
    out = ours.controlnet(e, n, hint, generator=gen(16), output_type="pt", progress=False, **kw).images
    exp = unit(ref(image_embeds=e, negative_image_embeds=n, hint=hint, generator=gen(16), output_type="pt", **kw).images)
    assert rel_err(out, exp) < TOL
    # a one-channel depth map is repeated to three channels
    out = ours.controlnet(e, n, hint[0, :1], generator=gen(16), output_type="pt", progress=False, **kw).images
    exp = unit(ref(image_embeds=e, negative_image_embeds=n, hint=hint[:, :1].expand(-1, 3, -1, -1), generator=gen(16),
              output_type="pt", **kw).images)
    assert rel_err(out, exp) < TOL


@pytest.mark.parametrize("strength, per_prompt, steps", [(0.5, 1, 4), (1.0, 2, 2)])
def test_controlnet_img2img(controlnet, strength, per_prompt, steps):
    ours, ref = controlnet
    ref = reference_variant(ref, CONTROLNET_IMG2IMG)
    e, n = embeds(1, seed=11)
    image, hint = rgb(8), torch.rand(1, 3, 64, 64, generator=gen(17))
    kw = dict(**SIZE, num_inference_steps=steps, guidance_scale=4.0, strength=strength,
              num_images_per_prompt=per_prompt)
    out = ours.controlnet_img2img(e, image, n, hint, generator=gen(18), output_type="np", progress=False,
                                  **kw).images
    exp = ref(image_embeds=e, image=image, negative_image_embeds=n, hint=hint, generator=gen(18), output_type="np",
              **kw).images
    assert out.shape == (per_prompt, 64, 64, 3)
    assert 0.1 < ((out > 0) & (out < 1)).mean()
    assert rel_err(torch.from_numpy(out), torch.from_numpy(exp)) < TOL


# --------------------------------------------------------------------------- DDIM
def test_ddim_img2img(decoder_pipeline_folder):
    from diffusers import DDIMScheduler

    folder, ref = decoder_pipeline_folder
    ours = DecoderPipeline.from_pretrained(folder, scheduler="ddim")
    ref = reference_variant(ref, IMG2IMG, scheduler=DDIMScheduler.from_config(ref.scheduler.config))
    e, n = embeds(1, seed=1)
    image = rgb(1)
    kw = dict(**SIZE, num_inference_steps=4, guidance_scale=4.0, strength=0.5)
    got = ours.img2img(e, image, n, generator=gen(1), output_type="np", progress=False, **kw).images
    exp = ref(image_embeds=e, image=image, negative_image_embeds=n, generator=gen(1), output_type="np", **kw).images
    assert rel_err(torch.from_numpy(got), torch.from_numpy(exp)) < TOL


def test_ddim_inpaint(inpaint_pipeline_folder):
    folder, ref = inpaint_pipeline_folder
    ours = DecoderPipeline.from_pretrained(folder, scheduler="ddim")
    ref = with_ddim(ref)
    e, n = embeds(1, seed=2)
    image, mask = rgb(2), repaint_mask(2)
    kw = dict(**SIZE, num_inference_steps=3, guidance_scale=4.0)
    got = ours.inpaint(e, image, mask, n, generator=gen(2), output_type="pt", progress=False, **kw).images
    exp = unit(ref(image_embeds=e, image=image, mask_image=mask.copy(), negative_image_embeds=n, generator=gen(2),
              output_type="pt", **kw).images)
    assert rel_err(got, exp) < TOL


# --------------------------------------------------------------------------- latents given
def test_inpaint_given_latents(inpainter):
    ours, ref = inpainter
    e, n = embeds(1, seed=3)
    image, mask = rgb(3), repaint_mask(3)
    latents = torch.randn(2, 4, 8, 8, generator=gen(30))
    kw = dict(**SIZE, num_inference_steps=2, guidance_scale=4.0, num_images_per_prompt=2)
    got = ours.inpaint(e, image, mask, n, latents=latents, generator=gen(3), output_type="latent", progress=False,
                       **kw).images
    exp = ref(image_embeds=e, image=image, mask_image=mask.copy(), negative_image_embeds=n, latents=latents,
              generator=gen(3), output_type="latent", **kw).images
    assert rel_err(got, exp) < TOL


def test_controlnet_given_latents(controlnet):
    ours, ref = controlnet
    e, n = embeds(1, seed=4)
    hint = torch.rand(1, 3, 64, 64, generator=gen(40))
    latents = torch.randn(1, 4, 8, 8, generator=gen(41))
    kw = dict(**SIZE, num_inference_steps=2, guidance_scale=4.0)
    got = ours.controlnet(e, n, hint, latents=latents, generator=gen(4), output_type="pt", progress=False,
                          **kw).images
    exp = unit(ref(image_embeds=e, negative_image_embeds=n, hint=hint, latents=latents, generator=gen(4),
              output_type="pt", **kw).images)
    assert rel_err(got, exp) < TOL


# --------------------------------------------------------------------------- several images, generator lists
def test_img2img_images_per_prompt_and_generator_list(decoder):
    ours, ref = decoder
    ref = reference_variant(ref, IMG2IMG)
    e, n = embeds(1, seed=5)
    image = rgb(5)
    kw = dict(**SIZE, num_inference_steps=4, guidance_scale=4.0, strength=0.5, num_images_per_prompt=2)
    got = ours.img2img(e, image, n, generator=[gen(50), gen(51)], output_type="np", progress=False, **kw).images
    exp = ref(image_embeds=e, image=image, negative_image_embeds=n, generator=[gen(50), gen(51)], output_type="np",
              **kw).images
    assert got.shape == (2, 64, 64, 3)
    assert rel_err(torch.from_numpy(got), torch.from_numpy(exp)) < TOL
    assert np.abs(got[0] - got[1]).max() > 1e-3  # the two pictures differ


def test_text2img_generator_list(decoder):
    ours, ref = decoder
    e, n = embeds(2, seed=7)
    kw = dict(**SIZE, num_inference_steps=2, guidance_scale=4.0)
    got = ours.text2img(e, n, generator=[gen(70), gen(71)], output_type="latent", progress=False, **kw).images
    exp = ref(image_embeds=e, negative_image_embeds=n, generator=[gen(70), gen(71)], output_type="latent",
              **kw).images
    assert rel_err(got, exp) < TOL
    # one generator per image: the second picture is the second embedding run alone with its generator
    alone = ours.text2img(e[1:], n[1:], generator=gen(71), output_type="latent", progress=False, **kw).images
    assert rel_err(got[1:], alone) < TOL


def test_inpaint_generator_list(inpainter):
    ours, ref = inpainter
    e, n = embeds(1, seed=8)
    image, mask = rgb(8), repaint_mask(8)
    kw = dict(**SIZE, num_inference_steps=2, guidance_scale=4.0, num_images_per_prompt=2)
    got = ours.inpaint(e, image, mask, n, generator=[gen(80), gen(81)], output_type="latent", progress=False,
                       **kw).images
    exp = ref(image_embeds=e, image=image, mask_image=mask.copy(), negative_image_embeds=n,
              generator=[gen(80), gen(81)], output_type="latent", **kw).images
    assert rel_err(got, exp) < TOL


def test_wrong_number_of_generators(decoder):
    ours, _ = decoder
    e, n = embeds(2)
    with pytest.raises(ValueError, match="generator"):
        ours.text2img(e, n, generator=[gen(0)] * 3, **SIZE, num_inference_steps=1, progress=False)


# --------------------------------------------------------------------------- callbacks
def test_inpaint_callback_replacing_latents(inpainter):
    ours, ref = inpainter
    e, n = embeds(1, seed=11)
    image, mask = rgb(11), repaint_mask(11)

    def ours_cb(state):
        return state.x * 0.5 + 0.1

    def ref_cb(pipe, step, t, kwargs):
        return {"latents": kwargs["latents"] * 0.5 + 0.1}

    kw = dict(**SIZE, num_inference_steps=3, guidance_scale=4.0)
    got = ours.inpaint(e, image, mask, n, generator=gen(11), output_type="latent", progress=False,
                       callback_on_step_end=ours_cb, **kw).images
    exp = ref(image_embeds=e, image=image, mask_image=mask.copy(), negative_image_embeds=n, generator=gen(11),
              output_type="latent", callback_on_step_end=ref_cb, **kw).images
    plain = ours.inpaint(e, image, mask, n, generator=gen(11), output_type="latent", progress=False, **kw).images
    assert rel_err(got, exp) < TOL
    assert rel_err(got, plain) > 1e-2  # the callback changed the result


IMG2IMG_OPTIONS = {  # name: (seed, options, our callback, the reference's callback)
    "strength 1, unguided": (10, dict(num_inference_steps=2, guidance_scale=1.0, strength=1.0), None, None),
    "callback replacing latents": (12, dict(num_inference_steps=4, guidance_scale=4.0, strength=0.5),
                                   lambda state: -state.x, lambda p, i, t, k: {"latents": -k["latents"]}),
}


@pytest.mark.parametrize("case", list(IMG2IMG_OPTIONS))
def test_img2img_options(decoder, case):
    seed, options, ours_cb, ref_cb = IMG2IMG_OPTIONS[case]
    ours, ref = decoder
    ref = reference_variant(ref, IMG2IMG)
    e, n = embeds(1, seed=seed)
    image = rgb(seed)
    kw = dict(**SIZE, **options)
    got = ours.img2img(e, image, n, generator=gen(seed), output_type="latent", progress=False,
                       callback_on_step_end=ours_cb, **kw).images
    exp = ref(image_embeds=e, image=image, negative_image_embeds=n, generator=gen(seed), output_type="latent",
              callback_on_step_end=ref_cb, **kw).images
    assert rel_err(got, exp) < TOL


# --------------------------------------------------------------------------- output ranges
def test_inpaint_np_and_pil_outputs(inpainter):
    ours, ref = inpainter
    e, n = embeds(1, seed=13)
    image, mask = rgb(13), repaint_mask(13)
    kw = dict(**SIZE, num_inference_steps=2, guidance_scale=4.0)
    for kind in ("np", "pil"):
        got = ours.inpaint(e, image, mask, n, generator=gen(13), output_type=kind, progress=False, **kw).images
        exp = ref(image_embeds=e, image=image, mask_image=mask.copy(), negative_image_embeds=n, generator=gen(13),
                  output_type=kind, **kw).images
        if kind == "np":
            assert got.dtype == exp.dtype and got.min() >= 0 and got.max() <= 1
            assert rel_err(torch.from_numpy(got), torch.from_numpy(exp)) < TOL
        else:
            assert len(got) == len(exp) == 1 and got[0].mode == exp[0].mode == "RGB"
            diff = np.abs(np.asarray(got[0], dtype=int) - np.asarray(exp[0], dtype=int))
            assert diff.max() <= 1


# --------------------------------------------------------------------------- deviations from the reference
def test_unguided_images_per_prompt(decoder, inpainter):
    """With guidance_scale <= 1 and num_images_per_prompt > 1 the reference does not repeat the
    embeddings and fails; ours equals the reference given the embeddings repeated."""
    ours, ref = decoder
    e, n = embeds(1, seed=15)
    kw = dict(**SIZE, num_inference_steps=2, guidance_scale=1.0)
    with pytest.raises(RuntimeError):
        ref(image_embeds=e, negative_image_embeds=n, num_images_per_prompt=2, generator=gen(15), **kw)
    got = ours.text2img(e, n, num_images_per_prompt=2, generator=gen(15), output_type="pt", progress=False,
                        **kw).images
    exp = unit(ref(image_embeds=e.repeat(2, 1), negative_image_embeds=n.repeat(2, 1), generator=gen(15),
              output_type="pt", **kw).images)
    assert rel_err(got, exp) < TOL

    ours, ref = inpainter
    image, mask = rgb(15), repaint_mask(15)
    got = ours.inpaint(e, image, mask, n, num_images_per_prompt=2, generator=gen(16), output_type="latent",
                       progress=False, **kw).images
    exp = ref(image_embeds=e.repeat(2, 1), image=[image, image], mask_image=[mask.copy(), mask.copy()],
              negative_image_embeds=n.repeat(2, 1), generator=gen(16), output_type="latent", **kw).images
    assert rel_err(got, exp) < TOL


def test_controlnet_img2img_non_square(controlnet):
    """The reference's controlnet_img2img also swaps height and width; ours gives height x width."""
    ours, ref = controlnet
    ref = reference_variant(ref, CONTROLNET_IMG2IMG)
    e, n = embeds(1, seed=16)
    image, hint = rgb(16, 64, 128), torch.rand(1, 3, 64, 128, generator=gen(160))
    kw = dict(num_inference_steps=2, guidance_scale=4.0, strength=1.0)
    got = ours.controlnet_img2img(e, image, n, hint, height=64, width=128, generator=gen(17), output_type="np",
                                  progress=False, **kw).images
    assert got.shape == (1, 64, 128, 3)
    with pytest.raises(RuntimeError):  # its image latents come out 16 x 8, its hint is 8 x 16
        ref(image_embeds=e, image=image, negative_image_embeds=n, hint=hint, height=64, width=128,
            generator=gen(17), **kw)
    exp = ref(image_embeds=e, image=image, negative_image_embeds=n, hint=hint, height=128, width=64,
              generator=gen(17), output_type="np", **kw).images
    assert rel_err(torch.from_numpy(got), torch.from_numpy(exp)) < TOL


def test_sizes_not_a_multiple_of_64(decoder, controlnet):
    """Generated at the next multiple of 64 (the reference's numbers), returned at the size asked:
    the reference's 128 x 128 picture resized (bicubic, antialiased) to 100 x 70."""
    import torch.nn.functional as F

    ours, ref = decoder
    e, n = embeds(1, seed=17)
    kw = dict(height=100, width=70, num_inference_steps=2, guidance_scale=4.0)
    got = ours.text2img(e, n, generator=gen(20), output_type="np", progress=False, **kw).images
    raw = ref(image_embeds=e, negative_image_embeds=n, generator=gen(20), output_type="pt", **kw).images
    assert raw.shape == (1, 3, 128, 128) and got.shape == (1, 100, 70, 3)
    exp = unit(F.interpolate(raw, size=(100, 70), mode="bicubic", antialias=True, align_corners=False))
    assert rel_err(torch.from_numpy(got), exp.permute(0, 2, 3, 1)) < TOL
    latents = ours.text2img(e, n, generator=gen(20), output_type="latent", progress=False, **kw).images
    assert latents.shape == (1, 4, 16, 16)  # the same latents as a 128 x 128 request
    # a multiple of 64 is generated exactly as asked
    assert ours.text2img(e, n, generator=gen(20), output_type="np", progress=False,
                         **{**kw, "height": 128, "width": 64}).images.shape == (1, 128, 64, 3)


# --------------------------------------------------------------------------- bfloat16
def test_bfloat16_decoder_tasks(inpainter, controlnet, inpaint_pipeline_folder, controlnet_pipeline_folder):
    e, n = embeds(1, seed=27)
    image, mask = rgb(27), repaint_mask(27)
    kw = dict(**SIZE, num_inference_steps=2, guidance_scale=4.0)
    half = DecoderPipeline.from_pretrained(inpaint_pipeline_folder[0], dtype=torch.bfloat16)
    got = half.inpaint(e, image, mask, n, generator=gen(27), output_type="pt", progress=False, **kw).images
    exp = unit(inpainter[1](image_embeds=e, image=image, mask_image=mask.copy(), negative_image_embeds=n,
                       generator=gen(27), output_type="pt", **kw).images)
    assert rel_err(got.float(), exp) < BF16_TOL

    hint = torch.rand(1, 3, 64, 64, generator=gen(28))
    half = DecoderPipeline.from_pretrained(controlnet_pipeline_folder[0], dtype=torch.bfloat16)
    got = half.controlnet(e, n, hint, generator=gen(28), output_type="pt", progress=False, **kw).images
    exp = unit(controlnet[1](image_embeds=e, negative_image_embeds=n, hint=hint, generator=gen(28), output_type="pt",
                        **kw).images)
    assert rel_err(got.float(), exp) < BF16_TOL
    ref = reference_variant(controlnet[1], CONTROLNET_IMG2IMG)
    got = half.controlnet_img2img(e, image, n, hint, strength=0.5, generator=gen(29), output_type="np",
                                  progress=False, **{**kw, "num_inference_steps": 4}).images
    exp = ref(image_embeds=e, image=image, negative_image_embeds=n, hint=hint, strength=0.5, generator=gen(29),
              output_type="np", **{**kw, "num_inference_steps": 4}).images
    assert rel_err(torch.from_numpy(got), torch.from_numpy(exp)) < BF16_TOL


# --------------------------------------------------------------------------- one picture per prompt
def test_inpaint_one_picture_per_prompt(inpainter):
    """Two pictures and masks for four embeddings (two prompts x 2): each pair serves two."""
    ours, _ = inpainter
    e, n = embeds(4, seed=35)
    pictures, masks = [rgb(35), rgb(36)], [repaint_mask(35), repaint_mask(36)[::-1].copy()]
    kw = dict(**SIZE, num_inference_steps=2, output_type="latent", progress=False)
    got = ours.inpaint(e, pictures, masks, n, generator=gen(37), **kw).images
    exp = ours.inpaint(e, [pictures[0]] * 2 + [pictures[1]] * 2, [masks[0]] * 2 + [masks[1]] * 2, n,
                       generator=gen(37), **kw).images
    assert torch.equal(got, exp)
    with pytest.raises(ValueError, match="3 images for 4 image embeddings"):
        ours.inpaint(e, pictures + [rgb(38)], masks[0], n, **kw)


# --------------------------------------------------------------------------- argument kinds
def test_numpy_scalar_arguments(decoder):
    """Sizes, counts and scales computed with numpy (np.int64, np.float32) work like Python numbers."""
    ours, ref = decoder
    ref = reference_variant(ref, IMG2IMG)
    e, n = embeds(1, seed=39)
    image = rgb(39)
    got = ours.img2img(e, image, n, height=np.int64(64), width=np.int64(64), num_inference_steps=np.int64(4),
                       guidance_scale=np.float32(3.0), strength=np.float32(0.5), num_images_per_prompt=np.int64(2),
                       generator=gen(39), output_type="latent", progress=False).images
    exp = ref(image_embeds=e, image=image, negative_image_embeds=n, **SIZE, num_inference_steps=4, guidance_scale=3.0,
              strength=0.5, num_images_per_prompt=2, generator=gen(39), output_type="latent").images
    assert rel_err(got, exp) < TOL


def test_diffusers_style_callback_explained(decoder):
    """A callback written for diffusers ((pipe, step, t, kwargs) -> dict) fails with a message
    saying what ours expects, not with an AttributeError deep in the loop."""
    ours, _ = decoder
    e, n = embeds(1)
    kw = dict(**SIZE, num_inference_steps=1, progress=False, output_type="latent")
    with pytest.raises(TypeError, match=r"callback_on_step_end\(state\) receives one kandinsky.sampling.StepState"):
        ours.text2img(e, n, callback_on_step_end=lambda step, t, latents: {"latents": latents}, **kw)
    with pytest.raises(TypeError, match=r"callback_on_step_end\(state\) receives one kandinsky.sampling.StepState"):
        ours.text2img(e, n, callback_on_step_end=lambda pipe, step, t, kwargs: None, **kw)
    with pytest.raises(TypeError, match=r"returned a dict"):
        ours.text2img(e, n, callback_on_step_end=lambda state: {"latents": state.x}, **kw)


# --------------------------------------------------------------------------- errors
def test_wrong_task_for_checkpoint(decoder, inpainter, controlnet):
    e, n = embeds(1)
    image, mask, hint = rgb(0), repaint_mask(0), torch.rand(1, 3, 64, 64)
    cases = [
        (decoder[0].inpaint, (e, image, mask, n), "decoder checkpoint", "kandinsky-2-2-decoder-inpaint"),
        (decoder[0].controlnet, (e, n, hint), "decoder checkpoint", "kandinsky-2-2-controlnet-depth"),
        (inpainter[0].text2img, (e, n), "inpaint checkpoint", "kandinsky-community/kandinsky-2-2-decoder)"),
        (inpainter[0].img2img, (e, image, n), "inpaint checkpoint", "kandinsky-community/kandinsky-2-2-decoder)"),
        (controlnet[0].text2img, (e, n), "controlnet checkpoint", "controlnet, controlnet_img2img"),
        (controlnet[0].inpaint, (e, image, mask, n), "controlnet checkpoint", "decoder-inpaint"),
    ]
    for method, args, kind, hint_text in cases:
        with pytest.raises(ValueError) as info:
            method(*args, height=64, width=64, num_inference_steps=1, progress=False)
        assert kind in str(info.value) and hint_text in str(info.value), str(info.value)
    assert decoder[0].tasks == ("text2img", "img2img")
    assert inpainter[0].tasks == ("inpaint",)
    assert controlnet[0].tasks == ("controlnet", "controlnet_img2img")


def test_bad_sizes(decoder):
    ours, _ = decoder
    e, n = embeds(1)
    for height, width in [(0, 64), (64, -64)]:
        with pytest.raises(ValueError, match="must be a positive number of pixels"):
            ours.text2img(e, n, height=height, width=width, num_inference_steps=1, progress=False)
    with pytest.raises(TypeError, match="height"):
        ours.text2img(e, n, height=64.0, width=64, num_inference_steps=1, progress=False)
    # sizes that are not a multiple of 64 are generated at the next multiple, returned as asked
    out = ours.text2img(e, n, height=100, width=64, num_inference_steps=1, output_type="latent",
                        progress=False).images
    assert out.shape == (1, 4, 16, 8)
    out = ours.text2img(e, n, height=32, width=63, num_inference_steps=1, output_type="np", progress=False).images
    assert out.shape == (1, 32, 63, 3)


def test_bad_embeddings_and_arguments(decoder):
    ours, _ = decoder
    e, n = embeds(2)
    kw = dict(height=64, width=64, num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="same batch size"):
        ours.text2img(e, n[:1], **kw)
    with pytest.raises(ValueError, match=rf"\(B, {EMBED_DIM}\)"):
        ours.text2img(torch.randn(2, EMBED_DIM + 1), n, **kw)
    with pytest.raises(ValueError, match="negative_image_embeds is required"):
        ours.text2img(e, None, **kw)
    with pytest.raises(ValueError, match="output_type"):
        ours.text2img(e, n, output_type="jpeg", **kw)
    with pytest.raises(ValueError, match="latents must have shape"):
        ours.text2img(e, n, latents=torch.randn(1, 4, 8, 8), **kw)
    with pytest.raises(ValueError, match="num_inference_steps"):
        ours.text2img(e, n, height=64, width=64, num_inference_steps=0, progress=False)
    for strength in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="strength"):
            ours.img2img(e, rgb(0), n, strength=strength, **kw)
    with pytest.raises(ValueError, match="no denoising step"):
        ours.img2img(e, rgb(0), n, height=64, width=64, num_inference_steps=2, strength=0.3, progress=False)
    with pytest.raises(ValueError, match="2 image embedding"):
        ours.img2img(e, [rgb(0), rgb(0), rgb(0)], n, strength=1.0, **kw)


def test_not_a_decoder_folder(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyV22PriorPipeline"}')
    with pytest.raises(ValueError, match="KandinskyV22PriorPipeline.*no unet, movq, scheduler"):
        DecoderPipeline.from_pretrained(tmp_path)


# --------------------------------------------------------------------------- non-finite values
def test_non_finite_inputs_are_refused_by_name(decoder):
    ours, _ = decoder
    e, n = embeds(1)
    nan = float("nan")
    kw = dict(**SIZE, num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="`image_embeds` holds NaN"):
        ours.text2img(e * nan, n, **kw)
    with pytest.raises(ValueError, match="`negative_image_embeds` holds NaN"):
        ours.text2img(e, n * float("inf"), **kw)
    with pytest.raises(ValueError, match="latents hold NaN"):
        ours.text2img(e, n, latents=torch.full((1, 4, 8, 8), nan), **kw)
    with pytest.raises(ValueError, match="guidance_scale"):
        ours.text2img(e, n, guidance_scale=nan, **kw)
    with pytest.raises(TypeError, match=r"torch.Generator\(\).manual_seed"):
        ours.text2img(e, n, generator=0, **kw)
    # a one-element tensor is a number, not "non-finite"
    out = ours.text2img(e, n, guidance_scale=torch.tensor(4.0), output_type="latent", **kw).images
    assert torch.isfinite(out).all()


def test_a_run_that_turns_non_finite_stops_naming_stage_and_step(decoder):
    ours, _ = decoder
    e, n = embeds(1)
    with pytest.raises(FloatingPointError, match="decoder sample became NaN or inf at step 1"):
        ours.text2img(e, n, callback_on_step_end=lambda s: s.x * float("nan") if s.step == 0 else None,
                      **SIZE, num_inference_steps=2, progress=False)
