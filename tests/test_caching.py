"""Fewer / cheaper decoder UNet evaluations: feature caching across steps (UNet.forward_cached,
DecoderDenoiser's cache_interval / cache_level) and guidance on an interval (guidance_interval).

Off they change nothing (bit for bit); a cached evaluation equals the full one when the cached
features are what the full one would compute (same x, same t); outside the guidance interval the
decoder is the conditional branch alone; every sampler, task, LoRA and the ModelCall record work."""
from __future__ import annotations

import copy

import pytest
import torch

from kandinsky.calls import current_call
from kandinsky.sampling.denoisers import DecoderDenoiser
from kandinsky.sampling.samplers import make_plan, sampler_names
from kandinsky.unet.model import DeepCache, block_types
from tests.helpers import assert_close, randomize_
from tests.refs.unet import tiny_unet_config
from weights_convert import build_model

SIZE = dict(height=64, width=64)


def two_level_unet():
    """A random 2-level UNet (diffusers' own tiny Kandinsky configs use 2 levels)."""
    down, up = block_types(2)
    config = tiny_unet_config("decoder", layers_per_block=1, block_out_channels=(32, 64), down_block_types=down,
                              up_block_types=up)
    return randomize_(build_model({"_class_name": "UNet2DConditionModel", **config}), seed=3).eval()


@pytest.fixture(scope="module")
def unets(tiny_models):
    return {"depth 4": randomize_(copy.deepcopy(tiny_models["unet"]), seed=1).eval(), "depth 2": two_level_unet()}


def unet_inputs(unet, batch=2, seed=0, size=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, unet.config.sample_channels, size, size, generator=g)
    embeds = torch.randn(batch, unet.config.encoder_hid_dim, generator=g)
    return x, embeds


@pytest.mark.parametrize("name", ["depth 4", "depth 2"])
@torch.no_grad()
def test_full_cached_evaluation_is_the_forward_and_a_cached_one_equals_it_at_the_same_x(unets, name):
    unet = unets[name]
    x, embeds = unet_inputs(unet)
    want = unet(x, 500, embeds)
    for level in range(1, unet.config.depth + 1):
        cache = DeepCache(level)
        assert torch.equal(unet.forward_cached(x, 500, embeds, None, cache), want)  # full: bit-identical
        assert cache.deep is not None
        stored = cache.deep.clone()
        assert torch.equal(unet.forward_cached(x, 500, embeds, None, cache), want)  # cached, same x and t
        assert torch.equal(cache.deep, stored)  # a cached evaluation leaves the cache alone
        # the shallow levels really run on the new input: a different x gives a different output
        moved = unet.forward_cached(x + 0.5, 500, embeds, None, cache)
        assert (moved - want).abs().max() > 1e-3


@torch.no_grad()
def test_deep_features_have_the_cut_shape(unets):
    """Cut at level k < depth: the up level at resolution k's output, up-sampled to resolution k - 1,
    with C[k] channels; k = depth: the mid block's output."""
    unet = unets["depth 4"]
    x, embeds = unet_inputs(unet)  # 16 x 16 latents: resolutions 16, 8, 4, 2
    C = unet.config.block_out_channels
    shapes = {1: (2, C[1], 16, 16), 2: (2, C[2], 8, 8), 3: (2, C[3], 4, 4), 4: (2, C[3], 2, 2)}
    for level, shape in shapes.items():
        cache = DeepCache(level)
        unet.forward_cached(x, 10, embeds, None, cache)
        assert tuple(cache.deep.shape) == shape


def recorder(unet):
    """Forward pre-hooks: the ModelCall of every evaluation (at conv_in) and how often the mid block ran."""
    seen = {"calls": [], "mid": 0, "batch": []}

    def at_input(module, args):
        seen["calls"].append(current_call())
        seen["batch"].append(args[0].shape[0])

    def at_mid(module, args):
        seen["mid"] += 1

    handles = [unet.conv_in.register_forward_pre_hook(at_input), unet.mid.register_forward_pre_hook(at_mid)]
    return seen, handles


@pytest.mark.parametrize("guidance", [1.0, 4.0])
@torch.no_grad()
def test_denoiser_cached_step_equals_full_step_at_unchanged_x(unets, guidance):
    unet = unets["depth 4"]
    x, embeds = unet_inputs(unet, batch=1)
    embeds = torch.cat([embeds, embeds + 1]) if guidance > 1 else embeds
    full = DecoderDenoiser(unet, embeds, guidance)
    cached = DecoderDenoiser(unet, embeds, guidance, cache_interval=3, cache_level=2)
    seen, handles = recorder(unet)
    try:
        outs = [cached(x, 700, step) for step in range(4)]
    finally:
        for h in handles:
            h.remove()
    want = full(x, 700, 0)
    for out in outs:
        assert torch.equal(out.output, want.output)
        if guidance > 1:
            assert torch.equal(out.cond, want.cond) and torch.equal(out.uncond, want.uncond)
    assert [c.cached for c in seen["calls"]] == [False, True, True, False]
    assert seen["mid"] == 2  # the deep levels ran at the two full evaluations only


@pytest.mark.parametrize("sampler", sampler_names())
@torch.no_grad()
def test_every_sampler_with_caching(decoder, sampler):
    pipe, _ = decoder
    emb = torch.randn(1, pipe.unet.config.encoder_hid_dim, generator=torch.Generator().manual_seed(0))
    kw = dict(negative_image_embeds=-emb, **SIZE, num_inference_steps=4, guidance_scale=4.0, scheduler=sampler,
              output_type="latent", progress=False)
    plain = pipe.text2img(emb, generator=torch.Generator().manual_seed(1), **kw).images
    off = pipe.text2img(emb, generator=torch.Generator().manual_seed(1), cache_interval=1, **kw).images
    assert torch.equal(off, plain)  # off: bit-identical
    seen, handles = recorder(pipe.unet)
    try:
        out = pipe.text2img(emb, generator=torch.Generator().manual_seed(1), cache_interval=2, **kw).images
    finally:
        for h in handles:
            h.remove()
    evaluations = len(seen["calls"])
    assert evaluations == (7 if sampler == "heun" else 4)  # Heun: 2n - 1
    assert [c.cached for c in seen["calls"]] == [i % 2 == 1 for i in range(evaluations)]
    assert seen["mid"] == (evaluations + 1) // 2
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    # the cached run stays near the full one (same noise, a small change per cached step)
    assert (out - plain).abs().mean() < plain.abs().mean()


@pytest.mark.parametrize("task", ["img2img", "inpaint", "controlnet", "controlnet_img2img"])
@torch.no_grad()
def test_image_tasks_with_caching(decoder, inpainter, controlnet, task):
    pipe = {"img2img": decoder, "inpaint": inpainter}.get(task, controlnet)[0]
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(2, pipe.unet.config.encoder_hid_dim, generator=g)
    picture = torch.rand(1, 3, 64, 64, generator=g)
    inputs = {"image": picture, "mask_image": (torch.rand(1, 1, 64, 64, generator=g) > 0.5).float(),
              "hint": picture, "strength": 0.75}
    inputs = {k: v for k, v in inputs.items() if k in pipe_inputs(task)}
    kw = dict(negative_image_embeds=-emb, **SIZE, num_inference_steps=4, guidance_scale=4.0, output_type="latent",
              progress=False, **inputs)
    plain = pipe.run(task, emb, generator=torch.Generator().manual_seed(1), **kw).images
    assert torch.equal(pipe.run(task, emb, generator=torch.Generator().manual_seed(1), cache_interval=1,
                                guidance_interval=(0, 1), **kw).images, plain)
    out = pipe.run(task, emb, generator=torch.Generator().manual_seed(1), cache_interval=2, **kw).images
    assert torch.isfinite(out).all() and out.shape == plain.shape and not torch.equal(out, plain)


def pipe_inputs(task):
    from kandinsky.pipelines.tasks import DECODER_TASKS

    return DECODER_TASKS[task].inputs


@pytest.mark.parametrize("task", ["inpaint", "controlnet"])
@torch.no_grad()
def test_task_inputs_cached_step_equals_full_step(inpainter, controlnet, task):
    """The inpainting channels and the ControlNet hint reach the cached (shallow) evaluations too."""
    unet = (inpainter if task == "inpaint" else controlnet)[0].unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    embeds = torch.randn(2, unet.config.encoder_hid_dim, generator=g)
    extra = dict(inpaint=torch.randn(1, 5, 8, 8, generator=g)) if task == "inpaint" else \
        dict(hint=torch.rand(1, 3, 64, 64, generator=g))
    full = DecoderDenoiser(unet, embeds, 4.0, **extra)(x, 300, 0).output
    cached = DecoderDenoiser(unet, embeds, 4.0, cache_interval=2, **extra)
    cached(x, 300, 0)
    assert torch.equal(cached(x, 300, 1).output, full)


@torch.no_grad()
def test_caching_with_lora(unets):
    from kandinsky.lora import add_lora

    unet = copy.deepcopy(unets["depth 4"])
    params = add_lora(unet, rank=2, alpha=4)
    for p in params:
        p.normal_(0, 0.3, generator=torch.Generator().manual_seed(5))
    x, embeds = unet_inputs(unet, batch=1)
    full = DecoderDenoiser(unet, embeds, 1.0)(x, 200, 0).output
    assert not torch.equal(full, DecoderDenoiser(unets["depth 4"], embeds, 1.0)(x, 200, 0).output)  # LoRA counts
    cached = DecoderDenoiser(unet, embeds, 1.0, cache_interval=2, cache_level=1)
    assert torch.equal(cached(x, 200, 0).output, full)
    assert torch.equal(cached(x, 200, 1).output, full)


@torch.no_grad()
def test_guidance_outside_the_interval_is_the_conditional_branch_alone(unets):
    unet = unets["depth 4"]
    x, _ = unet_inputs(unet, batch=2)
    _, embeds = unet_inputs(unet, batch=4, seed=1)  # [negative (2); positive (2)]
    plan = make_plan("ddim", _schedule(), 10)
    interval = DecoderDenoiser(unet, embeds, 5.0, guidance_interval=(0.2, 0.6), plan=plan)
    guided = DecoderDenoiser(unet, embeds, 5.0)
    cond = DecoderDenoiser(unet, embeds[2:], 1.0)
    seen, handles = recorder(unet)
    try:
        for step in range(10):
            t = plan.timesteps[step]
            out = interval(x, t, step)
            inside = 0.2 <= step / 10 < 0.6
            want = guided(x, t, step) if inside else cond(x, t, step)
            assert torch.equal(out.output, want.output)
            assert (out.uncond is not None) == inside
    finally:
        for h in handles:
            h.remove()
    mine = seen["calls"][::2]  # each step: the interval denoiser, then the one compared with
    assert [c.branches for c in mine] == [("uncond", "cond") if 2 <= s < 6 else ("cond",) for s in range(10)]
    assert seen["batch"][::2] == [4 if 2 <= s < 6 else 2 for s in range(10)]


def _schedule():
    from kandinsky.sampling.schedule import NoiseSchedule

    return NoiseSchedule.from_config({"_class_name": "DDPMScheduler", "num_train_timesteps": 1000})


@torch.no_grad()
def test_guidance_interval_in_img2img_counts_the_whole_plan(decoder):
    """Fractions are of the whole plan: img2img at strength 0.5 starts at 0.5, so (0, 0.5) never guides."""
    pipe, _ = decoder
    emb = torch.randn(1, pipe.unet.config.encoder_hid_dim, generator=torch.Generator().manual_seed(0))
    kw = dict(negative_image_embeds=-emb, image=torch.rand(1, 3, 64, 64), strength=0.5, **SIZE,
              num_inference_steps=8, guidance_scale=4.0, output_type="latent", progress=False)
    seen, handles = recorder(pipe.unet)
    try:
        never = pipe.img2img(emb, generator=torch.Generator().manual_seed(1), guidance_interval=(0, 0.5), **kw).images
    finally:
        for h in handles:
            h.remove()
    assert seen["batch"] == [1] * 4
    kw.update(guidance_scale=1.0)
    assert torch.equal(never, pipe.img2img(emb, generator=torch.Generator().manual_seed(1), **kw).images)


@torch.no_grad()
def test_caching_across_the_guidance_interval(unets):
    """A guided full evaluation's cache serves an unguided cached one with its conditional half."""
    unet = unets["depth 2"]
    x, _ = unet_inputs(unet, batch=1)
    _, embeds = unet_inputs(unet, batch=2, seed=1)
    plan = make_plan("ddim", _schedule(), 4)
    both = DecoderDenoiser(unet, embeds, 4.0, cache_interval=2, guidance_interval=(0, 0.25), plan=plan)
    seen, handles = recorder(unet)
    try:
        both(x, 900, 0)  # guided, full
        out = both(x, 900, 1)  # unguided, cached: the conditional half of the guided cache
    finally:
        for h in handles:
            h.remove()
    assert [c.cached for c in seen["calls"]] == [False, True] and seen["batch"] == [2, 1]
    # the cached half was computed in a batch of 2: equal up to the batch's float rounding
    assert_close(out.output, DecoderDenoiser(unet, embeds[1:], 1.0)(x, 900, 1).output, 1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(cache_interval=0), "cache_interval must be a whole number >= 1"),
    (dict(cache_interval=2.5), "cache_interval must be a whole number >= 1"),
    (dict(cache_level=0), "cache_level must be a UNet resolution level from 1 to 4"),
    (dict(cache_level=5), "cache_level must be a UNet resolution level from 1 to 4"),
    (dict(guidance_interval=(0.6, 0.2)), r"guidance_interval must be \(lo, hi\) with 0 <= lo <= hi <= 1"),
    (dict(guidance_interval=0.5), r"guidance_interval must be \(lo, hi\)"),
    (dict(guidance_interval=(0, 1.5)), r"guidance_interval must be \(lo, hi\)"),
])
def test_bad_values_are_refused_before_the_run(decoder, kwargs, message):
    pipe, _ = decoder
    emb = torch.randn(1, pipe.unet.config.encoder_hid_dim)
    with pytest.raises(ValueError, match=message):
        pipe.text2img(emb, guidance_scale=1.0, num_inference_steps=2, **SIZE, progress=False, **kwargs)
