"""kandinsky.capture / intervene (kandinsky/research/capture.py) and what names mean
(kandinsky/research/targets.py) on tiny models: records equal what plain forward hooks see,
branch splits equal separate runs, attention probabilities equal the explicit softmax of the
layer's own projections, edits match the reference UNet's."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

import kandinsky
import kandinsky.attention as attn
import kandinsky.research as cap
from kandinsky.calls import BRANCHES_GUIDED, model_call, now
from kandinsky.demo import TINY
from kandinsky.research import targets
from tests.helpers import rel_err
from weights_convert import build_model


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def unet(perturbed_unet):
    return perturbed_unet  # (conftest: the tiny UNet, weights moved off their init)


def unet_inputs(batch: int = 2, seed: int = 0):
    g = gen(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.tensor(500), torch.randn(batch, 32, generator=g)


def plain_hook_outputs(model, names, *inputs):
    seen = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o))
               for n in names]
    with torch.no_grad():
        model(*inputs)
    for h in handles:
        h.remove()
    return seen


def no_hooks_left(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()) and now().layer is None


# ----------------------------------------------------------------------------- capture
def test_capture_equals_plain_forward_hook(unet):
    names = ["mid", "down.1.attn.0", "up.2.res.1", "image_tokens"]
    x = unet_inputs()
    expected = plain_hook_outputs(unet, names, *x)
    with kandinsky.capture(unet, names) as rec, torch.no_grad():
        unet(*x)
    for n in names:
        assert torch.equal(rec[n], expected[n]), n
    assert sorted(rec.names) == sorted(names)
    assert no_hooks_left(unet)


def test_branch_split_equals_running_branches_separately(unet):
    sample, t, embeds = unet_inputs(batch=4)
    with kandinsky.capture(unet, ["mid", "up.1"]) as rec, torch.no_grad():
        with model_call("decoder", 3, 500, BRANCHES_GUIDED):
            unet(sample, t, embeds)  # rows 0-1 unconditional, 2-3 conditional
    for branch, rows in (("uncond", slice(0, 2)), ("cond", slice(2, 4))):
        alone = plain_hook_outputs(unet, ["mid", "up.1"], sample[rows], t, embeds[rows])
        for n in ("mid", "up.1"):
            torch.testing.assert_close(rec[n, 3, branch], alone[n], rtol=1e-4, atol=1e-5)
    assert set(rec.keys()) == {(n, 3, b) for n in ("mid", "up.1") for b in ("uncond", "cond")}


def test_filters_hold_memory_to_what_was_asked(unet):
    sample, t, embeds = unet_inputs(batch=4)
    kw = dict(steps=[1], branch="cond", reduce="mean", dtype=torch.float16)
    with kandinsky.capture(unet, "mid", **kw) as rec, torch.no_grad():
        for step in range(3):
            with model_call("decoder", step, 500, BRANCHES_GUIDED):
                unet(sample, t, embeds)
    assert rec.keys() == [("mid", 1, "cond")]
    full = plain_hook_outputs(unet, ["mid"], sample, t, embeds)["mid"]  # (4, 64, 1, 1)
    got = rec["mid"]
    assert got.dtype == torch.float16 and got.shape == (1,) + full.shape[1:]
    torch.testing.assert_close(got.float(), full[2:].mean(0, keepdim=True), rtol=1e-3, atol=1e-3)
    assert rec.nbytes == got.numel() * 2

    # no reduce: one branch is a copy of its half, not a view pinning the whole batch
    with kandinsky.capture(unet, "up.2", branch="cond", to="cpu") as rec, torch.no_grad():
        with model_call("decoder", 0, 500, BRANCHES_GUIDED):
            unet(sample, t, embeds)
    half = rec["up.2"]
    assert half.shape[0] == 2 and rec.nbytes == half.numel() * half.element_size()


def test_steps_as_range_and_slice_and_stack(unet):
    sample, t, embeds = unet_inputs(batch=1)
    filters = {(1, 2): range(1, 3), (0, 2, 4): slice(0, None, 2), (3,): 3}
    with contextlib.ExitStack() as stack, torch.no_grad():
        recs = {want: stack.enter_context(kandinsky.capture(unet, "mid", steps=steps))
                for want, steps in filters.items()}
        for step in range(5):
            with model_call("decoder", step, 999 - step):
                unet(sample, t, embeds)
    for want, rec in recs.items():
        assert rec.steps("mid") == list(want)
    assert recs[(1, 2)].stack("mid", branch="cond").shape == (2, 1, 64, 1, 1)


# ----------------------------------------------------------------------------- attention
def test_unet_attention_probabilities_from_own_projections(unet):
    sample, t, embeds = unet_inputs()
    layer = unet.get_submodule("down.1.attn.0")
    inputs = {}
    h = layer.register_forward_pre_hook(lambda m, a: inputs.setdefault("x", a))
    with torch.no_grad():
        baseline = unet(sample, t, embeds)
        with kandinsky.capture(unet, "down.1.attn.0", attention=True) as rec:
            out = unet(sample, t, embeds)
    h.remove()
    assert torch.equal(out, baseline)  # recording does not change the computation
    x, tokens = inputs["x"]
    B, C, H, W = x.shape
    heads, d = layer.heads, C // layer.heads
    hs = layer.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
    split = lambda y: y.view(B, -1, heads, d).transpose(1, 2)  # noqa: E731
    q = split(layer.to_q(hs))
    k = torch.cat([split(layer.add_k_proj(tokens)), split(layer.to_k(hs))], dim=2)
    expected = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    probs = rec["down.1.attn.0"]
    assert probs.shape == (B, heads, H * W, 32 + H * W)
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, heads, H * W))
    assert rec.meta["down.1.attn.0"]["image_tokens"] == 32
    assert no_hooks_left(unet)


def test_filtered_attention_is_not_computed(unet, monkeypatch):
    """Probabilities are computed only for the kept steps and branches (rows of the batch)."""
    rows = []
    real = attn.attention_probs
    monkeypatch.setattr(attn, "attention_probs", lambda q, *a: rows.append(q.shape[0]) or real(q, *a))
    sample, t, embeds = unet_inputs(batch=4)
    with kandinsky.capture(unet, "mid.attn", attention=True, steps=[1], branch="cond") as rec, torch.no_grad():
        for step in range(3):
            with model_call("decoder", step, 500, BRANCHES_GUIDED):
                unet(sample, t, embeds)
    assert rows == [2]  # one call, the conditional half
    assert rec.keys() == [("mid.attn", 1, "cond")]


def test_prior_attention_with_mask_and_prd_row():
    torch.manual_seed(0)
    prior = build_model(TINY["prior"]).eval()
    g = gen(3)
    x, text = torch.randn(2, 32, generator=g), torch.randn(2, 32, generator=g)
    hidden = torch.randn(2, 77, 32, generator=g)
    mask = torch.zeros(2, 77, dtype=torch.bool)
    mask[:, :5] = True
    block = prior.blocks[1]
    seen = {}
    h = block.attn.register_forward_pre_hook(lambda m, a: seen.setdefault("in", a))
    with kandinsky.capture(prior, "blocks.1.attn", attention=True, reduce="mean_heads") as rec, torch.no_grad():
        prior(x, 10, text, hidden, mask)
    h.remove()
    xin, bias = seen["in"][:2]
    q = block.attn.q(xin).view(2, 81, 2, 16).transpose(1, 2)
    k = block.attn.k(xin).view(2, 81, 2, 16).transpose(1, 2)
    expected = torch.softmax(q @ k.transpose(-1, -2) / 4 + bias, dim=-1).mean(1)  # (B, 81, 81)
    probs = rec["blocks.1.attn"]
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)
    prd = probs[:, rec.meta["blocks.1.attn"]["prd_token"]]  # (B, 81): what the output token reads
    assert prd[:, 5:77].max() < 1e-3  # padded words get (almost) nothing
    torch.testing.assert_close(prd.sum(-1), torch.ones(2))


def test_clip_text_attention_is_causal_and_movq_single_head():
    torch.manual_seed(0)
    text = build_model(TINY["text_encoder"]).eval()
    ids = torch.randint(0, 500, (2, 77))
    with kandinsky.capture(text, "blocks.*.attn", attention=True) as rec, torch.no_grad():
        text(ids)
    probs = rec["blocks.1.attn"]  # (2, 4, 77, 77)
    assert probs.shape == (2, 4, 77, 77) and rec.names == ["blocks.0.attn", "blocks.1.attn"]
    assert probs.triu(1).abs().max() == 0  # no token attends to a later one
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 77))
    assert probs[..., 0, 0].eq(1).all()  # the first token can only attend to itself

    movq = build_model(TINY["movq"]).eval()
    with kandinsky.capture(movq, "decoder.*", attention=True, reduce="mean_heads") as rec, torch.no_grad():
        movq.decode(torch.randn(1, 4, 4, 6), force_not_quantize=True)
    (name,) = [n for n in rec.names if n.startswith("decoder.mid")]
    assert rec[name].shape == (1, 24, 24)  # single head averaged away; 4 x 6 latent pixels


def test_attention_true_matches_attention_layers_only(unet):
    with pytest.raises(ValueError, match="matches no attention layer"):
        with kandinsky.capture(unet, "down.0.*", attention=True):
            pass
    with kandinsky.capture(unet, "*", attention=True) as rec, torch.no_grad():
        unet(*unet_inputs(1))
    assert rec.names and all(n.endswith(("attn", "attn.0", "attn.1")) for n in rec.names)


def test_layouts_are_what_the_layers_declare():
    """Each attention layer says what its keys are (token_layout); the prior's text length is its
    config's num_embeddings, and the keys it records are that many text tokens and 4 more."""
    prior = build_model({**TINY["prior"], "num_embeddings": 9}).eval()
    g = gen(4)
    x, text = torch.randn(1, 32, generator=g), torch.randn(1, 32, generator=g)
    hidden = torch.randn(1, 9, 32, generator=g)  # (B, num_embeddings, D)
    with kandinsky.capture(prior, "blocks.0.attn", attention=True) as rec, torch.no_grad():
        prior(x, 10, text, hidden, torch.ones(1, 9, dtype=torch.bool))
    assert rec.meta["blocks.0.attn"] == {"kind": "prior", "text_tokens": 9, "prd_token": -1}
    assert rec["blocks.0.attn"].shape == (1, 2, 9 + 4, 9 + 4)  # text, text embedding, time, x, prd
    kinds = {}
    for component in ("unet", "movq", "text_encoder", "image_encoder"):
        for name, module in build_model(TINY[component]).named_modules():
            if targets.is_attention(module):
                kinds.setdefault(component, []).append(targets.attention_layout(module))
    assert kinds["unet"] and all(lay == {"kind": "added_kv", "image_tokens": 32} for lay in kinds["unet"])
    for component in ("movq", "text_encoder", "image_encoder"):
        assert kinds[component] and all(lay == {"kind": "self"} for lay in kinds[component]), component
    assert targets.attention_layout(torch.nn.Linear(2, 2)) is None


def test_map_tensors_walks_tuples_lists_and_dataclasses():
    import dataclasses

    @dataclasses.dataclass
    class Out:
        a: torch.Tensor
        b: tuple
        name: str

    x = Out(torch.ones(2), (torch.zeros(3), [torch.full((1,), 2.0)]), "n")
    y = targets.map_tensors(lambda t: t + 1, x)
    assert torch.equal(y.a, torch.full((2,), 2.0)) and torch.equal(y.b[0], torch.ones(3))
    assert torch.equal(y.b[1][0], torch.full((1,), 3.0)) and y.name == "n"
    assert [t.numel() for t in targets.tensors(x)] == [2, 3, 1]


# ----------------------------------------------------------------------------- intervene
def test_identity_interventions_are_bit_identical(unet):
    sample, t, embeds = unet_inputs(batch=4)
    with torch.no_grad(), model_call("decoder", 0, 500, BRANCHES_GUIDED):
        base = unet(sample, t, embeds)
        edits = [lambda x, ctx: x, cap.ablate_heads([]), cap.scale_image_tokens(1.0)]
        for fn in edits:
            with kandinsky.intervene(unet, ["mid", "*attn*"] if not isinstance(fn, cap.AttentionEdit) else "*",
                                     fn):
                assert torch.equal(unet(sample, t, embeds), base)
        with kandinsky.intervene(unet, "mid", lambda x, ctx: x.clone(), branch="cond"):
            assert torch.equal(unet(sample, t, embeds), base)  # split and re-joined
    assert no_hooks_left(unet)


def test_intervene_context_steps_and_branch(unet):
    sample, t, embeds = unet_inputs(batch=2)
    seen = []

    def fn(x, ctx):
        seen.append((ctx.name, ctx.step, ctx.branch, ctx.timestep, x.shape[0]))
        return x + 1

    with torch.no_grad():
        base = {}
        for step in range(3):
            with model_call("decoder", step, 900 - step, BRANCHES_GUIDED):
                base[step] = unet(sample, t, embeds)
        with kandinsky.intervene(unet, "mid", fn, steps=[1], branch="cond"):
            for step in range(3):
                with model_call("decoder", step, 900 - step, BRANCHES_GUIDED):
                    out = unet(sample, t, embeds)
                assert torch.equal(out, base[step]) == (step != 1)
                if step == 1:
                    assert torch.equal(out[0], base[1][0]) and not torch.equal(out[1], base[1][1])
    assert seen == [("mid", 1, "cond", 899.0, 1)]


def test_ready_made_attention_edits(unet):
    sample, t, embeds = unet_inputs(batch=2)
    layer = unet.mid.attn
    seen = {}
    h1 = layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a))
    h2 = layer.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o))
    try:
        with torch.no_grad():
            with kandinsky.intervene(unet, "mid.attn", cap.ablate_heads(range(layer.heads))):
                unet(sample, t, embeds)
            x = seen["in"][0]
            torch.testing.assert_close(seen["out"], x + layer.to_out.bias[None, :, None, None])

            with kandinsky.intervene(unet, "mid.attn", cap.drop_image_tokens()):
                unet(sample, t, embeds)
            x, tokens = seen["in"]
            hs = layer.group_norm(x).flatten(2).transpose(1, 2)
            B, C = hs.shape[0], hs.shape[2]
            split = lambda y: y.view(B, -1, layer.heads, C // layer.heads).transpose(1, 2)  # noqa: E731
            o = attn.sdpa(split(layer.to_q(hs)), split(layer.to_k(hs)), split(layer.to_v(hs)))
            expected = x + layer.to_out(o.transpose(1, 2).reshape(B, -1, C)).transpose(1, 2).reshape(x.shape)
            torch.testing.assert_close(seen["out"], expected, rtol=1e-5, atol=1e-5)
    finally:
        h1.remove(), h2.remove()
    with pytest.raises(ValueError, match="added_kv"):
        prior = build_model(TINY["prior"])
        with kandinsky.intervene(prior, "blocks.0.attn", cap.drop_image_tokens()):
            pass


def test_add_direction_and_activation_patching(unet):
    sample, t, embeds = unet_inputs(batch=1)
    d = torch.randn(64, 1, 1, generator=gen(5))
    with torch.no_grad():
        base = plain_hook_outputs(unet, ["mid"], sample, t, embeds)["mid"]
        with kandinsky.intervene(unet, "mid", cap.add_direction(d, 2.0)), kandinsky.capture(unet, "mid") as rec:
            unet(sample, t, embeds)
        torch.testing.assert_close(rec["mid"], base + 2 * d)

        _, _, other = unet_inputs(batch=1, seed=1)
        with kandinsky.capture(unet, "mid") as donor:
            donor_out = unet(sample, t, other)
        with kandinsky.intervene(unet, "mid", cap.patch_from(donor)), kandinsky.capture(unet, "mid") as rec:
            patched = unet(sample, t, embeds)
        assert torch.equal(rec["mid"], donor["mid"])
        assert not torch.equal(patched, donor_out)  # the skips still carry the original embedding


def test_intervention_on_mid_block_matches_reference_unet(decoder):
    """The same edit of the mid-block output, through intervene on ours and a forward hook on
    diffusers' mid_block, changes the final latents (the image before MoVQ) the same way
    (same weights, same seeds)."""
    ours, ref = decoder
    g = gen(100)
    e, n = torch.randn(1, 32, generator=g), torch.randn(1, 32, generator=g)
    kw = dict(height=64, width=64, num_inference_steps=2, guidance_scale=4.0)

    def edit(x, ctx=None):
        return 0.5 * x + 0.3

    h = ref.unet.mid_block.register_forward_hook(lambda m, a, out: edit(out))
    try:
        expected = ref(image_embeds=e, negative_image_embeds=n, generator=gen(1), output_type="latent", **kw).images
    finally:
        h.remove()
    with kandinsky.intervene(ours, "unet.mid", edit):
        got = ours.text2img(e, n, generator=gen(1), output_type="latent", progress=False, **kw).images
    plain = ours.text2img(e, n, generator=gen(1), output_type="latent", progress=False, **kw).images
    assert rel_err(got, expected) < 1e-4
    assert rel_err(plain, expected) > 1e-2  # the edit did change the picture

    # the conditional branch alone: diffusers batches [negative; positive], so its second half
    def edit_second_half(m, a, out):
        half = out.shape[0] // 2
        return torch.cat([out[:half], edit(out[half:])])

    h = ref.unet.mid_block.register_forward_hook(edit_second_half)
    try:
        expected = ref(image_embeds=e, negative_image_embeds=n, generator=gen(1), output_type="latent", **kw).images
    finally:
        h.remove()
    with kandinsky.intervene(ours, "unet.mid", edit, branch="cond"):
        got = ours.text2img(e, n, generator=gen(1), output_type="latent", progress=False, **kw).images
    assert rel_err(got, expected) < 1e-4
    assert no_hooks_left(ours.unet)


# ----------------------------------------------------------------------------- errors, cost
def test_clear_errors(unet):
    with pytest.raises(ValueError, match="'midd' matches no module"):
        with kandinsky.capture(unet, "midd"):
            pass
    with pytest.raises(TypeError, match="steps must be"):
        with kandinsky.capture(unet, "mid", steps="all"):
            pass
    with pytest.raises(ValueError, match="reduce must be one of"):
        with kandinsky.capture(unet, "mid", reduce="max"):
            pass
    with pytest.raises(ValueError, match="branch must be"):
        with kandinsky.intervene(unet, "mid", lambda x, c: x, branch="positive"):
            pass
    with pytest.raises(TypeError, match="target must be"):
        kandinsky.module_names("unet")
    with kandinsky.capture(unet, "mid") as rec, torch.no_grad():
        unet(*unet_inputs(1))
        unet(*unet_inputs(1))
    with pytest.raises(KeyError, match="recorded 2 times"):
        rec["mid"]
    assert len(rec.calls("mid")) == 2
    assert no_hooks_left(unet)


def test_compile_fullgraph_without_capture(unet):
    x = unet_inputs(1)
    with pytest.warns(UserWarning, match="no matched module ran"):
        with kandinsky.capture(unet, "*", attention=True):
            pass  # installed and removed; nothing ran
    compiled = torch.compile(unet, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(*x), unet(*x))
        # a compiled graph does not run hooks added later: said, never silently empty
        with pytest.raises(TypeError, match="torch.compile'd model"):
            with kandinsky.capture(compiled, "mid"):
                pass
        with pytest.warns(UserWarning, match="torch.compile"), kandinsky.capture(unet, "mid") as rec:
            compiled(*x)
    assert len(rec) == 0


# ----------------------------------------------------------------------------- overhead (by hand)
def measure_overhead(reps: int = 15, calls: int = 10) -> None:
    """CPU time per guided step of the tiny demo UNet (batch 2, 8 x 8 latents, 1 thread) with
    nothing captured and with one layer captured, interleaved so load changes hit every case.
    Run by hand: ``python -m tests.test_capture`` (not a test: timings don't belong in tests)."""
    import statistics
    import time

    torch.set_num_threads(1)
    model = build_model(TINY["unet"]).eval()
    sample, embeds = torch.randn(2, 4, 8, 8), torch.randn(2, 32)

    def step():
        with torch.no_grad(), model_call("decoder", 0, 500, BRANCHES_GUIDED):
            model(sample, 500, embeds)

    cases = {"plain": None, "capture mid": ("mid", False), "capture mid.attn probabilities": ("mid.attn", True),
             "capture up.2.attn.1 probabilities": ("up.2.attn.1", True)}
    times = {name: [] for name in cases}
    for _ in range(5):
        step()
    for _ in range(reps):
        for name, spec in cases.items():
            with kandinsky.capture(model, spec[0], attention=spec[1]) if spec else contextlib.nullcontext():
                for _ in range(calls):
                    start = time.process_time()
                    step()
                    times[name].append(time.process_time() - start)
    base = statistics.median(times["plain"])
    for name, ts in times.items():
        median = statistics.median(ts)
        print(f"{name:36s} {median * 1e3:7.2f} ms/step  {100 * (median / base - 1):+5.1f}%")


if __name__ == "__main__":
    measure_overhead()
