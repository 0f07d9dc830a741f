"""PriorPipeline vs diffusers' KandinskyV22PriorPipeline / KandinskyV22PriorEmb2EmbPipeline
on a tiny random checkpoint (tests/refs/prior_pipeline.py), same seeds, fp32."""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from kandinsky.pipelines.prior import PriorOutput, PriorPipeline
from tests.helpers import assert_close, gen, rel_err
from tests.refs.prior_pipeline import PRIOR_EMBED_DIM, PRIOR_IMAGE_SIZE

TOL = 1e-4
STEPS = 4


@pytest.fixture(scope="module")
def pipes(prior_pipeline_folder):
    """(ours, reference prior pipeline, reference emb2emb pipeline) on the same weights."""
    from diffusers import KandinskyV22PriorEmb2EmbPipeline

    folder, ref = prior_pipeline_folder
    ours = PriorPipeline.from_pretrained(folder)
    ref_emb2emb = KandinskyV22PriorEmb2EmbPipeline(**ref.components)
    ref_emb2emb.set_progress_bar_config(disable=True)
    return ours, ref, ref_emb2emb


def assert_same(ours: PriorOutput, ref) -> None:
    assert_close(ours.image_embeds, ref.image_embeds, TOL)
    assert_close(ours.negative_image_embeds, ref.negative_image_embeds, TOL)


def pil_image(seed: int, size=(40, 48)) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


# --------------------------------------------------------------------------- __call__
CASES = {
    "prompt": dict(prompt="a red cat"),
    "negative_prompt": dict(prompt="a red cat", negative_prompt="blue dog"),
    "images_per_prompt": dict(prompt="a red cat", num_images_per_prompt=3),
    "prompt_list": dict(prompt=["a red cat", "a blue dog"]),
    "prompt_list_negative_list": dict(prompt=["a red cat", "a dog"], negative_prompt=["blue", "red"], num_images_per_prompt=2),
    "no_guidance": dict(prompt="a red cat", guidance_scale=1.0),
    "no_guidance_negative": dict(prompt="a red cat", negative_prompt="dog", guidance_scale=1.0),
    "empty_prompt": dict(prompt=""),
    "truncated_prompt": dict(prompt="a red cat " * 40, negative_prompt="dog " * 90),
}


@pytest.mark.parametrize("case", list(CASES))
def test_call_matches_reference(pipes, case):
    ours, ref, _ = pipes
    kwargs = CASES[case]
    expected = ref(**kwargs, num_inference_steps=STEPS, generator=gen(1))
    got = ours(**kwargs, num_inference_steps=STEPS, generator=gen(1), progress=False)
    n = len(kwargs["prompt"]) if isinstance(kwargs["prompt"], list) else 1
    assert got.image_embeds.shape == (n * kwargs.get("num_images_per_prompt", 1), PRIOR_EMBED_DIM)
    assert_same(got, expected)


def test_call_with_latents_and_generator_list(pipes):
    ours, ref, _ = pipes
    latents = torch.randn(4, PRIOR_EMBED_DIM, generator=gen(5))  # (2 prompts x 2 rows: prompt + negative)
    kwargs = dict(prompt="a red cat", negative_prompt="dog", num_images_per_prompt=2, num_inference_steps=STEPS)
    expected = ref(**kwargs, latents=latents, generator=[gen(s) for s in range(4)])
    got = ours(**kwargs, latents=latents, generator=[gen(s) for s in range(4)], progress=False)
    assert_same(got, expected)


def test_default_negative_is_zero_image_embedding(pipes):
    ours, ref, _ = pipes
    zero = ref.get_zero_embed(batch_size=2)
    assert_close(ours.zero_image_embeds(2), zero, TOL)
    got = ours("a red cat", num_images_per_prompt=2, num_inference_steps=STEPS, generator=gen(0), progress=False)
    assert_close(got.negative_image_embeds, zero, TOL)
    image_embeds, negative = got  # unpacks
    assert image_embeds is got.image_embeds and negative is got.negative_image_embeds


# --------------------------------------------------------------------------- deviation from the reference
def test_prompt_list_with_one_negative_string(pipes):
    """The reference errors on a list of prompts with one negative string; ours uses the string
    for every prompt, which equals the reference given the string repeated, and each prompt's
    result equals running that prompt alone with the same starting noise and step noise."""
    ours, ref, _ = pipes
    prompts = ["a red cat", "a blue dog"]
    with pytest.raises(ValueError, match="batch size"):
        ref(prompts, negative_prompt="dog", num_inference_steps=STEPS, generator=gen(0))

    got = ours(prompts, negative_prompt="dog", num_inference_steps=STEPS, generator=gen(3), progress=False)
    expected = ref(prompts, negative_prompt=["dog", "dog"], num_inference_steps=STEPS, generator=gen(3))
    assert_same(got, expected)

    # batch rows: [cat, dog-prompt, negative for cat, negative for dog-prompt], one generator each
    seeds = [10, 11, 12, 13]
    got = ours(prompts, negative_prompt="dog", num_inference_steps=STEPS,
               generator=[gen(s) for s in seeds], progress=False)
    for i, prompt in enumerate(prompts):
        alone = ref(prompt, negative_prompt="dog", num_inference_steps=STEPS,
                    generator=[gen(seeds[i]), gen(seeds[2 + i])])
        assert_close(got.image_embeds[i : i + 1], alone.image_embeds, TOL)
        assert_close(got.negative_image_embeds[i : i + 1], alone.negative_image_embeds, TOL)


# --------------------------------------------------------------------------- interpolate
def test_interpolate_texts_and_images(pipes):
    ours, ref, _ = pipes
    pixel_values = torch.randn(1, 3, PRIOR_IMAGE_SIZE, PRIOR_IMAGE_SIZE, generator=gen(7))
    items = ["a red cat", pil_image(0), "a blue dog", pixel_values]
    weights = [0.3, 0.2, 0.4, 0.1]
    kwargs = dict(num_images_per_prompt=2, num_inference_steps=STEPS)
    expected = ref.interpolate(items, weights, generator=gen(2), **kwargs)
    got = ours.interpolate(items, weights, generator=gen(2), progress=False, **kwargs)
    assert got.image_embeds.shape == (2, PRIOR_EMBED_DIM)
    assert_same(got, expected)


@pytest.mark.parametrize("negative_prior_prompt, negative_prompt", [("dog", ""), (None, "blue"), ("dog", "blue")])
def test_interpolate_negatives(pipes, negative_prior_prompt, negative_prompt):
    ours, ref, _ = pipes
    items, weights = ["a red cat", pil_image(1)], [0.6, 0.4]
    kwargs = dict(num_inference_steps=STEPS, negative_prior_prompt=negative_prior_prompt, negative_prompt=negative_prompt)
    expected = ref.interpolate(items, weights, generator=gen(4), **kwargs)
    got = ours.interpolate(items, weights, generator=gen(4), progress=False, **kwargs)
    assert_same(got, expected)


# --------------------------------------------------------------------------- emb2emb
EMB2EMB_CASES = {
    "pil": dict(prompt="a red cat", strength=0.5),
    "negative_prompt": dict(prompt="a red cat", strength=0.7, negative_prompt="blue dog"),
    "full_strength": dict(prompt="a red cat", strength=1.0, num_images_per_prompt=2),
    "prompt_list_one_image": dict(prompt=["a red cat", "a dog"], strength=0.5, num_images_per_prompt=2),
    "no_guidance": dict(prompt="a red cat", strength=0.5, guidance_scale=1.0),
}


@pytest.mark.parametrize("case", list(EMB2EMB_CASES))
def test_emb2emb_matches_reference(pipes, case):
    ours, _, ref = pipes
    kwargs = dict(EMB2EMB_CASES[case], num_inference_steps=6)
    expected = ref(image=pil_image(2), generator=gen(6), **kwargs)
    got = ours.emb2emb(image=pil_image(2), generator=gen(6), progress=False, **kwargs)
    assert_same(got, expected)


def test_emb2emb_image_inputs(pipes):
    """Embeddings (B, D), pixel_values tensors and one image per prompt, vs the reference."""
    ours, _, ref = pipes
    embeds = torch.randn(2, PRIOR_EMBED_DIM, generator=gen(8))
    pixels = torch.randn(2, 3, PRIOR_IMAGE_SIZE, PRIOR_IMAGE_SIZE, generator=gen(9))
    prompts = ["a red cat", "a dog"]
    for image in (embeds, pixels, [pil_image(3), pil_image(4)]):
        kwargs = dict(prompt=prompts, negative_prompt=["blue", "red"], strength=0.5, num_inference_steps=6)
        expected = ref(image=image, generator=gen(11), **kwargs)
        got = ours.emb2emb(image=image, generator=gen(11), progress=False, **kwargs)
        assert_same(got, expected)


# --------------------------------------------------------------------------- encode_image
def test_encode_image(pipes):
    ours, ref, _ = pipes
    images = [pil_image(5), pil_image(6, size=(64, 30))]

    def reference(imgs):
        pixels = ref.image_processor(imgs, return_tensors="pt").pixel_values
        return ref.image_encoder(pixels).image_embeds

    with torch.no_grad():
        expected = reference(images)
    assert_close(ours.encode_image(images), expected, TOL)
    assert_close(ours.encode_image(images[0]), expected[:1], TOL)
    arrays = [np.asarray(im) for im in images]  # uint8 (H, W, 3)
    assert_close(ours.encode_image(arrays), expected, TOL)
    pixels = ref.image_processor(images, return_tensors="pt").pixel_values  # tensors: pixel_values
    assert_close(ours.encode_image(pixels), expected, TOL)
    assert_close(ours.encode_image(list(pixels)), expected, TOL)
    # a [0, 1] image tensor goes through the image processor first
    as_tensor = torch.from_numpy(arrays[0]).permute(2, 0, 1).float() / 255
    assert_close(ours.encode_image(ours.image_processor(as_tensor)), expected[:1], TOL)


def test_bfloat16(prior_pipeline_folder, pipes):
    folder, ref = prior_pipeline_folder
    half = PriorPipeline.from_pretrained(folder, dtype=torch.bfloat16)
    got = half("a red cat", num_inference_steps=STEPS, generator=gen(0), progress=False)
    assert got.image_embeds.dtype == got.negative_image_embeds.dtype == torch.bfloat16
    expected = ref("a red cat", num_inference_steps=STEPS, generator=gen(0))
    assert_close(got.image_embeds.float(), expected.image_embeds, 0.1)
    assert_close(got.negative_image_embeds.float(), expected.negative_image_embeds, 0.05)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(prompt=["a", "b"], negative_prompt=["c"]), ValueError, "one negative prompt per prompt"),
        (dict(prompt=[]), ValueError, "empty"),
        (dict(prompt=3), TypeError, "string or a list of strings"),
        (dict(prompt="a", negative_prompt=[1]), TypeError, "negative_prompt"),
        (dict(prompt="a", num_inference_steps=0), ValueError, "num_inference_steps"),
        (dict(prompt="a", num_inference_steps=-3), ValueError, "num_inference_steps"),
        (dict(prompt="a", num_images_per_prompt=0), ValueError, "num_images_per_prompt"),
        (dict(prompt="a", latents=torch.zeros(1, PRIOR_EMBED_DIM), negative_prompt="b"), ValueError, r"\(2, 32\)"),
        (dict(prompt="a", generator=[torch.Generator()] * 3), ValueError, "one generator per"),
        (dict(prompt="a", guidance_scale="4"), TypeError, "guidance_scale"),
    ],
)
def test_call_errors(pipes, kwargs, error, match):
    ours, _, _ = pipes
    with pytest.raises(error, match=match):
        ours(**{"num_inference_steps": STEPS, "progress": False, **kwargs})


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(strength=0.0), ValueError, r"strength.*\(0, 1\]"),
        (dict(strength=1.5), ValueError, r"strength.*\(0, 1\]"),
        (dict(strength=0.1, num_inference_steps=5), ValueError, "no denoising step"),
        (dict(prompt=["a", "b", "c"], image=torch.zeros(2, PRIOR_EMBED_DIM)), ValueError, "one per prompt"),
        (dict(image=torch.zeros(1, 7)), ValueError, r"\(B, 32\)"),
        (dict(image=torch.zeros(1, 3, 9, 9)), ValueError, "pixel_values"),
        (dict(image="not an image"), TypeError, "PIL images"),
        (dict(prompt=["a", "b"], negative_prompt=["c", "d", "e"]), ValueError, "one negative prompt per prompt"),
    ],
)
def test_emb2emb_errors(pipes, kwargs, error, match):
    ours, _, _ = pipes
    args = {"prompt": "a", "image": torch.zeros(1, PRIOR_EMBED_DIM), "num_inference_steps": STEPS, "progress": False}
    with pytest.raises(error, match=match):
        ours.emb2emb(**{**args, **kwargs})


@pytest.mark.parametrize(
    "items, weights, error, match",
    [
        (["a", "b"], [1.0], ValueError, "one weight per item"),
        ([], [], ValueError, "empty"),
        (["a", 3], [0.5, 0.5], TypeError, r"images_and_prompts\[1\]"),
        (["a", torch.zeros(2, 3, PRIOR_IMAGE_SIZE, PRIOR_IMAGE_SIZE)], [0.5, 0.5], ValueError, "one image per item"),
        (["a"], ["x"], TypeError, "weights"),
    ],
)
def test_interpolate_errors(pipes, items, weights, error, match):
    ours, _, _ = pipes
    with pytest.raises(error, match=match):
        ours.interpolate(items, weights, num_inference_steps=STEPS, progress=False)


def test_from_pretrained_errors(prior_pipeline_folder, tmp_path):
    folder, _ = prior_pipeline_folder
    with pytest.raises(FileNotFoundError, match="no such folder|not a local folder"):
        PriorPipeline.from_pretrained(tmp_path / "missing")
    (tmp_path / "prior").mkdir()
    with pytest.raises(FileNotFoundError, match="lacks the subfolder"):
        PriorPipeline.from_pretrained(tmp_path)


# --------------------------------------------------------------------------- two steps, non-finite values, arguments
def test_prior_two_steps(pipes):
    ours, ref, _ = pipes
    for kw in (dict(prompt="a red cat", negative_prompt="a dog"), dict(prompt=["a red cat", "a dog"])):
        got = ours(**kw, num_inference_steps=2, generator=gen(14), progress=False)
        exp = ref(**kw, num_inference_steps=2, generator=gen(14))
        assert rel_err(got.image_embeds, exp.image_embeds) < TOL
        assert rel_err(got.negative_image_embeds, exp.negative_image_embeds) < TOL
    with pytest.raises(ValueError, match="num_inference_steps"):
        ours("a red cat", num_inference_steps=1, progress=False)


def test_non_finite_and_misnamed_arguments(pipes):
    ours = pipes[0]
    with pytest.raises(ValueError, match="`guidance_scale` must be a finite number"):
        ours("a", guidance_scale=float("inf"), progress=False)
    with pytest.raises(TypeError, match=r"torch.Generator\(\).manual_seed"):
        ours("a", generator=0, progress=False)
    out = ours.interpolate(["a", "b"], [0.5, 0.5], negative_prompt=None, num_inference_steps=2,
                           progress=False)  # None accepted, as by every other method
    assert out.image_embeds.shape[0] == 1
