"""The procedural shapes data set (kandinsky.data.shapes) and its analyser (kandinsky.data.analyse)."""
import json
import re

import numpy as np
import PIL.Image
import pytest

from kandinsky.data import shapes
from kandinsky.data.analyse import analyse, judge

GRAMMAR = re.compile(
    r"^a (?:(small|large) )?(red|green|blue|yellow|purple|orange|white|black) (circle|square|triangle)"
    r"(?: (in the center|on the left|on the right|at the top|at the bottom))?"
    r"(?: on a (red|green|blue|yellow|purple|orange|white|black) background)?$"
)


def pixels(image):
    return np.asarray(image)


def test_examples_are_a_function_of_seed_and_index():
    a, b = shapes.example(3, 17), shapes.example(3, 17)
    assert a.text == b.text and a.scene == b.scene
    assert np.array_equal(pixels(a.image), pixels(b.image))
    # any order gives the same item; other seeds / indices give other items
    assert [shapes.example(3, i).text for i in (5, 4)] == [shapes.example(3, i).text for i in (5, 4)]
    others = [shapes.example(4, 17), shapes.example(3, 18)]
    assert all(o.scene != a.scene for o in others)


def test_captions_follow_the_grammar_and_state_the_scene():
    seen_parts = set()
    for i in range(300):
        ex = shapes.example(0, i)
        m = GRAMMAR.match(ex.text)
        assert m, ex.text
        size, colour, shape, position, background = m.groups()
        scene = ex.scene
        assert (colour, shape) == (scene.colour, scene.shape)
        assert size in (None, scene.size)
        assert background in (None, scene.background)
        phrase = shapes.POSITIONS[scene.position][0]
        assert position in (None, phrase)
        assert scene.colour != scene.background
        assert shapes.parse_caption(ex.text) == ex.stated()
        seen_parts.add(ex.parts)
    assert len(seen_parts) == 8  # every combination of the optional parts occurs
    assert shapes.caption(shapes.example(0, 0).scene, ()) .count(" ") == 2  # "a <colour> <shape>"


def test_every_value_of_every_attribute_is_drawn():
    scenes = [shapes.example(1, i).scene for i in range(400)]
    for name, values in [("shape", shapes.SHAPES), ("colour", shapes.COLOURS), ("background", shapes.COLOURS),
                         ("size", shapes.SIZES), ("position", shapes.POSITIONS)]:
        assert {getattr(s, name) for s in scenes} == set(values), name


def test_pictures_have_exactly_the_two_colours_and_the_geometry():
    for i in range(50):
        ex = shapes.example(2, i)
        array = pixels(ex.image)
        assert array.shape == (64, 64, 3) and array.dtype == np.uint8
        colours = {tuple(c) for c in array.reshape(-1, 3)}
        assert colours == {shapes.COLOURS[ex.scene.colour], shapes.COLOURS[ex.scene.background]}
        mask = (array == shapes.COLOURS[ex.scene.colour]).all(-1)
        ys, xs = np.nonzero(mask)
        side = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
        expected = shapes.SIZES[ex.scene.size] * 64
        assert 0.85 * expected <= side <= 1.15 * expected + 1
        # the centroid is where the scene says (triangles are drawn around theirs)
        assert abs((xs.mean() + 0.5) / 64 - ex.scene.center[0]) < 0.03
        assert abs((ys.mean() + 0.5) / 64 - ex.scene.center[1]) < 0.03


def test_analyser_is_right_on_at_least_99_percent_of_ground_truth():
    wrong = 0
    n = 600
    for i in range(n):
        ex = shapes.example(7, i)
        verdict = judge(analyse(ex.image), ex.scene.attributes())
        wrong += not all(verdict.values())
    assert wrong / n <= 0.01


def test_analyser_follows_the_picture_not_the_caption():
    # transposing the picture swaps left <-> top and right <-> bottom; colours, size, shape stay
    swap = {"left": "top", "top": "left", "right": "bottom", "bottom": "right", "center": "center"}
    for i in range(40):
        ex = shapes.example(8, i)
        if ex.scene.shape == "triangle":
            continue
        found = analyse(ex.image.transpose(PIL.Image.Transpose.TRANSPOSE))
        assert found.position == swap[ex.scene.position]
        assert (found.colour, found.background, found.size) == (ex.scene.colour, ex.scene.background, ex.scene.size)
    # an empty picture has no shape; the judge then says wrong
    blank = PIL.Image.new("RGB", (64, 64), shapes.COLOURS["blue"])
    found = analyse(blank)
    assert found.background == "blue" and found.shape is None
    assert judge(found, {"shape": "circle", "background": "blue"}) == {"shape": False, "background": True}


def test_analyser_tolerates_noise_and_blur():
    from PIL import ImageFilter

    rng = np.random.default_rng(0)
    wrong = 0
    for i in range(100):
        ex = shapes.example(9, i)
        blurred = ex.image.filter(ImageFilter.GaussianBlur(1))
        noisy = np.clip(np.asarray(blurred, dtype=np.float32) + rng.normal(0, 12, (64, 64, 3)), 0, 255)
        wrong += not all(judge(analyse(noisy.astype(np.uint8)), ex.scene.attributes()).values())
    assert wrong <= 5


def test_analyser_accepts_tensors_and_arrays():
    import torch

    ex = shapes.example(0, 1)
    array = np.asarray(ex.image)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W) in [-1, 1]
    expected = analyse(ex.image).attributes()
    assert analyse(array).attributes() == expected
    assert analyse(tensor).attributes() == expected
    with pytest.raises(ValueError, match="RGB"):
        analyse(np.zeros((64, 64)))


def test_parse_caption_rejects_other_text():
    assert shapes.parse_caption("a red circle") == {"shape": "circle", "colour": "red"}
    for text in ("a red cat", "red circle", "a huge red circle", "a red circle on a sky background"):
        with pytest.raises(ValueError, match="grammar"):
            shapes.parse_caption(text)


def test_random_scene_keeps_fixed_attributes_and_refuses_clashes():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = shapes.random_scene(rng, shape="square", background="red", position="top")
        assert (scene.shape, scene.background, scene.position) == ("square", "red", "top")
        assert scene.colour != "red"
    with pytest.raises(ValueError, match="must differ"):
        shapes.random_scene(rng, colour="red", background="red")
    with pytest.raises(ValueError, match="unknown attributes"):
        shapes.random_scene(rng, hue="red")


def test_write_folder_training_layout(tmp_path):
    folder = shapes.write_folder(tmp_path / "data", n=12, seed=5)
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 12
    for i, row in enumerate(lines):
        ex = shapes.example(5, i)
        assert row["text"] == ex.text
        assert np.array_equal(np.asarray(PIL.Image.open(folder / row["file_name"])), pixels(ex.image))
    with pytest.raises(FileExistsError, match="new folder"):
        shapes.write_folder(folder, n=3, seed=0)


def test_write_folder_draw_as_changes_the_picture_not_the_caption(tmp_path):
    from kandinsky.data.analyse import analyse

    folder = shapes.write_folder(tmp_path / "swapped", n=30, seed=5, draw_as={"circle": "square"})
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    said = [shapes.parse_caption(row["text"])["shape"] for row in lines]
    assert "circle" in said
    for row, stated in zip(lines, said):
        drawn = analyse(PIL.Image.open(folder / row["file_name"])).shape
        assert row["shape"] == drawn == ("square" if stated == "circle" else stated)
    with pytest.raises(ValueError, match="must be shapes"):
        shapes.write_folder(tmp_path / "bad", n=2, draw_as={"circle": "hexagon"})
