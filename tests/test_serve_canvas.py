"""kandinsky.serve.canvas: the studio's picture logic (no Gradio), checked with numbers."""
import struct
import zlib

import numpy as np
import PIL.Image
import pytest

from kandinsky.serve import canvas
from kandinsky.serve.studio import check_options, parameters_text, parse_parameters, resolve_seed


def picture(w=40, h=30, seed=0):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def bomb_png(path, width=100_000, height=100_000):
    """A PNG whose header claims width x height pixels (a decompression bomb's shape; never decoded)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


# ----------------------------------------------------------------------------- uploads
def test_open_upload_reads_pictures_upright(tmp_path):
    image = picture(40, 30)
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to show
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    opened = canvas.open_upload(tmp_path / "rotated.jpg")
    assert opened.size == (30, 40)  # turned upright as viewers show it


@pytest.mark.parametrize("case, message", [
    ("text", "is not a picture this studio can read"),
    ("bomb", "more pixels than this studio reads (1,200, kandinsky serve --max-pixels)"),
    ("large", "41 x 30 = 1,230 pixels, more than this studio reads (1,200, kandinsky serve --max-pixels)"),
    ("missing", "no picture given"),
])
def test_open_upload_refuses(tmp_path, case, message):
    path = {"text": tmp_path / "notes.png", "bomb": tmp_path / "bomb.png", "large": tmp_path / "large.png",
            "missing": None}[case]
    if case == "text":
        path.write_text("not a picture")
    if case == "bomb":
        bomb_png(path)
    if case == "large":
        picture(41, 30).save(path)
    with pytest.raises(canvas.UploadError) as e:
        canvas.open_upload(path, "picture", max_pixels=1200)
    assert message in str(e.value)
    assert str(tmp_path) not in str(e.value)  # never a server path
    if case == "large":
        picture(40, 30).save(path)
        assert canvas.open_upload(path, max_pixels=1200).size == (40, 30)  # the limit itself is allowed


# ----------------------------------------------------------------------------- masks
def test_mask_from_layers_is_the_union_of_alphas_any_colour():
    a = PIL.Image.new("RGBA", (8, 6), (0, 0, 0, 0))
    a.putpixel((1, 1), (255, 0, 0, 255))
    b = PIL.Image.new("RGBA", (4, 3), (0, 0, 0, 0))  # another size: scaled (nearest) to the picture's
    b.putpixel((3, 2), (0, 255, 0, 1))  # barely painted still counts
    mask = np.asarray(canvas.mask_from_layers([a, b, None], (8, 6)))
    expected = np.zeros((6, 8), np.uint8)
    expected[1, 1] = 255
    expected[4:6, 6:8] = 255
    np.testing.assert_array_equal(mask, expected)
    assert canvas.mask_from_layers([], (8, 6)).getbbox() is None


def test_uploaded_masks_are_read_as_the_python_api_reads_them():
    from kandinsky.pipelines.images import load_masks

    forms = {
        "grey": PIL.Image.fromarray(np.array([[0, 127, 128, 255]], np.uint8)),
        "colour (brightest channel)": PIL.Image.fromarray(np.array([[[0, 0, 0], [90, 0, 0], [0, 200, 0],
                                                                     [255, 255, 255]]], np.uint8)),
        "transparent = keep": PIL.Image.fromarray(np.array([[[255, 255, 255, 0], [0, 0, 0, 100], [0, 0, 0, 130],
                                                             [9, 9, 9, 255]]], np.uint8)),
        "16-bit": PIL.Image.fromarray(np.array([[0, 30000, 40000, 65535]], np.uint16)),
    }
    for name, mask in forms.items():
        ours = np.asarray(canvas.binary_mask(mask))
        assert ours.tolist() == [[0, 0, 255, 255]], name
        np.testing.assert_array_equal(ours / 255, load_masks(mask, 1, 4)[0, 0].numpy())


def test_feather_blurs_and_zero_is_identity():
    mask = PIL.Image.new("L", (21, 21), 0)
    mask.paste(255, (5, 5, 16, 16))
    assert canvas.feather(mask, 0) is mask
    soft = np.asarray(canvas.feather(mask, 2)).astype(int)
    assert soft[10, 10] >= 250 and 0 < soft[10, 4] < 128 < soft[10, 5] < 250 and soft[0, 0] == 0  # soft edges only
    with pytest.raises(ValueError, match="mask blur must be 0 or more"):
        canvas.feather(mask, -1)


# ----------------------------------------------------------------------------- crop and paste
def test_crop_box_pads_fits_aspect_and_stays_inside():
    mask = PIL.Image.new("L", (100, 80), 0)
    mask.paste(255, (40, 30, 50, 40))  # a 10 x 10 square
    assert canvas.crop_box(mask, padding=5) == (35, 25, 55, 45)
    assert canvas.crop_box(mask, padding=5, aspect=2.0) == (25, 25, 65, 45)  # 40 x 20
    corner = PIL.Image.new("L", (100, 80), 0)
    corner.paste(255, (0, 0, 4, 4))
    assert canvas.crop_box(corner, padding=8) == (0, 0, 20, 20)  # slid inside: still 20 x 20
    assert canvas.crop_box(corner, padding=60) == (0, 0, 100, 80)  # larger than the picture: clipped
    with pytest.raises(ValueError, match="the mask is empty"):
        canvas.crop_box(PIL.Image.new("L", (10, 10), 0))


def test_paste_back_keeps_unmasked_pixels_exactly():
    original, generated = picture(40, 30, seed=1), picture(64, 64, seed=2)
    mask = PIL.Image.new("L", (40, 30), 0)
    mask.paste(255, (10, 10, 20, 20))
    box = (5, 5, 25, 25)
    out = np.asarray(canvas.paste_back(original, generated, mask, box))
    keep = np.asarray(mask) == 0
    np.testing.assert_array_equal(out[keep], np.asarray(original)[keep])
    crop = np.asarray(generated.resize((20, 20), PIL.Image.LANCZOS))
    np.testing.assert_array_equal(out[10:20, 10:20], crop[5:15, 5:15])  # the generated crop, scaled back
    whole = np.asarray(canvas.paste_back(original, picture(40, 30, seed=3), mask))
    np.testing.assert_array_equal(whole[10:20, 10:20], np.asarray(picture(40, 30, seed=3))[10:20, 10:20])


def test_outpaint_extends_the_canvas_and_masks_the_new_area():
    image = picture(10, 6)
    grown, mask = canvas.outpaint(image, left=3, right=1, top=2, bottom=0)
    assert grown.size == mask.size == (14, 8)
    g, m = np.asarray(grown), np.asarray(mask)
    np.testing.assert_array_equal(g[2:, 3:13], np.asarray(image))
    np.testing.assert_array_equal(g[2:, 0], np.asarray(image)[:, 0])  # the edge repeated
    assert (m[2:, 3:13] == 0).all() and m.sum() == 255 * (14 * 8 - 10 * 6)
    inner = PIL.Image.new("L", (10, 6), 0)
    inner.putpixel((4, 4), 255)
    grown_mask = np.asarray(canvas.grow_mask(inner, 3, 1, 2, 0))
    assert grown_mask[6, 7] == 255 and grown_mask[2:, 3:13].sum() == 255 and grown_mask.sum() == m.sum() + 255
    with pytest.raises(ValueError, match="whole pixels, 0 or more"):
        canvas.outpaint(image, left=-1)


# ----------------------------------------------------------------------------- parameters
def test_parameters_text_round_trips():
    params = {"prompt": "a red circle", "negative_prompt": "blur", "task": "text2img", "num_inference_steps": 20,
              "scheduler": "ddim", "guidance_scale": 4.0, "seed": 7, "size": "64x64", "model": "demo"}
    text = parameters_text(params)
    assert text == ("a red circle\nNegative prompt: blur\nTask: text2img, Steps: 20, Sampler: ddim, CFG scale: 4.0, "
                    "Seed: 7, Size: 64x64, Model: demo")
    assert parse_parameters(text) == {k: str(v) for k, v in params.items()}
    several = {**params, "prompt": "a red circle,\non a blue background", "negative_prompt": "blur\nnoise"}
    assert parse_parameters(parameters_text(several)) == {k: str(v) for k, v in several.items()}


def test_parameters_values_are_quoted_where_they_must_be():
    """A value with ", " (or a colon, a double quote, a line break, spaces at an end, nothing) is written as a
    JSON string, the `Label: "a, b"` convention other tools read; every value reads back as it was."""
    mix = {"prompt": "", "task": "interpolate", "prompt_1": 'a red circle, "big": 2\nlines', "prompt_weight_1": 0.7,
           "prompt_2": "", "prompt_weight_2": 0.3, "image_weight_1": 1, "seed": 3, "model": " my model, v2",
           "outpaint_left": 16}
    text = parameters_text(mix)
    assert text == ('\nTask: interpolate, Prompt 1: "a red circle, \\"big\\": 2\\nlines", Prompt weight 1: 0.7, '
                    'Prompt 2: "", Prompt weight 2: 0.3, Image weight 1: 1, Seed: 3, Outpaint left: 16, '
                    'Model: " my model, v2"')
    assert parse_parameters(text) == {"negative_prompt": "", **{k: str(v) for k, v in mix.items()}}


@pytest.mark.parametrize("options, message", [
    ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
    ({"guidance_scale": 1e9}, "guidance_scale must be in [0, 100]"),
    ({"num_inference_steps": 2.5}, "num_inference_steps must be a whole number"),
    ({"width": 4096}, "width must be in [0, 2048]"),
    ({"strength": 0}, "strength must be in (0, 1]"),
    ({"scheduler": "nope"}, "scheduler: "),
    ({"inpaint_area": "everything"}, "inpaint_area must be one of 'whole picture', 'only masked area'"),
])
def test_check_options_refuses_with_the_range(options, message):
    with pytest.raises(ValueError) as e:
        check_options("text2img", options)
    assert message in str(e.value)


def test_seeds():
    assert resolve_seed(5) == 5 and resolve_seed(5.0) == 5 and resolve_seed(2**64 - 1) == 2**64 - 1
    assert 0 <= resolve_seed(-1) < 2**32
    with pytest.raises(ValueError, match=r"seed must be in \[0, "):
        resolve_seed(-2)
