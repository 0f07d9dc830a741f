"""The lens on the text encoder (kandinsky.research.lens): the embeddings at each layer against transformers,
the last layer against the plain run, and the grid, its scores and its command on the shipped shapes model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import kandinsky
from kandinsky.research.lens import exit_after, text_lens
from tests.helpers import assert_close
from weights_convert import load_component

PROMPTS = ["a red circle on a blue background", "a large yellow triangle on the left on a black background"]
FAST = dict(height=64, width=64, num_inference_steps=8, prior_num_inference_steps=4, progress=False)


@pytest.fixture(scope="module")
def shapes_pipe():
    from kandinsky.demo import demo_folders

    folders = demo_folders()
    return kandinsky.Kandinsky.from_pretrained(folders["decoder"], prior=folders["prior"])


@pytest.fixture(scope="module")
def lens(shapes_pipe):
    return text_lens(shapes_pipe, PROMPTS, measure=("clip", "shapes"), **FAST)


def pixels(picture) -> np.ndarray:
    return np.asarray(picture.convert("RGB"))


# ----------------------------------------------------------------------------- against the reference
def test_exit_after_equals_transformers_hidden_states(clip_text_checkpoint):
    """At layer L the tower's outputs are transformers' hidden_states[L] through final_layer_norm (every token),
    pooled at the end-of-text token and projected; rows not asked for keep the tower's own output."""
    folder, ref = clip_text_checkpoint
    ours = load_component(folder).eval()
    depth = ref.config.num_hidden_layers
    ids = torch.randint(0, ref.config.vocab_size - 1, (3, 77), generator=torch.Generator().manual_seed(0))
    ids[:, 9] = ref.config.vocab_size - 1  # the end-of-text token: the largest id (legacy pooling, eos_token_id 2)
    with torch.no_grad():
        want = ref(ids, output_hidden_states=True)
        for layer in range(depth + 1):
            states = ref.text_model.final_layer_norm(want.hidden_states[layer])  # (3, 77, width)
            embeds = ref.text_projection(states[:, 9])  # (3, D)
            with exit_after(ours, layer) as seen:
                got = ours(ids)
            assert_close(got.last_hidden_state, states)
            assert_close(got.text_embeds, embeds)
            assert seen == ([3] if layer < depth else [])  # the last layer installs nothing
            with exit_after(ours, layer, ids[1:2]):  # only the rows holding these ids
                part = ours(ids)
            assert_close(part.text_embeds[1], embeds[1])
            assert_close(part.text_embeds[[0, 2]], want.text_embeds[[0, 2]])
        with exit_after(ours, 0, ids[:1, :5]) as seen:  # ids of another length: no row is the prompts'
            assert_close(ours(ids).text_embeds, want.text_embeds)
        assert seen == [0]
    assert_close(ours(ids).text_embeds, want.text_embeds)  # the hooks are gone after the block


# ----------------------------------------------------------------------------- the maths: the last layer is the plain run
def test_last_layer_is_the_plain_run(shapes_pipe, lens):
    plain = shapes_pipe.text2img(PROMPTS, generator=torch.Generator().manual_seed(0), **FAST).images
    assert lens.layers[-1] == lens.depth == len(shapes_pipe.prior.text_encoder.blocks)
    for p, picture in enumerate(plain):
        assert np.array_equal(pixels(lens.images[p][-1]), pixels(picture))  # bit for bit
    full = shapes_pipe.prior.encode_text(PROMPTS)[0]
    assert torch.equal(lens.text_embeds[-1], full.float())


def test_lens_shapes_scores_and_determinism(shapes_pipe, lens):
    depth = lens.depth
    assert lens.layers == list(range(depth + 1)) and len(lens.images) == 2
    assert all(len(row) == depth + 1 and row[0].size == (64, 64) for row in lens.images)
    assert [tuple(e.shape) for e in lens.text_embeds] == [(2, 64)] * (depth + 1)
    assert not torch.equal(lens.text_embeds[0], lens.text_embeds[-1])  # the layers differ
    assert lens.scores["clip"].shape == (2, depth + 1) and np.all(np.abs(lens.scores["clip"]) <= 1)
    # the shapes scores: the attributes the prompts state; size and position only by the second prompt
    assert list(lens.scores) == ["clip", "shape", "colour", "background", "size", "position"]
    assert np.isnan(lens.scores["size"][0]).all() and np.isfinite(lens.scores["size"][1]).all()
    assert set(np.unique(lens.scores["colour"])) <= {0.0, 1.0}
    again = text_lens(shapes_pipe, PROMPTS, layers=[0, depth], measure="clip", **FAST)
    for p in range(2):  # the same seed, the same pictures
        assert np.array_equal(pixels(again.images[p][0]), pixels(lens.images[p][0]))
        assert np.array_equal(pixels(again.images[p][1]), pixels(lens.images[p][-1]))
    # the same pictures, CLIP-embedded in another batch: equal to float32 rounding
    np.testing.assert_allclose(again.scores["clip"], lens.scores["clip"][:, [0, depth]], rtol=0, atol=1e-6)


def test_lens_picture(lens, tmp_path):
    picture = lens.picture(cell=80)
    assert picture.width >= 200 + 3 * 86 and picture.height > 2 * 80
    picture.save(tmp_path / "lens.png")
    assert (tmp_path / "lens.png").stat().st_size > 0


def test_lens_errors(shapes_pipe):
    with pytest.raises(ValueError, match=r"integer in 0\.\.2"):
        text_lens(shapes_pipe, "a red circle", layers=[3], **FAST)
    with pytest.raises(ValueError, match="measure must be one of"):
        text_lens(shapes_pipe, "a red circle", measure="pixels", **FAST)
    with pytest.raises(ValueError, match="not a caption of the shapes grammar"):
        text_lens(shapes_pipe, "a cat", measure="shapes", **FAST)
    with pytest.raises(TypeError, match="do not pass generator"):
        text_lens(shapes_pipe, "a red circle", generator=torch.Generator(), **FAST)
    with pytest.raises(ValueError, match="one picture per prompt and layer"):
        text_lens(shapes_pipe, "a red circle", num_images_per_prompt=2, **FAST)
    with pytest.raises(TypeError, match="needs a Kandinsky, a PriorPipeline or the CLIP text encoder"):
        text_lens(shapes_pipe.decoder, "a red circle")


# ----------------------------------------------------------------------------- the command
def test_lens_command(tmp_path, capsys):
    from kandinsky.cli import main

    out, scores = tmp_path / "lens.png", tmp_path / "lens.json"
    args = ["lens", "--demo", PROMPTS[0], "--steps", "8", "--prior-steps", "4", "--no-progress", "-o", out,
            "--json", scores]
    assert main(args) == 0
    assert out.is_file() and "wrote" in capsys.readouterr().out
    written = json.loads(scores.read_text())
    assert written["layers"] == [0, 1, 2] and set(written["scores"]) == {"clip", "shape", "colour", "background"}
    assert main(args) == 2  # nothing the user had is overwritten unasked
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--layers", "0,9"]) == 2
    assert "integer in 0..2" in capsys.readouterr().err
    assert main(["lens", "--demo", "a cat", "-o", tmp_path / "cat.png"]) == 2  # --demo measures the shapes grammar
    assert "not a caption of the shapes grammar" in capsys.readouterr().err and not (tmp_path / "cat.png").exists()
