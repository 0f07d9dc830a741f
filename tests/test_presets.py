"""Presets (tasks.PRESETS): ``preset=`` on every decoder task and the prompt-level calls, ``--preset`` on
the command line. A preset gives exactly the pictures of its values passed by hand; explicit arguments
override it; unknown names are refused with the list."""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from kandinsky.cli import main
from kandinsky.pipelines.tasks import DECODER_OPTIONS, PRESETS, PRIOR_OPTIONS, preset_options

SMALL = dict(height=64, width=64, output_type="latent", progress=False)


def test_presets_name_only_options_the_calls_take():
    assert set(PRESETS) == {"fast", "balanced", "reference"}
    for values in PRESETS.values():
        assert set(values) <= set(DECODER_OPTIONS) | set(PRIOR_OPTIONS)
    # the reference preset is the reference's default configuration, and the defaults' values
    ref = PRESETS["reference"]
    assert (ref["scheduler"], ref["num_inference_steps"], ref["guidance_scale"], ref["prior_num_inference_steps"]) \
        == ("ddpm", 100, 4.0, 25)
    assert all(DECODER_OPTIONS[k] == v for k, v in ref.items() if k in DECODER_OPTIONS and k != "scheduler")
    assert preset_options("fast", DECODER_OPTIONS) == {k: v for k, v in PRESETS["fast"].items() if k in DECODER_OPTIONS}
    assert preset_options(None, DECODER_OPTIONS) == {}


@pytest.mark.parametrize("preset", ["fast", "balanced"])
@torch.no_grad()
def test_decoder_preset_equals_its_values_by_hand(decoder, preset):
    pipe, _ = decoder
    emb = torch.randn(1, pipe.unet.config.encoder_hid_dim, generator=torch.Generator().manual_seed(0))
    values = preset_options(preset, DECODER_OPTIONS)
    by_hand = pipe.text2img(emb, -emb, generator=torch.Generator().manual_seed(1), **values, **SMALL).images
    named = pipe.text2img(emb, -emb, generator=torch.Generator().manual_seed(1), preset=preset, **SMALL).images
    assert torch.equal(named, by_hand)


@torch.no_grad()
def test_explicit_arguments_override_the_preset(decoder):
    pipe, _ = decoder
    emb = torch.randn(1, pipe.unet.config.encoder_hid_dim, generator=torch.Generator().manual_seed(0))
    kw = dict(generator=torch.Generator().manual_seed(1), **SMALL)
    named = pipe.text2img(emb, -emb, preset="reference", num_inference_steps=3, scheduler="ddim", **kw).images
    kw["generator"] = torch.Generator().manual_seed(1)
    want = pipe.text2img(emb, -emb, num_inference_steps=3, scheduler="ddim", guidance_scale=4.0, **kw).images
    assert torch.equal(named, want)


@torch.no_grad()
def test_image_task_takes_a_preset(decoder):
    pipe, _ = decoder
    emb = torch.randn(1, pipe.unet.config.encoder_hid_dim, generator=torch.Generator().manual_seed(0))
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    values = {**preset_options("fast", DECODER_OPTIONS), "num_inference_steps": 6}
    by_hand = pipe.img2img(emb, image, -emb, strength=0.5, generator=torch.Generator().manual_seed(1), **values,
                           **SMALL).images
    named = pipe.img2img(emb, image, -emb, strength=0.5, generator=torch.Generator().manual_seed(1), preset="fast",
                         num_inference_steps=6, **SMALL).images
    assert torch.equal(named, by_hand)


def test_unknown_preset_is_refused(decoder):
    pipe, _ = decoder
    emb = torch.randn(1, pipe.unet.config.encoder_hid_dim)
    with pytest.raises(ValueError, match=r"preset='quick' is not a preset: use one of 'reference', 'balanced', 'fast'"):
        pipe.text2img(emb, preset="quick", guidance_scale=1.0, **SMALL)


@torch.no_grad()
def test_prompt_level_preset_sets_the_prior_too(random_demo_kandinsky):
    pipe = random_demo_kandinsky
    kw = dict(height=64, width=64, output_type="latent", progress=False)
    values = {**PRESETS["balanced"], "num_inference_steps": 3, "prior_num_inference_steps": 3}
    by_hand = pipe.text2img("a red cat", generator=torch.Generator().manual_seed(0), **values, **kw).images
    named = pipe.text2img("a red cat", generator=torch.Generator().manual_seed(0), preset="balanced",
                          num_inference_steps=3, prior_num_inference_steps=3, **kw).images
    assert torch.equal(named, by_hand)
    # the preset's prior steps are used when not given: the reference preset's 25 differ from 3
    steps = []
    pipe.text2img("a red cat", generator=torch.Generator().manual_seed(0), preset="reference", num_inference_steps=1,
                  callback_on_step_end=lambda s: steps.append(s.stage), **kw)
    assert steps.count("prior") == PRESETS["reference"]["prior_num_inference_steps"] and steps.count("decoder") == 1


def test_cli_preset_equals_the_python_api(cli_demo_seeds, random_demo, tmp_path):
    from kandinsky.pipelines.combined import Kandinsky

    out = tmp_path / "out.png"
    flags = ["--width", "64", "--height", "64", "--no-progress", "--device", "cpu"]
    assert main(["text2img", "--random-demo", "a red cat", "-o", str(out), "--preset", "fast", "--steps", "3",
                 "--prior-steps", "2", "--cache-interval", "3", "--guidance-interval", "0", "0.5", *flags]) == 0
    pipe = Kandinsky.from_pretrained(random_demo["decoder"], prior=random_demo["prior"])
    images = pipe.text2img("a red cat", generator=torch.Generator().manual_seed(0), preset="fast",
                           num_inference_steps=3, prior_num_inference_steps=2, cache_interval=3,
                           guidance_interval=(0.0, 0.5), height=64, width=64, progress=False).images
    assert np.array_equal(np.asarray(PIL.Image.open(out)), np.asarray(images[0]))


@pytest.mark.parametrize("flags, message", [(["--preset", "quick"], "invalid choice: 'quick'"),
                                            (["--guidance-interval", "0.2", "1.5"], "1.5 is not in [0, 1]"),
                                            (["--cache-interval", "0"], "--cache-interval")])
def test_cli_refuses_bad_values(flags, message, capsys):
    with pytest.raises(SystemExit):
        main(["text2img", "--random-demo", "a red cat", *flags])
    assert message in capsys.readouterr().err
