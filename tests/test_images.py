"""Pictures in and out of the decoder pipelines (kandinsky/pipelines/images.py): image, hint and mask
forms, modes and sizes, as the loaders read them and as the reference reads the same picture; the
inpainting mask's growth; the checks on bad inputs. Tiny random checkpoints of tests/refs/, fp32,
1e-4 relative error against the reference."""
from __future__ import annotations

import warnings

import numpy as np
import PIL.Image
import pytest
import torch

from kandinsky.pipelines.images import check_same_size, grow_repaint_area, input_size, load_masks
from tests.helpers import embeds, gen, reference_variant, rel_err, repaint_mask, rgb, unit

TOL = 1e-4
SIZE = dict(height=64, width=64)

# fixtures `decoder`, `inpainter`, `controlnet`: (our DecoderPipeline, reference) in tests/refs/decoder_pipeline.py


# --------------------------------------------------------------------------- every documented mask form
def _mask_forms(mask: np.ndarray) -> dict:
    """The documented forms (docs/usage.md, "Inputs") of the float {0, 1} (H, W) ``mask`` (1 = repaint)."""
    u8 = (mask * 255).astype(np.uint8)
    red = np.zeros((*mask.shape, 3), dtype=np.uint8)
    red[..., 0] = u8  # a red stroke: a mask's value is its brightest channel
    layer = np.zeros((*mask.shape, 4), dtype=np.uint8)
    layer[..., 2], layer[..., 3] = 255, u8  # a blue stroke on a transparent layer: read by its alpha
    t = torch.from_numpy(mask)
    return {
        "PIL L": PIL.Image.fromarray(u8, mode="L"),
        "PIL RGB": PIL.Image.fromarray(red, mode="RGB"),
        "PIL RGBA": PIL.Image.fromarray(layer, mode="RGBA"),
        "numpy (H, W)": mask,
        "numpy (H, W, 1)": mask[..., None],
        "numpy (H, W, 3)": red.astype(np.float32) / 255,
        "numpy (B, H, W)": mask[None],
        "numpy (B, H, W, 1)": mask[None, ..., None],
        "numpy (B, H, W, 3)": red[None].astype(np.float32) / 255,
        "numpy (B, 1, H, W)": mask[None, None],
        "torch (H, W)": t,
        "torch (1, H, W)": t[None],
        "torch (3, H, W)": torch.from_numpy(red).permute(2, 0, 1).float() / 255,
        "torch (B, H, W)": t[None],
        "torch (B, 1, H, W)": t[None, None],
        "torch (B, 3, H, W)": torch.from_numpy(red).permute(2, 0, 1)[None].float() / 255,
    }


MASK_FORMS = list(_mask_forms(np.zeros((2, 2), np.float32)))
MASK_RUN = dict(**SIZE, num_inference_steps=1, guidance_scale=4.0, output_type="pt", progress=False)


@pytest.fixture(scope="module")
def mask_2d_output(inpainter):
    """The picture inpainted with the plain (H, W) float mask: what every other form must give."""
    e, n = embeds(1, seed=40)
    return inpainter[0].inpaint(e, rgb(40), repaint_mask(40), n, generator=gen(40), **MASK_RUN).images


@pytest.mark.parametrize("form", MASK_FORMS)
def test_every_mask_form_inpaints_as_the_2d_mask(inpainter, mask_2d_output, form):
    """A (H, W, 3) numpy colour mask was refused by the size check ("got mask_image [(64, 3)]"): each
    documented form is read by the same layout rules for its size as for its values."""
    mask = _mask_forms(repaint_mask(40))[form]
    assert input_size(mask, mask=True) == (64, 64)
    check_same_size(np.asarray(rgb(40)), mask)  # the image as a numpy (H, W, 3) array
    e, n = embeds(1, seed=40)
    got = inpainter[0].inpaint(e, rgb(40), mask, n, generator=gen(40), **MASK_RUN).images
    assert torch.equal(got, mask_2d_output), form


@pytest.mark.parametrize("kind", ["bool_tensor", "bool_numpy", "uint8_01", "HW1_numpy", "1HW_tensor", "B1HW",
                                  "pil_1", "pil_rgb", "pil_P"])
def test_mask_kinds(inpainter, kind):
    """Mask dtypes and PIL modes: the reference's result for the same (H, W) float mask."""
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


def test_masks_painted_in_colour_or_alpha():
    white = np.zeros((32, 32), dtype=np.float32)
    white[8:20, 4:28] = 1
    expected = load_masks(white, 32, 32)
    red = np.zeros((32, 32, 3), dtype=np.uint8)
    red[8:20, 4:28, 0] = 255
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[8:20, 4:28] = (0, 0, 255, 255)  # a blue stroke on a transparent layer
    cases = {
        "red PIL stroke": PIL.Image.fromarray(red),
        "alpha layer": PIL.Image.fromarray(rgba, mode="RGBA"),
        "(H, W, 3) numpy": red.astype(np.float32) / 255,
        "(3, H, W) tensor": torch.from_numpy(red).permute(2, 0, 1).float() / 255,
    }
    for name, mask in cases.items():
        got = load_masks(mask, 32, 32)
        assert got.shape == (1, 1, 32, 32), name
        assert torch.equal(got, expected), name


def test_empty_and_full_masks_warn():
    with pytest.warns(UserWarning, match="repaints nothing"):
        load_masks(np.zeros((16, 16), dtype=np.float32), 16, 16)
    with pytest.warns(UserWarning, match="repaints everything"):
        load_masks(PIL.Image.new("L", (16, 16), 255), 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        half = np.zeros((16, 16), dtype=np.float32)
        half[:8] = 1
        load_masks(half, 16, 16)


def test_bad_masks(inpainter):
    ours, _ = inpainter
    e, n = embeds(1)
    image = rgb(0)
    kw = dict(**SIZE, num_inference_steps=1, output_type="latent", progress=False)
    with pytest.raises(ValueError, match="same size"):
        ours.inpaint(e, image, repaint_mask(0, 64, 128), n, **kw)
    with pytest.raises(ValueError, match="same size"):
        ours.inpaint(e, image, PIL.Image.new("L", (32, 32)), n, **kw)
    with pytest.raises(ValueError, match="same size"):  # a colour mask of another size
        ours.inpaint(e, image, np.repeat(repaint_mask(0, 64, 128)[..., None], 3, axis=-1), n, **kw)
    with pytest.raises(ValueError, match=r"mask values .*must lie in \[0, 1\]"):
        ours.inpaint(e, image, repaint_mask(0) * 255, n, **kw)
    with pytest.raises(ValueError, match=r"mask values .*must lie in \[0, 1\]"):
        ours.inpaint(e, image, torch.from_numpy(repaint_mask(0)) - 0.5, n, **kw)
    with pytest.raises(ValueError, match="masks are"):
        ours.inpaint(e, image, np.zeros((1, 3, 64, 64), np.float32), n, **kw)
    with pytest.raises(ValueError, match="0/255 mask divide by 255"):
        ours.inpaint(e, image, (repaint_mask(0) * 255).astype(np.uint8), n, **kw)
    with pytest.raises(ValueError, match="mask holds NaN"):
        ours.inpaint(e, torch.rand(3, 64, 64), torch.full((64, 64), float("nan")), n, **kw)


# --------------------------------------------------------------------------- the area to repaint
def test_grow_repaint_area_equals_reference_loop():
    from diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2_inpainting import prepare_mask

    g = gen(14)
    for shape, p in [((3, 1, 8, 8), 0.1), ((2, 1, 7, 13), 0.3), ((1, 1, 16, 9), 0.05), ((2, 1, 1, 5), 0.4)]:
        keep = (torch.rand(shape, generator=g) > p).float()
        assert torch.equal(grow_repaint_area(keep), prepare_mask(keep.clone()))
    # values other than 0 / 1 count as "repaint" and are left as they are, as in the loop
    keep = torch.tensor([0.0, 0.5, 1.0])[torch.randint(0, 3, (2, 1, 9, 9), generator=g)]
    assert torch.equal(grow_repaint_area(keep), prepare_mask(keep.clone()))
    # the growth is not symmetric under a left-right flip: (-1, +1) / (+1, -1) are not neighbours
    keep = torch.ones(1, 1, 3, 3)
    keep[0, 0, 1, 1] = 0
    assert grow_repaint_area(keep)[0, 0].tolist() == [[0, 0, 1], [0, 0, 0], [1, 0, 0]]


# --------------------------------------------------------------------------- images and hints
def test_resized_inputs(decoder, inpainter):
    """PIL images (and masks) of another size are resized like the reference does."""
    ours, ref = decoder
    ref = reference_variant(ref, "KandinskyV22Img2ImgPipeline")
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


def test_image_modes(decoder):
    """Grey, palette and RGBA pictures are converted to RGB (alpha dropped): the reference's
    result for the converted picture. (The reference's img2img fails on them.)"""
    ours, ref = decoder
    ref = reference_variant(ref, "KandinskyV22Img2ImgPipeline")
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


def test_bad_images(decoder):
    ours, _ = decoder
    e, n = embeds(1)
    kw = dict(**SIZE, num_inference_steps=1, strength=1.0, output_type="latent", progress=False)
    rgba = np.random.default_rng(0).integers(0, 256, (64, 64, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="4 channels"):
        ours.img2img(e, rgba, n, **kw)
    with pytest.raises(ValueError, match="1 channel"):
        ours.img2img(e, torch.rand(1, 1, 64, 64), n, **kw)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ours.img2img(e, torch.rand(1, 3, 64, 64) * 2 - 1, n, **kw)
    with pytest.raises(TypeError, match="PIL image, numpy array or torch tensor"):
        ours.img2img(e, "cat.png", n, **kw)
    with pytest.raises(ValueError, match="image: the image holds NaN"):
        ours.img2img(e, torch.full((3, 64, 64), float("nan")), n, **kw)
    # PIL images with alpha are converted to RGB (alpha dropped): same result as the RGB image
    pil_rgba = PIL.Image.fromarray(rgba, mode="RGBA")
    a = ours.img2img(e, pil_rgba, n, generator=gen(0), **kw).images
    b = ours.img2img(e, pil_rgba.convert("RGB"), n, generator=gen(0), **kw).images
    c = ours.img2img(e, rgba[..., :3], n, generator=gen(0), **kw).images  # uint8 numpy is 0..255
    # uint8 arrays and PIL images reach [-1, 1] by different float roundings: under 1e-6 of the output on earlier machines, 1.1e-6 with
    # AMX kernels; an unscaled or channel-swapped path gives O(1)
    assert torch.equal(a, b) and rel_err(c, b) < 1e-5
