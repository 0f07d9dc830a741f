"""kandinsky/research/viz.py: the colour map, the reductions of attention probabilities, the
words of a prompt, the pictures and `kandinsky attention`, on the tiny random demo checkpoints."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import kandinsky
from kandinsky.research import Record, viz


@pytest.fixture(scope="module")
def pictures(random_demo_kandinsky):
    return viz.attention_pictures(random_demo_kandinsky, "a red cat", steps=[0, 1], trajectory=True,
                                  num_inference_steps=2, prior_num_inference_steps=2, height=64, width=64,
                                  generator=torch.Generator().manual_seed(0), progress=False)


def test_colormap_is_monotone_from_dark_to_bright():
    values = np.linspace(0, 1, 50)
    rgb = viz.colorize(values).astype(float)
    assert (rgb[0] == viz.COLORMAP[0]).all() and (rgb[-1] == viz.COLORMAP[-1]).all()
    luminance = rgb @ np.array([0.299, 0.587, 0.114])
    assert (np.diff(luminance) >= -1e-6).all()
    assert viz.heatmap(np.eye(4), (40, 20)).size == (40, 20)


def test_image_token_share_and_prd_row_from_probabilities():
    probs = torch.rand(2, 3, 16, 32 + 16).softmax(-1)
    share = viz.image_token_share(probs)
    torch.testing.assert_close(share, probs[..., :32].sum(-1).mean(1))
    prior = torch.rand(2, 4, 3, 81).softmax(-1)
    torch.testing.assert_close(viz.prd_to_text(prior, text_tokens=77), prior[:, :, 2, :77].mean(1))
    assert viz._grid_shape(8 * 16, aspect=2.0) == (8, 16)
    assert viz.unet_level("unet.up.1.attn.2") == "unet.up.1" and viz.unet_level("unet.mid.attn") == "unet.mid"


def test_words_join_bpe_pieces(random_demo_kandinsky):
    words = viz.words_of(random_demo_kandinsky.prior.tokenizer, "a red cat")
    assert [w for w, _ in words] == ["<|startoftext|>", "a", "red", "cat", "<|endoftext|>"]
    positions = [p for _, ps in words for p in ps]
    assert positions == list(range(len(positions)))  # every real token once, in order


def test_attention_pictures(pictures, random_demo_kandinsky):
    grid, words = pictures["decoder"], pictures["prior"]
    levels = {viz.unet_level(n) for n in kandinsky.module_names(random_demo_kandinsky, "unet.*.attn*", size=(64, 64))
              if re.search(r"attn(\.\d+)?$", n)}
    assert grid.size == (64 + (len(levels) + 1) * 128, 18 + 2 * 128 + 22)  # 2 steps, image + one per level
    assert words.size[1] == 20 + 5 * 28 + 26  # one row per word of "a red cat" with start / end tokens
    assert pictures["trajectory"].size[0] > pictures["trajectory"].size[1]  # steps across


def test_prior_word_matrix_equals_the_recorded_probabilities(random_demo_kandinsky):
    g = torch.Generator().manual_seed(1)
    pipe = random_demo_kandinsky
    with kandinsky.capture(pipe, "prior.blocks.1.attn", attention=True, steps=[0], branch="cond") as rec:
        random_demo_kandinsky.prior("a red cat", num_inference_steps=2, generator=g, progress=False)
    probs = rec["prior.blocks.1.attn", 0, "cond"]  # (1, heads, Lq, 81)
    words = viz.words_of(random_demo_kandinsky.prior.tokenizer, "a red cat")
    reduced = viz.prd_to_text(probs, rec.meta["prior.blocks.1.attn"]["text_tokens"])
    rec2 = Record()
    rec2.add("prior.blocks.1.attn", 0, "cond", reduced)
    layers, matrix = viz.word_attention(rec2, words)
    expected = [probs[0, :, -1, ps].sum(-1).mean().item() for _, ps in words]
    np.testing.assert_allclose(matrix[:, 0], expected, rtol=1e-5)
    assert matrix.sum() <= 1 + 1e-5  # a share of the prd token's attention


def test_attention_pictures_of_chosen_levels(pictures, random_demo_kandinsky):
    """levels=: the decoder grid of those UNet levels only (unet_levels lists them, in the grid's order); all of
    them is the default grid, bit for bit; an unknown level is refused naming the known ones."""
    levels = viz.unet_levels(random_demo_kandinsky)
    parts = [level.split(".")[1] for level in levels]
    assert parts == sorted(parts, key=["down", "mid", "up"].index) and "mid" in parts and len(levels) > 2
    options = dict(steps=[0, 1], trajectory=True, num_inference_steps=2, prior_num_inference_steps=2, height=64,
                   width=64, progress=False)
    every = viz.attention_pictures(random_demo_kandinsky, "a red cat", levels=levels,
                                   generator=torch.Generator().manual_seed(0), **options)
    np.testing.assert_array_equal(np.asarray(every["decoder"]), np.asarray(pictures["decoder"]))
    one = viz.attention_pictures(random_demo_kandinsky, "a red cat", levels=levels[-1:],
                                 generator=torch.Generator().manual_seed(0), **options)["decoder"]
    assert one.size == (64 + 2 * 128, 18 + 2 * 128 + 22)  # the image and that level, for 2 steps
    with pytest.raises(ValueError, match=f"levels must be UNet levels of this decoder \\({levels[0]}, "):
        viz.attention_pictures(random_demo_kandinsky, "a red cat", levels=["unet.sideways"], **options)
