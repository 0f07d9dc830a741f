"""Shared test utilities: random non-zero init, relative-error checks, the pipeline tests' seeded inputs
and reference pipelines, and running the python blocks of a docs page."""
from __future__ import annotations

import pathlib
import re

import numpy as np
import PIL.Image
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


# bfloat16 pipelines vs the fp32 reference: measured 0.03-0.04 on the raw decoder output, 0.09-0.10 on "pt"
# in [0, 1] (half the range, the same absolute error) on the tiny checkpoints; a real bug gives O(1).
BF16_TOL = 0.25  # bf16 keeps 8 mantissa bits; two guided steps of random weights amplify them: 0.09-0.19
#                  measured, by CPU (0.186 on a Xeon with AMX / AVX512-BF16 kernels, 2026-12-02)


def unit(x: torch.Tensor) -> torch.Tensor:
    """A raw decoder output in ~[-1, 1] -> [0, 1], what our ``output_type="pt"`` returns (the reference's
    text2img, inpaint and controlnet pipelines return the raw tensor for "pt": test_pt_output_range)."""
    return (x * 0.5 + 0.5).clamp(0, 1)


# --------------------------------------------------------------------------- pipeline inputs
# The inputs of the pipeline tests: seeded, so every test names the picture it uses by a number.
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_generator(kind: str, batch: int, device: str = "cpu", seed: int = 0):
    """None ("none"), one generator ("one"), or one per batch row ("list"): the forms a seed can take."""
    if kind == "none":
        return None
    if kind == "list":
        return [torch.Generator(device).manual_seed(seed + i) for i in range(batch)]
    return torch.Generator(device).manual_seed(seed)


def generator_tail(generator, device: str = "cpu") -> torch.Tensor:
    """One more draw from the generator(s) after a run: equal iff the generators' states are."""
    if generator is None:
        return torch.rand(4, device=device)
    gens = generator if isinstance(generator, list) else [generator]
    return torch.cat([torch.rand(4, generator=g, device=g.device) for g in gens])


def embeds(batch: int = 1, seed: int = 0, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(image_embeds, negative_image_embeds), each (batch, dim); dim: the tiny decoders' EMBED_DIM."""
    if dim is None:
        from tests.refs.decoder_pipeline import EMBED_DIM as dim  # refs import this module: not at the top
    g = gen(1000 + seed)
    return torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g)


def rgb(seed: int, height: int = 64, width: int = 64) -> PIL.Image.Image:
    """A random RGB picture (height, width)."""
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def repaint_mask(seed: int, height: int = 64, width: int = 64) -> np.ndarray:
    """float32 {0, 1} (H, W), 1 = repaint: a block and a few scattered pixels (so the growth by one
    latent pixel matters). At least 30 x 44."""
    rng = np.random.default_rng(seed)
    m = (rng.random((height, width)) < 0.03).astype(np.float32)
    m[8:30, 20:44] = 1
    return m


# --------------------------------------------------------------------------- reference pipelines
def quiet(pipe):
    """A diffusers pipeline without its progress bar."""
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_variant(ref, cls_name: str | None = None, scheduler=None):
    """Another diffusers pipeline class (e.g. "KandinskyV22Img2ImgPipeline") and/or scheduler on the
    components of ``ref``."""
    import diffusers

    components = dict(ref.components)
    if scheduler is not None:
        components["scheduler"] = scheduler
    cls = type(ref) if cls_name is None else getattr(diffusers, cls_name)
    return quiet(cls(**components))


def with_ddim(ref):
    """``ref`` with diffusers' DDIMScheduler on the same config."""
    from diffusers import DDIMScheduler

    return reference_variant(ref, scheduler=DDIMScheduler.from_config(ref.scheduler.config))


def combined_reference(cls_name: str, prior_ref, decoder_ref):
    """A diffusers combined pipeline (e.g. "KandinskyV22CombinedPipeline") built from the components of
    a reference prior pipeline and a reference decoder pipeline."""
    import diffusers

    return quiet(getattr(diffusers, cls_name)(
        unet=decoder_ref.unet,
        scheduler=decoder_ref.scheduler,
        movq=decoder_ref.movq,
        prior_prior=prior_ref.prior,
        prior_image_encoder=prior_ref.image_encoder,
        prior_text_encoder=prior_ref.text_encoder,
        prior_tokenizer=prior_ref.tokenizer,
        prior_scheduler=prior_ref.scheduler,
        prior_image_processor=prior_ref.image_processor,
    ))


# --------------------------------------------------------------------------- docs
def python_blocks(text: str) -> list[str]:
    """The ```python blocks of a markdown page, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def run_python_blocks(path: pathlib.Path, rewrite=lambda code: code) -> dict:
    """Run every python block of the page at ``path`` in order in one namespace (like a notebook),
    each first passed through ``rewrite``; a failing block fails the test naming the block. -> the namespace."""
    import pytest

    namespace: dict = {"__name__": path.stem}
    for i, block in enumerate(python_blocks(path.read_text())):
        try:
            exec(compile(rewrite(block), f"docs/{path.name} python block {i}", "exec"), namespace)
        except Exception as e:
            pytest.fail(f"docs/{path.name} python block {i} failed: {e!r}\n---\n{block}")
    return namespace
