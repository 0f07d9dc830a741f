"""Every component, loaded with load_component, against the reference beyond fp32 eager inference:
half precision (fp16, bf16) in the same dtype, ``torch.compile(fullgraph=True)``, fine-tuning
(loaded frozen in eval mode; after ``train().requires_grad_()`` the gradients equal the
reference's and an optimizer step leaves the file untouched; gradient checkpointing changes no
gradient) and channels-last memory. (Per-component parity in fp32: test_clip.py, test_prior.py,
test_unet.py, test_movq.py.)"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_close, randomize_, rel_err
from tests.refs.clip import make_text_reference, make_vision_reference
from tests.refs.movq import make_reference_movq
from tests.refs.prior import make_reference_prior, prior_inputs
from tests.refs.unet import make_reference_unet
from weights_convert import convert_state_dict, load_component, read_config


def _saved(ref, folder: Path, **kwargs) -> Path:
    ref.save_pretrained(folder, **kwargs)
    return folder


def _expected(ref, folder: Path) -> dict:
    """The reference's tensors under our names."""
    return convert_state_dict(read_config(folder), dict(ref.state_dict()))


def _same_tensors(model, expected: dict) -> None:
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def _unet_ref(variant="controlnet", scale=0.2, **overrides):
    ref = make_reference_unet(variant, seed=3, layers_per_block=1, **overrides)
    return randomize_(ref, seed=3, scale=scale).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (reference, folder) for one tiny model of each component."""
    root = tmp_path_factory.mktemp("review")
    refs = {
        "text": make_text_reference(seed=4),
        "vision": make_vision_reference(seed=5),
        "prior": make_reference_prior(seed=6),
        "unet": _unet_ref(),
        "movq": make_reference_movq(seed=7),
    }
    return {name: (ref, _saved(ref, root / name)) for name, ref in refs.items()}


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(300, 40000, (2, 77), generator=g)
    ids[0, 9], ids[1, 30] = 49407, 49407  # end-of-text, then "padding" ids below it
    mask = torch.arange(77)[None] <= torch.tensor([[9], [30]])
    return {
        "ids": ids,
        "mask": mask,
        "pixels": torch.randn(2, 3, 32, 32, generator=g),
        "images": torch.rand(2, 3, 32, 48, generator=g) * 2 - 1,
        "latents": torch.randn(2, 4, 4, 6, generator=g),
        "sample": torch.randn(2, 4, 8, 16, generator=g),
        "image_embeds": torch.randn(2, 32, generator=g),
        "hint": torch.rand(2, 3, 64, 128, generator=g),
        "t": torch.tensor([17, 640]),
        "prior": prior_inputs(2, seed=seed),
    }


def _run(name, model, x, ours: bool, dtype=torch.float32):
    """One forward of a component (ours or the reference) -> one output tensor."""
    c = lambda v: v.to(dtype)  # noqa: E731
    if name == "text":
        out = model(x["ids"], attention_mask=x["mask"])
        return torch.cat([out.text_embeds.flatten(), out.last_hidden_state.flatten()])
    if name == "vision":
        return model(c(x["pixels"])) if ours else model(c(x["pixels"])).image_embeds
    if name == "prior":
        hidden, proj, text, mask = x["prior"]
        args = (c(hidden), x["t"], c(proj), c(text))
        return model(*args, mask) if ours else model(*args, attention_mask=mask).predicted_image_embedding
    if name == "unet":
        if ours:
            return model(c(x["sample"]), x["t"], c(x["image_embeds"]), hint=c(x["hint"]))
        cond = {"image_embeds": c(x["image_embeds"]), "hint": c(x["hint"])}
        return model(c(x["sample"]), x["t"], None, added_cond_kwargs=cond).sample
    if name == "movq":  # encode, decode the continuous latents (the pipelines' path)
        if ours:
            return model.decode(model.encode(c(x["images"])), force_not_quantize=True)
        return model.decode(model.encode(c(x["images"])).latents, force_not_quantize=True).sample
    raise KeyError(name)


# ============================================================================ half precision
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 1e-2), (torch.bfloat16, 6e-2)])
@pytest.mark.parametrize("name", ["text", "vision", "unet", "movq"])
def test_half_precision_matches_reference_in_same_dtype(tiny, name, dtype, tol, tmp_path):
    """load_component(dtype=...) then a forward in that dtype, against the reference cast to
    the same dtype (the prior has its own test in test_prior.py)."""
    ref, folder = tiny[name]
    if name == "unet":  # smaller weights: the 0.2-scale tiny UNet overflows fp16 (in both libraries)
        ref = _unet_ref(scale=0.05)
        folder = _saved(ref, tmp_path / "unet")
    x = _inputs()
    ours = load_component(folder, dtype=dtype)
    assert {p.dtype for p in ours.parameters()} == {dtype} and ours.dtype == dtype
    with torch.no_grad():
        got = _run(name, ours, x, ours=True, dtype=dtype)
        want = _run(name, copy.deepcopy(ref).to(dtype), x, ours=False, dtype=dtype)
        full = _run(name, ref, x, ours=False)
    assert got.dtype == dtype and torch.isfinite(got).all()
    err = rel_err(got, want)
    assert err < tol, f"{name} {dtype}: {err:.2e}"
    # and no further from float32 than the reference is (plus rounding noise)
    assert rel_err(got, full) < 2 * rel_err(want, full) + tol / 4


# ============================================================================ torch.compile
@pytest.mark.parametrize("name", ["text", "vision", "unet", "movq"])
def test_compiles_fullgraph_and_matches_reference(tiny, name):
    """One graph, no breaks (fullgraph=True), same numbers as the reference. MoVQ: encode, and
    decode both through the codebook and not (the pipelines' path). The prior: test_prior.py."""
    ref, folder = tiny[name]
    ours = load_component(folder)
    x = _inputs(seed=1)
    torch._dynamo.reset()
    with torch.no_grad():
        if name == "movq":
            latents = torch.compile(ours.encode, fullgraph=True, backend="eager")(x["images"])
            assert_close(latents, ref.encode(x["images"]).latents)
            for quantize in (False, True):
                fn = torch.compile(lambda z: ours.decode(z, force_not_quantize=not quantize), fullgraph=True,
                                   backend="eager")
                want = ref.decode(x["latents"], force_not_quantize=not quantize).sample
                assert_close(fn(x["latents"]), want)
        else:
            compiled = torch.compile(ours, fullgraph=True, backend="eager")
            assert_close(_run(name, compiled, x, ours=True), _run(name, ref, x, ours=False))
            if name == "text":  # and without a mask (the prior pipeline's call)
                assert_close(compiled(x["ids"]).text_embeds, ref(x["ids"]).text_embeds)


# ============================================================================ fine-tuning
# (name, parameters whose gradients are compared: a deep one and an early one)
GRAD_CHECKS = {
    "text": ("blocks.1.attn.q_proj.weight", "token_embedding.weight"),
    "vision": ("blocks.0.mlp.fc1.weight", "class_embedding"),
    "prior": ("blocks.0.attn.k.weight", "prd_token"),
    "unet": ("down.1.attn.0.add_k_proj.weight", "hint_encoder.convs.0.weight"),
    "movq": ("encoder.down.0.res.0.conv1.weight", "decoder.up.1.res.0.norm1.conv_y.weight"),
}


@pytest.mark.parametrize("name", sorted(GRAD_CHECKS))
def test_gradients_match_reference_and_step_leaves_file_untouched(tiny, name):
    ref, folder = tiny[name]
    ours = load_component(folder)
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    ours.train().requires_grad_(True)
    ref = copy.deepcopy(ref).train().requires_grad_(True)
    x = _inputs(seed=2)
    _run(name, ours, x, ours=True).square().mean().backward()
    _run(name, ref, x, ours=False).square().mean().backward()

    ref_grads = convert_state_dict(read_config(folder), {k: p.grad for k, p in ref.named_parameters()})
    ours_grads = {k: p.grad for k, p in ours.named_parameters()}
    # the same parameters get gradients (MoVQ's codebook and the prior's clip_mean / clip_std: none)
    assert {k for k, g in ours_grads.items() if g is None} == {k for k, g in ref_grads.items() if g is None}
    assert any(g is not None and g.abs().max() > 0 for g in ours_grads.values())
    for k in GRAD_CHECKS[name]:
        assert ref_grads[k].abs().max() > 0, k
        err = rel_err(ours_grads[k], ref_grads[k])
        assert err < 1e-4, f"{name} {k}: gradient relative error {err:.2e}"

    # an optimizer step changes the weights in memory, not the checkpoint file
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    torch.optim.AdamW(ours.parameters(), lr=1e-2).step()
    changed = [k for k, v in ours.state_dict().items() if not torch.equal(v, before[k])]
    assert GRAD_CHECKS[name][0] in changed
    _same_tensors(load_component(folder), _expected(tiny[name][0], folder))
    _run(name, ours, x, ours=True).sum().backward()  # and training goes on




# ============================================================================ memory format
@pytest.mark.parametrize("name", ["unet", "movq"])
def test_channels_last_matches_reference(tiny, name):
    """``model.to(memory_format=torch.channels_last)`` (the documented fix for slow NCHW half
    convolutions on CPU) computes the same numbers, with channels-last inputs or not."""
    ref, folder = tiny[name]
    ours = load_component(folder).to(memory_format=torch.channels_last)
    assert ours.conv_out.weight.is_contiguous(memory_format=torch.channels_last) if name == "unet" else \
        ours.decoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    x = _inputs(seed=3)
    cl = {k: v.to(memory_format=torch.channels_last) if isinstance(v, torch.Tensor) and v.ndim == 4 else v
          for k, v in x.items()}
    with torch.no_grad():
        want = _run(name, ref, x, ours=False)
        assert_close(_run(name, ours, cl, ours=True), want)
        assert_close(_run(name, ours, x, ours=True), want)


def test_gradient_checkpointing_the_pure_blocks_keeps_gradients(tiny):
    """docs/architecture.md (fine-tuning): checkpointing ResBlocks / attention blocks changes
    no gradient (compared with the reference's)."""
    from torch.utils.checkpoint import checkpoint

    from kandinsky.layers import ResBlock
    from kandinsky.unet.blocks import AddedKVAttention

    ref, folder = tiny["unet"]
    ours = load_component(folder).train().requires_grad_(True)
    for module in ours.modules():
        if isinstance(module, (ResBlock, AddedKVAttention)):
            module.forward = (lambda f: lambda *a: checkpoint(f, *a, use_reentrant=False))(module.forward)
    ref = copy.deepcopy(ref).train().requires_grad_(True)
    x = _inputs(seed=4)
    _run("unet", ours, x, ours=True).square().mean().backward()
    _run("unet", ref, x, ours=False).square().mean().backward()
    ref_grads = convert_state_dict(read_config(folder), {k: p.grad for k, p in ref.named_parameters()})
    for k in ("down.1.res.0.conv1.weight", "up.0.attn.0.to_q.weight", "time_embed.linear_1.weight"):
        assert rel_err(ours.get_parameter(k).grad, ref_grads[k]) < 1e-4, k
