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
