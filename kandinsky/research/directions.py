"""Named directions in the CLIP image-embedding space the decoder paints (issue 20, item 3).

    red = direction(pipe, ["a red circle", "a red square"], ["a blue circle", "a blue square"])
    explain(e_b - e_a, {"red": red, "square": square})    # weights and the share of the difference explained
    slide(e_a, red, 0.5)                                   # e_a + 0.5 * red: a slider, no training

A direction is the prior's mean image embedding for prompts with the concept minus its mean for
prompts without it (the prior sampled with one generator seed per run). ``explain`` fits the
difference of two embeddings as a least-squares combination of the named directions.
"""
from __future__ import annotations

import dataclasses

import torch


def direction(pipe, with_concept: list[str], without_concept: list[str], *, prior_steps: int = 25,
              seed: int = 0) -> torch.Tensor:
    """mean prior(with_concept) - mean prior(without_concept): (D,) (``pipe``: Kandinsky or PriorPipeline)."""
    prior = pipe.prior if hasattr(pipe, "decoder") else pipe  # Kandinsky: its PriorPipeline
    if not with_concept or not without_concept:
        raise ValueError("direction needs prompts with the concept and prompts without it (two non-empty lists)")

    def mean(prompts):
        out = prior(list(prompts), num_inference_steps=prior_steps, progress=False,
                    generator=torch.Generator().manual_seed(seed))
        return out.image_embeds.float().mean(0)

    return mean(with_concept) - mean(without_concept)


@dataclasses.dataclass
class Explanation:
    """``difference`` ~ sum_k weights[k] * directions[k]; ``explained``: the share of the difference's
    squared norm the fit accounts for, 1 - |residual|^2 / |difference|^2."""

    weights: dict[str, float]
    explained: float
    residual: torch.Tensor  # (D,)


def explain(difference: torch.Tensor, directions: dict[str, torch.Tensor]) -> Explanation:
    """The difference of two image embeddings (D,) as a least-squares combination of named directions."""
    if not directions:
        raise ValueError("explain needs at least one named direction, e.g. {'red': direction(pipe, ...)}")
    difference = difference.reshape(-1).double()
    names = list(directions)
    basis = torch.stack([directions[n].reshape(-1).double() for n in names], dim=1)  # (D, K)
    if basis.shape[0] != difference.shape[0]:
        raise ValueError(f"the directions have {basis.shape[0]} dimensions but the difference {difference.shape[0]}")
    weights = torch.linalg.lstsq(basis, difference[:, None]).solution[:, 0]  # (K,)
    residual = difference - basis @ weights
    total = float(difference.pow(2).sum())
    explained = 1.0 - float(residual.pow(2).sum()) / total if total > 0 else float("nan")
    return Explanation({n: float(w) for n, w in zip(names, weights)}, explained, residual.float())


def slide(embeds: torch.Tensor, direction: torch.Tensor, strength: float) -> torch.Tensor:
    """``embeds + strength * direction`` (embeds (N, D) or (D,)), in the embeddings' dtype and device."""
    return embeds + strength * direction.to(device=embeds.device, dtype=embeds.dtype)


# ----------------------------------------------------------------------------- how often a direction works
def matched_captions(attribute: str, a: str, b: str, n: int = 32, seed: int = 1) -> tuple[list[str], list[str]]:
    """``n`` shapes-grammar scenes drawn from ``seed`` as full captions with ``attribute`` = a, and the
    same scenes with it = b (colour and background never equal): the prompts of the a -> b direction."""
    from kandinsky.data import shapes

    partner = {"colour": "background", "background": "colour"}.get(attribute)
    with_a, with_b, i = [], [], 0
    while len(with_a) < n:
        scene = shapes.random_scene(shapes.rng_for(seed, 1000 + i), **{attribute: a})
        i += 1
        if partner and getattr(scene, partner) in (a, b):
            continue
        with_a.append(shapes.caption(scene))
        with_b.append(shapes.caption(dataclasses.replace(scene, **{attribute: b})))
    return with_a, with_b


@dataclasses.dataclass
class DirectionReport:
    """What :func:`attribute_report` measured, per picture (pairs x seeds, ``pair_of``: picture -> pair):
    ``hits[s]`` 1 where the analyser finds B's value of the attribute in the picture of A's embedding
    + s x the named direction, ``kept[s]`` 1 where every other attribute reads as in A's own picture;
    ``a`` / ``b`` the hits of A's and B's own runs; ``fits`` per pair: ``explain`` of e_B - e_A."""

    attribute: str
    pair_of: list[int]
    hits: dict[float, list[float]]
    kept: dict[float, list[float]]
    a: list[float]
    b: list[float]
    fits: list[dict]


def attribute_report(pipe, attribute: str, n: int = 64, *, seeds=(0, 1), strengths=(0.5, 1.0, 1.5),
                     num_inference_steps: int = 20, prior_steps: int = 25, references: int = 32) -> DirectionReport:
    """How often a named direction reproduces an attribute change, on the shapes model: for ``n`` caption
    pairs that differ in ``attribute`` alone (``routes.attribute_pairs(attribute, n, seed=0)``), the
    named direction from A's value to B's (``direction`` over ``references`` held-out scenes of
    :func:`matched_captions`) is added to A's embedding at each strength and the pictures analysed.
    ``fits``: the difference e_B - e_A explained by that direction alone ("explained_right",
    "weight_right_alone"), by it and one direction per other attribute (from A's value to another drawn
    value: "explained_all", "weight_right", "right_largest": its |weight| x |direction| the largest),
    by as many random Gaussian directions ("explained_random", chance), and its cosine ("cos_right")."""
    import numpy as np

    from kandinsky.data.analyse import analyse
    from kandinsky.data.evaluate import VALUES
    from kandinsky.data.shapes import parse_caption
    from kandinsky.research.routes import attribute_pairs

    prompts_a, prompts_b = attribute_pairs(attribute, n, seed=0)
    prior = pipe.prior(prompts_a + prompts_b, num_inference_steps=prior_steps, progress=False,
                       generator=torch.Generator().manual_seed(0))
    ea, eb = prior.image_embeds[:n], prior.image_embeds[n:]  # (n, D)
    negative = prior.negative_image_embeds[:n]
    stated_a, stated_b = [parse_caption(p) for p in prompts_a], [parse_caption(p) for p in prompts_b]
    named_directions = {}

    def named(attr, a, b):  # the a -> b direction of attr, computed once
        if (attr, a, b) not in named_directions:
            with_a, with_b = matched_captions(attr, a, b, references)
            named_directions[attr, a, b] = direction(pipe, with_b, with_a, prior_steps=prior_steps, seed=0)
        return named_directions[attr, a, b]

    right = torch.stack([named(attribute, stated_a[k][attribute], stated_b[k][attribute]) for k in range(n)])
    rng, fits = np.random.default_rng(7), []
    for k in range(n):
        basis = {"right": right[k]}
        for other in (x for x in VALUES if x != attribute):
            taken = {stated_a[k][other]} | ({stated_a[k]["colour"], stated_a[k]["background"]}
                                            if other in ("colour", "background") else set())
            choices = [v for v in VALUES[other] if v not in taken]
            basis[other] = named(other, stated_a[k][other], choices[rng.integers(len(choices))])
        difference = (eb[k] - ea[k]).float()
        full, alone = explain(difference, basis), explain(difference, {"right": right[k]})
        chance = explain(difference, {str(i): torch.randn(difference.shape[0],
                                                          generator=torch.Generator().manual_seed(100 * k + i))
                                      for i in range(len(basis))})
        share = {name: abs(w) * float(basis[name].norm()) for name, w in full.weights.items()}
        fits.append(dict(weight_right=full.weights["right"], explained_all=full.explained,
                         explained_right=alone.explained, weight_right_alone=alone.weights["right"],
                         right_largest=max(share, key=share.get) == "right", explained_random=chance.explained,
                         cos_right=float(torch.nn.functional.cosine_similarity(difference, right[k].float(), dim=0))))
    seeds = [int(s) for s in seeds]
    pair_of = [k for k in range(n) for _ in seeds]

    def paint(embeds):
        generators = [torch.Generator().manual_seed(s) for _ in range(n) for s in seeds]
        return [analyse(p) for p in pipe.decoder.text2img(
            embeds[pair_of], negative[pair_of], generator=generators, num_inference_steps=num_inference_steps,
            height=64, width=64, progress=False).images]

    found_a = paint(ea)
    others = [x for x in VALUES if x != attribute]

    def hits(found):
        return [float(getattr(f, attribute) == stated_b[k][attribute]) for f, k in zip(found, pair_of)]

    out = DirectionReport(attribute, pair_of, {}, {}, hits(found_a), hits(paint(eb)), fits)
    for s in strengths:
        found = paint(slide(ea, right, s))
        out.hits[s] = hits(found)
        out.kept[s] = [float(all(getattr(f, x) == getattr(fa, x) for x in others)) for f, fa in zip(found, found_a)]
    return out
