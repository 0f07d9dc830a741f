"""Review of the decoder / prior pipelines as a demanding user drives them: parity cases the
main pipeline tests do not cover (DDIM img2img / inpaint, given latents, several images per
embedding, generator lists, guidance <= 1, strength 1, 2 prior steps, callbacks), dtypes, and
input handling. Tiny random checkpoints of tests/refs/, same seeds, fp32, 1e-4 relative error.
"""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from kandinsky.pipelines.decoder import DecoderPipeline
from kandinsky.pipelines.prior import PriorPipeline
from tests.helpers import unit, rel_err
from tests.refs.decoder_pipeline import EMBED_DIM

TOL = 1e-4
SIZE = dict(height=64, width=64)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a machine busy with other work
    torch's spinning worker threads make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def embeds(batch: int = 1, seed: int = 0):
    g = gen(1000 + seed)
    return torch.randn(batch, EMBED_DIM, generator=g), torch.randn(batch, EMBED_DIM, generator=g)


def rgb(seed: int, height: int = 64, width: int = 64) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def repaint_mask(seed: int, height: int = 64, width: int = 64) -> np.ndarray:
    """float32 {0, 1} (H, W), 1 = repaint: a block and a few scattered pixels."""
    rng = np.random.default_rng(seed)
    m = (rng.random((height, width)) < 0.03).astype(np.float32)
    m[8:30, 20:44] = 1
    return m


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


# fixtures `decoder`, `inpainter`, `controlnet`: (our DecoderPipeline, reference) in tests/refs/decoder_pipeline.py


def with_ddim(ref):
    from diffusers import DDIMScheduler

    return quiet(type(ref)(unet=ref.unet, movq=ref.movq, scheduler=DDIMScheduler.from_config(ref.scheduler.config)))


def img2img_ref(ref, cls_name="KandinskyV22Img2ImgPipeline", scheduler=None):
    import diffusers

    components = dict(ref.components)
    if scheduler is not None:
        components["scheduler"] = scheduler
    return quiet(getattr(diffusers, cls_name)(**components))


# --------------------------------------------------------------------------- DDIM
def test_ddim_img2img(decoder_pipeline_folder):
    from diffusers import DDIMScheduler

    folder, ref = decoder_pipeline_folder
    ours = DecoderPipeline.from_pretrained(folder, scheduler="ddim")
    ref = img2img_ref(ref, scheduler=DDIMScheduler.from_config(ref.scheduler.config))
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
    ref = img2img_ref(ref)
    e, n = embeds(1, seed=5)
    image = rgb(5)
    kw = dict(**SIZE, num_inference_steps=4, guidance_scale=4.0, strength=0.5, num_images_per_prompt=2)
    got = ours.img2img(e, image, n, generator=[gen(50), gen(51)], output_type="np", progress=False, **kw).images
    exp = ref(image_embeds=e, image=image, negative_image_embeds=n, generator=[gen(50), gen(51)], output_type="np",
              **kw).images
    assert got.shape == (2, 64, 64, 3)
    assert rel_err(torch.from_numpy(got), torch.from_numpy(exp)) < TOL
    assert np.abs(got[0] - got[1]).max() > 1e-3  # the two pictures differ


def test_controlnet_img2img_images_per_prompt(controlnet):
    ours, ref = controlnet
    ref = img2img_ref(ref, "KandinskyV22ControlnetImg2ImgPipeline")
    e, n = embeds(1, seed=6)
    image, hint = rgb(6), torch.rand(1, 3, 64, 64, generator=gen(60))
    kw = dict(**SIZE, num_inference_steps=2, guidance_scale=4.0, strength=1.0, num_images_per_prompt=2)
    got = ours.controlnet_img2img(e, image, n, hint, generator=gen(6), output_type="np", progress=False,
                                  **kw).images
    exp = ref(image_embeds=e, image=image, negative_image_embeds=n, hint=hint, generator=gen(6), output_type="np",
              **kw).images
    assert got.shape == (2, 64, 64, 3)
    assert rel_err(torch.from_numpy(got), torch.from_numpy(exp)) < TOL


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


# --------------------------------------------------------------------------- guidance <= 1, strength 1
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_text2img_guidance_at_most_one(decoder, scale):
    ours, ref = decoder
    e, n = embeds(2, seed=9)
    kw = dict(**SIZE, num_inference_steps=2, guidance_scale=scale)
    got = ours.text2img(e, n, generator=gen(9), output_type="pt", progress=False, **kw).images
    exp = unit(ref(image_embeds=e, negative_image_embeds=n, generator=gen(9), output_type="pt", **kw).images)
    assert got.shape == (2, 3, 64, 64)
    assert rel_err(got, exp) < TOL


def test_img2img_strength_one_unguided(decoder):
    ours, ref = decoder
    ref = img2img_ref(ref)
    e, n = embeds(1, seed=10)
    image = rgb(10)
    kw = dict(**SIZE, num_inference_steps=2, guidance_scale=1.0, strength=1.0)
    got = ours.img2img(e, image, n, generator=gen(10), output_type="latent", progress=False, **kw).images
    exp = ref(image_embeds=e, image=image, negative_image_embeds=n, generator=gen(10), output_type="latent",
              **kw).images
    assert rel_err(got, exp) < TOL


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


def test_img2img_callback_replacing_latents(decoder):
    ours, ref = decoder
    ref = img2img_ref(ref)
    e, n = embeds(1, seed=12)
    image = rgb(12)
    kw = dict(**SIZE, num_inference_steps=4, guidance_scale=4.0, strength=0.5)
    got = ours.img2img(e, image, n, generator=gen(12), output_type="latent", progress=False,
                       callback_on_step_end=lambda state: -state.x, **kw).images
    exp = ref(image_embeds=e, image=image, negative_image_embeds=n, generator=gen(12), output_type="latent",
              callback_on_step_end=lambda p, i, t, k: {"latents": -k["latents"]}, **kw).images
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


# --------------------------------------------------------------------------- prior
def test_prior_two_steps(prior_pipeline_folder):
    folder, ref = prior_pipeline_folder
    ours = PriorPipeline.from_pretrained(folder)
    for kw in (dict(prompt="a red cat", negative_prompt="a dog"), dict(prompt=["a red cat", "a dog"])):
        got = ours(**kw, num_inference_steps=2, generator=gen(14), progress=False)
        exp = ref(**kw, num_inference_steps=2, generator=gen(14))
        assert rel_err(got.image_embeds, exp.image_embeds) < TOL
        assert rel_err(got.negative_image_embeds, exp.negative_image_embeds) < TOL
    with pytest.raises(ValueError, match="num_inference_steps"):
        ours("a red cat", num_inference_steps=1, progress=False)


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
    ref = img2img_ref(ref, "KandinskyV22ControlnetImg2ImgPipeline")
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


def test_combined_reference_cannot_take_decoder_latents(prior_pipeline_folder, decoder_pipeline_folder):
    """diffusers' combined pipeline hands ``latents`` to the prior: decoder-shaped latents fail
    there. Ours takes them (``latents``) and equals the reference's two pipelines chained by hand."""
    from diffusers import KandinskyV22CombinedPipeline

    from kandinsky.pipelines.combined import Kandinsky

    (prior_folder, prior_ref), (decoder_folder, decoder_ref) = prior_pipeline_folder, decoder_pipeline_folder
    ref = quiet(KandinskyV22CombinedPipeline(
        unet=decoder_ref.unet, scheduler=decoder_ref.scheduler, movq=decoder_ref.movq,
        prior_prior=prior_ref.prior, prior_image_encoder=prior_ref.image_encoder,
        prior_text_encoder=prior_ref.text_encoder, prior_tokenizer=prior_ref.tokenizer,
        prior_scheduler=prior_ref.scheduler, prior_image_processor=prior_ref.image_processor,
    ))
    latents = torch.randn(1, 4, 8, 8, generator=gen(18))
    kw = dict(**SIZE, num_inference_steps=2, prior_num_inference_steps=2)
    with pytest.raises(ValueError, match="Unexpected latents shape"):
        ref("a red cat", latents=latents, generator=gen(19), **kw)
    ours = Kandinsky.from_pretrained(decoder_folder, prior=prior_folder)
    got = ours.text2img("a red cat", latents=latents, generator=gen(19), output_type="latent", progress=False,
                        **kw).images
    g = gen(19)
    e, n = ref.prior_pipe("a red cat", generator=g, num_inference_steps=2, return_dict=False)
    exp = ref.decoder_pipe(image_embeds=e, negative_image_embeds=n, latents=latents, generator=g,
                           num_inference_steps=2, output_type="latent", **SIZE).images
    assert rel_err(got, exp) < TOL


# --------------------------------------------------------------------------- sizes
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


def test_resized_inputs(decoder, inpainter):
    """PIL images (and masks) of another size are resized like the reference does."""
    ours, ref = decoder
    ref = img2img_ref(ref)
    e, n = embeds(1, seed=18)
    image = rgb(18, 100, 80)
    kw = dict(**SIZE, num_inference_steps=2, guidance_scale=4.0, strength=1.0)
    got = ours.img2img(e, image, n, generator=gen(21), output_type="latent", progress=False, **kw).images
    exp = ref(image_embeds=e, image=image, negative_image_embeds=n, generator=gen(21), output_type="latent",
              **kw).images
    assert rel_err(got, exp) < TOL

    ours, ref = inpainter
    mask = PIL.Image.fromarray((repaint_mask(18, 100, 80) * 255).astype(np.uint8))
    kw = dict(**SIZE, num_inference_steps=2, guidance_scale=4.0)
    got = ours.inpaint(e, image, mask, n, generator=gen(22), output_type="latent", progress=False, **kw).images
    exp = ref(image_embeds=e, image=image, mask_image=mask, negative_image_embeds=n, generator=gen(22),
              output_type="latent", **kw).images
    assert rel_err(got, exp) < TOL


# --------------------------------------------------------------------------- input kinds
def test_image_modes(decoder, controlnet):
    """Grey, palette and RGBA pictures are converted to RGB (alpha dropped): the reference's
    result for the converted picture. (The reference's img2img fails on them.)"""
    ours, ref = decoder
    ref = img2img_ref(ref)
    e, n = embeds(1, seed=19)
    base = rgb(19)
    kw = dict(**SIZE, num_inference_steps=2, guidance_scale=4.0, strength=1.0)
    for mode in ("L", "P", "RGBA"):
        picture = base.convert(mode)
        with pytest.raises(Exception):
            ref(image_embeds=e, image=picture, negative_image_embeds=n, generator=gen(23), **kw)
        got = ours.img2img(e, picture, n, generator=gen(23), output_type="latent", progress=False, **kw).images
        exp = ref(image_embeds=e, image=picture.convert("RGB"), negative_image_embeds=n, generator=gen(23),
                  output_type="latent", **kw).images
        assert rel_err(got, exp) < TOL, mode


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_hint_modes(controlnet, mode):
    """PIL hints of any mode are converted to RGB: the reference's result for that RGB tensor."""
    ours, ref = controlnet
    e, n = embeds(1, seed=22)
    picture = rgb(22).convert(mode)
    rgb_hint = torch.from_numpy(np.array(picture.convert("RGB"))).permute(2, 0, 1)[None].float() / 255
    kw = dict(**SIZE, num_inference_steps=2, guidance_scale=4.0)
    got = ours.controlnet(e, n, picture, generator=gen(23), output_type="pt", progress=False, **kw).images
    exp = unit(ref(image_embeds=e, negative_image_embeds=n, hint=rgb_hint, generator=gen(23), output_type="pt",
              **kw).images)
    assert rel_err(got, exp) < TOL


def test_sixteen_bit_depth_hint(controlnet, tmp_path):
    """A 16-bit depth PNG (PIL mode I;16) is read as 0..65535, not clipped at 255."""
    ours, ref = controlnet
    e, n = embeds(1, seed=20)
    depth = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    PIL.Image.fromarray(depth).save(tmp_path / "depth.png")
    picture = PIL.Image.open(tmp_path / "depth.png")
    hint = torch.from_numpy(depth.astype(np.float32) / 65535)[None, None].expand(1, 3, 64, 64)
    kw = dict(**SIZE, num_inference_steps=2, guidance_scale=4.0)
    exp = unit(ref(image_embeds=e, negative_image_embeds=n, hint=hint, generator=gen(24), output_type="pt", **kw).images)
    for given in (picture, depth, torch.from_numpy(depth)):  # PIL I;16, uint16 numpy / torch
        got = ours.controlnet(e, n, given, generator=gen(24), output_type="pt", progress=False, **kw).images
        assert rel_err(got, exp) < TOL, type(given)


@pytest.mark.parametrize("kind", ["bool_tensor", "bool_numpy", "uint8_01", "HW1_numpy", "1HW_tensor", "B1HW",
                                  "pil_1", "pil_rgb", "pil_P"])
def test_mask_kinds(inpainter, kind):
    ours, ref = inpainter
    e, n = embeds(1, seed=21)
    image, mask = rgb(21), repaint_mask(21)
    masks = {
        "bool_tensor": torch.from_numpy(mask > 0.5),
        "bool_numpy": mask > 0.5,
        "uint8_01": mask.astype(np.uint8),
        "HW1_numpy": mask[..., None],
        "1HW_tensor": torch.from_numpy(mask)[None],
        "B1HW": torch.from_numpy(mask)[None, None],
        "pil_1": PIL.Image.fromarray(mask > 0.5),
        "pil_rgb": PIL.Image.fromarray((mask * 255).astype(np.uint8)).convert("RGB"),
        "pil_P": PIL.Image.fromarray((mask * 255).astype(np.uint8)).convert("P"),
    }
    kw = dict(**SIZE, num_inference_steps=2, guidance_scale=4.0)
    got = ours.inpaint(e, image, masks[kind], n, generator=gen(25), output_type="latent", progress=False,
                       **kw).images
    exp = ref(image_embeds=e, image=image, mask_image=mask.copy(), negative_image_embeds=n, generator=gen(25),
              output_type="latent", **kw).images
    assert rel_err(got, exp) < TOL


def test_uint8_0_255_mask_refused_with_hint(inpainter):
    ours, _ = inpainter
    e, n = embeds(1)
    with pytest.raises(ValueError, match="0/255 mask divide by 255"):
        ours.inpaint(e, rgb(0), (repaint_mask(0) * 255).astype(np.uint8), n, **SIZE, num_inference_steps=1,
                     progress=False)


# --------------------------------------------------------------------------- bfloat16
# measured 0.03-0.04 on the raw decoder output, 0.09-0.10 on "pt" in [0, 1] (half the range, the
# same absolute error) on these checkpoints; a real bug gives O(1)
BF16_TOL = 0.25  # bf16 keeps 8 mantissa bits; two guided steps of random weights amplify them: 0.09-0.19
#                  measured, by CPU (0.186 on a Xeon with AMX / AVX512-BF16 kernels, 2026-12-02)


def test_bfloat16_chain_and_to(prior_pipeline_folder, decoder_pipeline_folder):
    """The whole chain loaded in bf16 runs on the CPU and stays close to the fp32 reference;
    ``.to(dtype=bf16)`` on an fp32 pipeline gives exactly the bf16-loaded result."""
    from diffusers import KandinskyV22CombinedPipeline

    from kandinsky.pipelines.combined import Kandinsky

    (prior_folder, prior_ref), (decoder_folder, decoder_ref) = prior_pipeline_folder, decoder_pipeline_folder
    ref = quiet(KandinskyV22CombinedPipeline(
        unet=decoder_ref.unet, scheduler=decoder_ref.scheduler, movq=decoder_ref.movq,
        prior_prior=prior_ref.prior, prior_image_encoder=prior_ref.image_encoder,
        prior_text_encoder=prior_ref.text_encoder, prior_tokenizer=prior_ref.tokenizer,
        prior_scheduler=prior_ref.scheduler, prior_image_processor=prior_ref.image_processor,
    ))
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
    ref = img2img_ref(controlnet[1], "KandinskyV22ControlnetImg2ImgPipeline")
    got = half.controlnet_img2img(e, image, n, hint, strength=0.5, generator=gen(29), output_type="np",
                                  progress=False, **{**kw, "num_inference_steps": 4}).images
    exp = ref(image_embeds=e, image=image, negative_image_embeds=n, hint=hint, strength=0.5, generator=gen(29),
              output_type="np", **{**kw, "num_inference_steps": 4}).images
    assert rel_err(torch.from_numpy(got), torch.from_numpy(exp)) < BF16_TOL


# --------------------------------------------------------------------------- one picture per prompt
def test_one_picture_per_prompt_with_several_images_per_prompt(prior_pipeline_folder, decoder_pipeline_folder,
                                                              controlnet_pipeline_folder):
    """Kandinsky with B prompts, B pictures (or hints) and num_images_per_prompt = n: each picture
    serves its prompt's n images, as the reference prior and decoder chained by hand with every
    picture repeated n times (the reference's combined pipeline fails on this)."""
    from kandinsky.pipelines.combined import Kandinsky

    prior_folder, prior_ref = prior_pipeline_folder
    prompts, pictures = ["a red cat", "a blue dog"], [rgb(30), rgb(31)]
    kw = dict(**SIZE, num_inference_steps=2, num_images_per_prompt=2)

    folder, ref = decoder_pipeline_folder
    ref = img2img_ref(ref)
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
    ref = img2img_ref(ref)
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
