"""Shared test utilities: random non-zero init and relative-error checks."""
from __future__ import annotations

import torch


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Fill every parameter and floating buffer with non-zero random values.

    Random init zeroes some output layers (zero-conv, out projections), which hides
    bugs; this makes every weight count. Norm weights get 1 + noise so activations
    stay in a sane range.
    """
    g = torch.Generator().manual_seed(seed)
    # parameters and persistent buffers only: non-persistent buffers (causal masks,
    # position ids) are part of the reference's computation, not of its weights
    for name, p in module.state_dict(keep_vars=True).items():
        if not p.is_floating_point():
            continue
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if name.endswith("weight") and p.ndim == 1:  # norms
            p.copy_(1.0 + 0.1 * noise)
        else:
            p.copy_(scale * noise)
    return module


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|: the relative error the parity tests bound."""
    ours = ours.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def assert_close(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    err = rel_err(ours, ref)
    assert err < tol, f"relative error {err:.3e} >= {tol:.0e}"


def unit(x: torch.Tensor) -> torch.Tensor:
    """A raw decoder output in ~[-1, 1] -> [0, 1], what our ``output_type="pt"`` returns (the reference's
    text2img, inpaint and controlnet pipelines return the raw tensor for "pt": test_pt_output_range)."""
    return (x * 0.5 + 0.5).clamp(0, 1)
