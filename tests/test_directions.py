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
