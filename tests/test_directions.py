"""kandinsky/research/directions.py: named directions (prior means with minus without a concept),
a difference explained as their least-squares combination, and the slider."""
from __future__ import annotations

import pytest
import torch

from kandinsky.research import directions as D


def test_explain_recovers_weights_and_share():
    g = torch.Generator().manual_seed(0)
    red, square, other = torch.randn(3, 32, generator=g)
    exact = D.explain(2.0 * red - 0.5 * square, {"red": red, "square": square})
    assert exact.weights == pytest.approx({"red": 2.0, "square": -0.5}, abs=1e-6)  # float32 inputs
    assert exact.explained == pytest.approx(1.0, abs=1e-12)
    # a part outside the directions' span stays in the residual: explained = 1 - |r|^2 / |d|^2
    difference = red + other
    partial = D.explain(difference, {"red": red})
    residual = difference.double() - partial.weights["red"] * red.double()
    assert float(residual @ red.double()) == pytest.approx(0, abs=1e-9)  # least squares: orthogonal to the span
    assert partial.explained == pytest.approx(1 - float(residual.pow(2).sum() / difference.double().pow(2).sum()))
    torch.testing.assert_close(partial.residual, residual.float())
    with pytest.raises(ValueError, match="at least one named direction"):
        D.explain(red, {})
    with pytest.raises(ValueError, match="have 32 dimensions but the difference 7"):
        D.explain(torch.randn(7), {"red": red})


def test_direction_is_the_difference_of_prior_means_and_slide(random_demo_kandinsky):
    pipe = random_demo_kandinsky
    with_, without = ["a red cat", "a red dog"], ["a blue cat", "a blue dog"]
    red = D.direction(pipe, with_, without, prior_steps=2, seed=3)

    def mean(prompts):
        return pipe.prior(prompts, num_inference_steps=2, progress=False,
                          generator=torch.Generator().manual_seed(3)).image_embeds.float().mean(0)

    torch.testing.assert_close(red, mean(with_) - mean(without), rtol=0, atol=0)
    torch.testing.assert_close(D.direction(pipe.prior, with_, without, prior_steps=2, seed=3), red, rtol=0, atol=0)
    e = torch.randn(2, red.shape[0])
    torch.testing.assert_close(D.slide(e, red, 0.5), e + 0.5 * red)
    assert torch.equal(D.slide(e, red, 0.0), e)
    with pytest.raises(ValueError, match="two non-empty lists"):
        D.direction(pipe, [], without)


def test_matched_captions_differ_in_the_attribute_alone():
    from kandinsky.data.shapes import parse_caption

    with_a, with_b = D.matched_captions("colour", "red", "green", n=6)
    assert len(with_a) == len(with_b) == 6
    for a, b in zip(with_a, with_b):
        sa, sb = parse_caption(a), parse_caption(b)
        assert sa["colour"] == "red" and sb["colour"] == "green"
        assert sa["background"] not in ("red", "green") and {**sa, "colour": "green"} == sb


def test_attribute_report_on_the_shipped_model():
    """Strength 0 paints A's own embedding (its hits are A's, every other attribute kept), and each
    pair's fit is ``explain`` of e_B - e_A by the direction made from the matched captions."""
    from kandinsky import Kandinsky
    from kandinsky.data.shapes import parse_caption
    from kandinsky.demo import demo_folders
    from kandinsky.research.routes import attribute_pairs

    folders = demo_folders()
    pipe = Kandinsky.from_pretrained(folders["decoder"], prior=folders["prior"])
    kw = dict(num_inference_steps=8, prior_steps=3, references=2)
    report = D.attribute_report(pipe, "size", 2, seeds=[0, 1], strengths=(0.0, 1.0), **kw)
    assert report.pair_of == [0, 0, 1, 1] and len(report.fits) == 2 and set(report.hits) == {0.0, 1.0}
    assert report.hits[0.0] == report.a and report.kept[0.0] == [1.0] * 4
    prompts_a, prompts_b = attribute_pairs("size", 2, seed=0)
    prior = pipe.prior(prompts_a + prompts_b, num_inference_steps=3, progress=False,
                       generator=torch.Generator().manual_seed(0))
    a, b = parse_caption(prompts_a[1])["size"], parse_caption(prompts_b[1])["size"]
    with_a, with_b = D.matched_captions("size", a, b, 2)
    right = D.direction(pipe, with_b, with_a, prior_steps=3, seed=0)
    fit = D.explain(prior.image_embeds[3] - prior.image_embeds[1], {"right": right})
    assert report.fits[1]["explained_right"] == pytest.approx(fit.explained, abs=1e-6)
    assert report.fits[1]["weight_right_alone"] == pytest.approx(fit.weights["right"], abs=1e-6)
    assert 0 <= report.fits[1]["explained_right"] <= report.fits[1]["explained_all"] + 1e-9 <= 1 + 1e-9
