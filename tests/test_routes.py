"""kandinsky.patch_routes (kandinsky/research/routes.py): the image embedding's two routes into the
decoder UNet ("time": added to the timestep embedding every ResBlock reads; "tokens": the image
tokens every attention layer reads), patched by level, step and branch. Patching every route
everywhere equals the run with the source embedding and patching nothing the plain run (bit for
bit, every task and sampler); each route alone, a level and a step window equal diffusers' pipeline
with forward hooks on its UNet's add_embedding / encoder_hid_proj / blocks."""
from __future__ import annotations

import contextlib

import numpy as np
import PIL.Image
import pytest
import torch

import kandinsky
from kandinsky.calls import BRANCHES_GUIDED, model_call
from kandinsky.layers import timesteps
from kandinsky.research import routes as R
from tests.helpers import embeds, gen, rel_err, repaint_mask, rgb

TOL = 1e-4
KW = dict(height=64, width=64, num_inference_steps=3, guidance_scale=4.0, output_type="latent", progress=False)


@pytest.fixture(scope="module")
def unet(perturbed_unet):
    return perturbed_unet  # (conftest: the tiny UNet, weights moved off their init)


def unet_inputs(batch: int = 4, seed: int = 0):
    g = gen(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor(500), torch.randn(batch, 32, generator=g),
            torch.randn(batch // 2, 32, generator=g))


def no_hooks_left(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ----------------------------------------------------------------------------- the UNet alone
def test_all_routes_everywhere_equal_the_source_embedding_and_nothing_the_plain_call(unet):
    x, t, e, s = unet_inputs()
    guided = lambda: model_call("decoder", 0, 500, BRANCHES_GUIDED)  # noqa: E731  rows 0-1 uncond, 2-3 cond
    with torch.no_grad():
        plain = unet(x, t, e)
        cond_source = unet(x, t, torch.cat([e[:2], s]))
        both_source = unet(x, t, torch.cat([s, s]))
        uncond_source = unet(x, t, torch.cat([s, e[2:]]))
        cases = [
            (dict(), cond_source),
            (dict(levels=["down", "mid", "up"]), cond_source),
            (dict(routes=["tokens", "time"], steps=[0]), cond_source),
            (dict(branch="both"), both_source),
            (dict(branch="uncond"), uncond_source),
            (dict(routes=[]), plain),
            (dict(steps=[1, 2]), plain),
            (dict(steps=slice(1, None)), plain),
        ]
        for options, expected in cases:
            with guided(), kandinsky.patch_routes(unet, s, **options):
                assert torch.equal(unet(x, t, e), expected), options
        # one row for every row; outside a sampling run every row is patched
        with guided(), kandinsky.patch_routes(unet, s[:1]):
            assert torch.equal(unet(x, t, e), unet(x, t, torch.cat([e[:2], s[:1], s[:1]])))
        with kandinsky.patch_routes(unet, s[0]):
            assert torch.equal(unet(x, t, e), unet(x, t, s[:1].expand(4, -1)))
    assert no_hooks_left(unet)


def test_each_route_and_level_is_what_its_readers_see(unet):
    """"time" at some levels: those levels' ResBlocks read time_embed(t) + image_embed(source), the
    others the original emb; "tokens": the levels' attention layers read image_tokens(source)."""
    x, t, e, s = unet_inputs()
    readers = R.readers(unet)
    assert set(readers["time"]) >= {"down.0.res.0", "down.0.downsample", "mid.res_in", "mid.res_out", "up.1.upsample"}
    assert set(readers["tokens"]) == {n for n, _ in unet.named_modules() if ".attn." in n + "." and
                                      type(unet.get_submodule(n)).__name__ == "AddedKVAttention"}
    seen = {}

    def record(name):
        return lambda m, args: seen.__setitem__(name, args[1])

    with torch.no_grad():
        emb = unet.time_embed(timesteps(t, 4, x.device), x.dtype)
        time_plain, time_src = emb + unet.image_embed(e), emb + unet.image_embed(s.repeat(2, 1))
        tok_plain, tok_src = unet.image_tokens(e), unet.image_tokens(s.repeat(2, 1))
        for route, level in (("time", "mid"), ("time", "up.1"), ("tokens", "down.1"), ("tokens", "up.0.attn.1")):
            seen.clear()
            with kandinsky.patch_routes(unet, s.repeat(2, 1), routes=[route], levels=[level]):
                # registered after patch_routes' own pre-hooks: they see what the module reads
                handles = [m.register_forward_pre_hook(record(n))
                           for n, m in {**readers["time"], **readers["tokens"]}.items()]
                unet(x, t, e)
                for h in handles:
                    h.remove()
            src, plain = (time_src, time_plain) if route == "time" else (tok_src, tok_plain)
            other = tok_plain if route == "time" else time_plain
            assert len(seen) == len(readers["time"]) + len(readers["tokens"])
            for name, value in seen.items():
                inside = R._under(name, [level]) and name in readers[route]
                expected = src if inside else plain if name in readers[route] else other
                assert torch.equal(value, expected), (route, level, name)


# ----------------------------------------------------------------------------- every task and sampler
TASKS = {
    "text2img": lambda pipe, e, n: pipe.text2img(e, n, generator=gen(1), **KW),
    "img2img": lambda pipe, e, n: pipe.img2img(e, rgb(3), n, strength=0.7, generator=gen(1), **KW),
}


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_and_sampler(decoder, task, sampler):
    ours, _ = decoder
    e, n = embeds(1, seed=30)
    s = torch.randn(1, e.shape[1], generator=gen(31))
    ours.set_scheduler(sampler)
    try:
        run = TASKS[task]
        with_source, plain = run(ours, s, n).images, run(ours, e, n).images
        with kandinsky.patch_routes(ours, s):
            assert torch.equal(run(ours, e, n).images, with_source)
        with kandinsky.patch_routes(ours, s, steps=[]):
            assert torch.equal(run(ours, e, n).images, plain)
    finally:
        ours.set_scheduler("ddpm")


def test_inpaint_controlnet_and_kandinsky(inpainter, controlnet, random_demo_kandinsky):
    e, n = embeds(1, seed=32)
    s = torch.randn(1, e.shape[1], generator=gen(33))
    ours, _ = inpainter
    paint = lambda x: ours.inpaint(x, rgb(4), repaint_mask(1), n, generator=gen(2), **KW).images  # noqa: E731
    expected = paint(s)
    with kandinsky.patch_routes(ours, s):
        assert torch.equal(paint(e), expected)
    ours, _ = controlnet
    hint = torch.rand(1, 3, 64, 64, generator=gen(5))
    draw = lambda x: ours.controlnet(x, n, hint, generator=gen(2), **KW).images  # noqa: E731
    expected = draw(s)
    with kandinsky.patch_routes(ours, s):
        assert torch.equal(draw(e), expected)
    # the combined pipeline: patching the decoder's every route = the decoder run on the source embedding
    pipe = random_demo_kandinsky
    kw = dict(num_inference_steps=2, prior_num_inference_steps=2, height=64, width=64, output_type="latent",
              progress=False)
    prior = pipe.prior("a red circle", num_inference_steps=2, generator=gen(0), progress=False)
    s = torch.randn(1, prior.image_embeds.shape[1], generator=gen(34))
    expected = pipe.decoder.text2img(s, prior.negative_image_embeds, generator=gen(7), output_type="latent",
                                     num_inference_steps=2, height=64, width=64, progress=False).images
    with kandinsky.patch_routes(pipe, s):
        got = pipe.decoder.text2img(prior.image_embeds, prior.negative_image_embeds, generator=gen(7),
                                    output_type="latent", num_inference_steps=2, height=64, width=64,
                                    progress=False).images
    assert torch.equal(got, expected)
    assert pipe.text2img("a red circle", generator=gen(0), **kw).images.shape[0] == 1
    assert no_hooks_left(pipe.decoder.unet)


# ----------------------------------------------------------------------------- against diffusers
def half(replace):
    """A forward hook replacing the conditional (second) half of a [negative; positive] output."""
    def hook(module, args, out):
        n = out.shape[0] // 2
        return torch.cat([out[:n], replace(out[n:])])

    return hook


@contextlib.contextmanager
def hooks(*pairs):
    """(module, hook, kind) triples installed for the block."""
    handles = [getattr(m, f"register_forward_{kind}hook")(h, **({"with_kwargs": True} if kind == "pre_" else {}))
               for m, h, kind in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def only_calls(calls, hook):
    """``hook`` active only on these UNet calls (0, 1, ...; one call per step with guidance)."""
    count = {"n": -1}

    def wrapped(*args):
        return hook(*args) if count["n"] in calls else None

    def counter(module, args, kwargs):
        count["n"] += 1

    return wrapped, counter


def test_routes_match_hooks_on_the_reference_unet(decoder):
    ours, ref = decoder
    e, n = embeds(1, seed=40)
    s = torch.randn(1, e.shape[1], generator=gen(41))
    unet = ref.unet

    def reference(*pairs):
        with hooks(*pairs), torch.no_grad():
            return ref(image_embeds=e, negative_image_embeds=n, generator=gen(1), output_type="latent",
                       **{k: v for k, v in KW.items() if k not in ("output_type", "progress")}).images

    def ours_run(**options):
        with kandinsky.patch_routes(ours, s, **options):
            return ours.text2img(e, n, generator=gen(1), **KW).images

    with torch.no_grad():
        aug_src, tok_src = unet.add_embedding(s), unet.encoder_hid_proj(s)
    plain = reference()
    # the "time" route alone: diffusers' add_embedding output, conditional half replaced
    time_ref = reference((unet.add_embedding, half(lambda o: aug_src), ""))
    assert rel_err(ours_run(routes=["time"]), time_ref) < TOL
    # the "tokens" route alone: encoder_hid_proj's output
    tokens_ref = reference((unet.encoder_hid_proj, half(lambda o: tok_src), ""))
    assert rel_err(ours_run(routes=["tokens"]), tokens_ref) < TOL
    assert rel_err(time_ref, plain) > 1e-2 and rel_err(tokens_ref, plain) > 1e-3  # each route moves the picture

    # a level-restricted tokens patch: a pre-hook on that block alone (its encoder_hidden_states)
    def block_tokens(module, args, kwargs):
        h = kwargs["encoder_hidden_states"]
        k = h.shape[0] // 2
        return args, {**kwargs, "encoder_hidden_states": torch.cat([h[:k], tok_src.expand_as(h[k:])])}

    level_ref = reference((unet.down_blocks[1], block_tokens, "pre_"))
    assert rel_err(ours_run(routes=["tokens"], levels=["down.1"]), level_ref) < TOL
    assert rel_err(level_ref, tokens_ref) > 1e-4

    # a level-restricted time patch: the mid block's temb is time_embedding(t) + add_embedding(source)
    temb = {}

    def keep_temb(module, args, out):
        temb["t"] = out

    def block_time(module, args, kwargs):
        k = args[1].shape[0] // 2
        new = torch.cat([args[1][:k], temb["t"][k:] + aug_src])
        return (args[0], new, *args[2:]), kwargs

    mid_ref = reference((unet.time_embedding, keep_temb, ""), (unet.mid_block, block_time, "pre_"))
    assert rel_err(ours_run(routes=["time"], levels=["mid"]), mid_ref) < TOL
    assert rel_err(mid_ref, time_ref) > 1e-4

    # a step-restricted patch: the hooks active on those UNet calls only
    wrapped, counter = only_calls({1}, half(lambda o: tok_src))
    step_ref = reference((unet, counter, "pre_"), (unet.encoder_hid_proj, wrapped, ""))
    assert rel_err(ours_run(routes=["tokens"], steps=[1]), step_ref) < TOL
    assert rel_err(step_ref, tokens_ref) > 1e-4 and rel_err(step_ref, plain) > 1e-4
    assert no_hooks_left(ours.unet)


# ----------------------------------------------------------------------------- composing, errors
def test_composes_with_capture_and_intervene(decoder):
    ours, _ = decoder
    e, n = embeds(1, seed=50)
    s = torch.randn(1, e.shape[1], generator=gen(51))
    with kandinsky.capture(ours, "unet.mid", branch="cond") as expected:
        with_source = ours.text2img(s, n, generator=gen(1), **KW).images
    with kandinsky.patch_routes(ours, s), kandinsky.capture(ours, "unet.mid", branch="cond") as rec:
        with kandinsky.intervene(ours, "unet.up.0", lambda x, ctx: x):
            got = ours.text2img(e, n, generator=gen(1), **KW).images
    assert torch.equal(got, with_source)
    for step in range(KW["num_inference_steps"]):
        assert torch.equal(rec["unet.mid", step, "cond"], expected["unet.mid", step, "cond"])
    # an intervention inside a patched run edits the patched activations
    edit = lambda x, ctx: 0.5 * x  # noqa: E731
    with kandinsky.intervene(ours, "unet.mid", edit):
        edited_source = ours.text2img(s, n, generator=gen(1), **KW).images
    with kandinsky.patch_routes(ours, s), kandinsky.intervene(ours, "unet.mid", edit):
        assert torch.equal(ours.text2img(e, n, generator=gen(1), **KW).images, edited_source)


def test_clear_errors(unet, decoder):
    s = torch.randn(1, 32)
    bad = [
        (dict(routes=["colour"]), ValueError, "routes must be a list of"),
        (dict(branch="positive"), ValueError, "branch must be one of"),
        (dict(levels=["down.9"]), ValueError, "'down.9' matches no module"),
        (dict(levels=[1]), TypeError, "levels must be UNet module names"),
    ]
    for options, error, message in bad:
        with pytest.raises(error, match=message):
            with kandinsky.patch_routes(unet, s, **options):
                pass
    with pytest.raises(ValueError, match="encoder_hid_dim = 32 columns, got 7"):
        with kandinsky.patch_routes(unet, torch.randn(1, 7)):
            pass
    with pytest.raises(TypeError, match="needs a DecoderPipeline, a Kandinsky or the decoder UNet"):
        with kandinsky.patch_routes(torch.nn.Linear(2, 2), s):
            pass
    x, t, e, _ = unet_inputs()
    with pytest.raises(ValueError, match="source_embeds has 3 rows but each guidance branch of the UNet call has 2"):
        with model_call("decoder", 0, 500, BRANCHES_GUIDED), kandinsky.patch_routes(unet, torch.randn(3, 32)):
            unet(x, t, e)
    assert no_hooks_left(unet)


# ----------------------------------------------------------------------------- causal maps
def test_route_map_on_a_tiny_model(random_demo_kandinsky, tmp_path):
    """Shapes of the result, determinism, the corner cells (nothing moves before any patch; every route
    at every level for every step is B's own picture: 1 exactly), and the picture."""
    pipe = random_demo_kandinsky
    grid = R.Grid(routes=("tokens", "time+tokens"), levels=("mid", "all"), windows=((0, 1), (1, 3), (0, 3)))
    kw = dict(measure="clip", grid=grid, seeds=[0, 1], num_inference_steps=3, prior_steps=2)
    result = R.route_map(pipe, "a red cat", "a blue dog", **kw)
    assert result.rows == [("tokens", "mid"), ("tokens", "all"), ("time+tokens", "mid"), ("time+tokens", "all")]
    assert result.windows == [(0, 1), (1, 3), (0, 3)]
    assert result.values["clip"].shape == (4, 3) and result.counts == {"clip": 2}
    assert result.a["clip"] == pytest.approx(0, abs=1e-5) and result.b["clip"] == pytest.approx(1, abs=1e-5)
    assert result.values["clip"][3, 2] == pytest.approx(1, abs=1e-5)  # time+tokens, all levels, all steps = B
    again = R.route_map(pipe, "a red cat", "a blue dog", **kw)
    assert np.array_equal(again.values["clip"], result.values["clip"])
    picture = result.picture()
    assert picture.size[1] == 48 + 4 * 34 + 40
    picture.save(tmp_path / "map.png")
    assert PIL.Image.open(tmp_path / "map.png").format == "PNG"
    # a measure of one's own: each picture's mean pixel distance from A's picture of the same row
    def distance(pictures, pair_of, pictures_a, pictures_b):
        return {"pixels": np.array([np.abs(np.asarray(p, float) - np.asarray(q, float)).mean()
                                    for p, q in zip(pictures, pictures_a)])}

    own = R.route_map(pipe, ["a red cat", "a cat"], ["a blue dog", "a dog"], measure=distance,
                      grid=R.Grid(routes=("time",), levels=("up.0",), windows=1), num_inference_steps=2,
                      prior_steps=2)
    assert own.values["pixels"].shape == (1, 1) and own.counts == {"pixels": 2} and own.a["pixels"] == 0
    # each picture's score is kept: (rows, windows, pairs x seeds), the value its mean
    assert result.scores["clip"].shape == (4, 3, 2) and result.pair_of == [0, 0]
    np.testing.assert_allclose(result.values["clip"], result.scores["clip"].mean(-1), rtol=0, atol=1e-15)


def test_route_map_standard_error_clusters_pictures_by_pair():
    """sd of the per-pair means / sqrt(pairs): the seeds of one pair count once; NaN pictures left out."""
    scores = np.array([[[1, 1, 0, 1, 0, 0, np.nan, np.nan]]], float)  # pairs 0..3, two seeds each
    m = R.RouteMap(["a"] * 4, ["b"] * 4, [0, 1], 20, [("time", "all")], [(0, 20)], {"x": np.full((1, 1), 0.5)},
                   {"x": 0.0}, {"x": 1.0}, {"x": 6}, {"x": scores}, [0, 0, 1, 1, 2, 2, 3, 3])
    means = np.array([1.0, 0.5, 0.0])  # pair 3 unmeasured
    assert m.standard_error("x").shape == (1, 1)
    assert m.standard_error("x")[0, 0] == pytest.approx(means.std(ddof=1) / np.sqrt(3), abs=1e-15)


def test_route_map_shapes_measure_on_the_shipped_model():
    from kandinsky.demo import demo_folders

    folders = demo_folders()
    pipe = kandinsky.Kandinsky.from_pretrained(folders["decoder"], prior=folders["prior"])
    result = R.route_map(pipe, "a red circle on a blue background", "a green square on a blue background",
                         measure="shapes", grid=R.Grid(routes=("time+tokens",), levels=("all",), windows=((0, 20),)),
                         num_inference_steps=20, seeds=[0])
    assert list(result.values) == ["shape", "colour"]  # the attributes the two prompts state differently
    assert result.a == {"shape": 0.0, "colour": 0.0} and result.b == {"shape": 1.0, "colour": 1.0}
    assert result.values["shape"][0, 0] == 1.0 and result.values["colour"][0, 0] == 1.0  # B's own picture


def test_route_map_errors(random_demo_kandinsky):
    pipe = random_demo_kandinsky
    with pytest.raises(ValueError, match="lists of equal length"):
        R.route_map(pipe, ["a", "b"], "c", measure="clip")
    with pytest.raises(ValueError, match="measure must be 'shapes', 'clip' or a function"):
        R.route_map(pipe, "a", "b", measure="pixels")
    with pytest.raises(ValueError, match="state no attribute differently"):
        R.route_map(pipe, "a red circle", "a red circle", measure="shapes")
    with pytest.raises(ValueError, match="not a caption of the shapes grammar"):
        R.route_map(pipe, "a cat", "a dog", measure="shapes")
    with pytest.raises(ValueError, match="grid windows must be 1..3"):
        R.route_map(pipe, "a", "b", measure="clip", grid=R.Grid(windows=4), num_inference_steps=3)
    with pytest.raises(ValueError, match="'up.9' matches no module"):
        R.route_map(pipe, "a", "b", measure="clip", grid=R.Grid(levels=("up.9",)), num_inference_steps=3)


def test_routes_command(random_demo, tmp_path, capsys):
    from kandinsky.cli import main

    out = tmp_path / "map.png"
    args = ["routes", "a red cat", "a blue dog", "--prior", random_demo["prior"], "--decoder", random_demo["decoder"],
            "--steps", "2", "--prior-steps", "2", "--size", "64x64", "--levels", "mid,all", "--windows", "2",
            "--routes", "time,tokens", "-o", out]
    assert main(args) == 0
    assert PIL.Image.open(out).format == "PNG"
    printed = capsys.readouterr().out
    assert "clip: strongest cell" in printed and f"wrote {out}" in printed
    assert main(args) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--windows", "3"]) == 2
    assert "--windows 3 is more than the 2 steps" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--levels", "side"]) == 2
    assert "'side' matches no module" in capsys.readouterr().err


def test_attribute_pairs_differ_in_that_attribute_alone():
    from kandinsky.data.shapes import ATTRIBUTES, parse_caption

    for attribute in ATTRIBUTES:
        prompts_a, prompts_b = R.attribute_pairs(attribute, 12, seed=3)
        assert len(prompts_a) == len(prompts_b) == 12
        for a, b in zip(prompts_a, prompts_b):
            sa, sb = parse_caption(a), parse_caption(b)
            assert set(sa) == set(sb) == set(ATTRIBUTES)  # every attribute stated
            assert [n for n in ATTRIBUTES if sa[n] != sb[n]] == [attribute]
            assert sb["colour"] != sb["background"]
    assert R.attribute_pairs("shape", 4, seed=3) == R.attribute_pairs("shape", 4, seed=3)
    with pytest.raises(ValueError, match="attribute must be one of"):
        R.attribute_pairs("hue", 2)


def test_with_feature_caching_and_a_guidance_interval(decoder):
    """Cached evaluations (UNet.forward_cached) and unguided steps (one branch) are patched too."""
    ours, _ = decoder
    e, n = embeds(1, seed=60)
    s = torch.randn(1, e.shape[1], generator=gen(61))
    kw = dict(KW, num_inference_steps=6, cache_interval=2, guidance_interval=(0, 0.5))
    expected = ours.text2img(s, n, generator=gen(1), **kw).images
    plain = ours.text2img(e, n, generator=gen(1), **kw).images
    with kandinsky.patch_routes(ours, s):
        assert torch.equal(ours.text2img(e, n, generator=gen(1), **kw).images, expected)
    with kandinsky.patch_routes(ours, s, routes=()):
        assert torch.equal(ours.text2img(e, n, generator=gen(1), **kw).images, plain)
