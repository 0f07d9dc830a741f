"""Messages that say the true thing (issue 18 item 8), each at both doors (Python API and CLI):

* a prompt-level call refuses an argument it does not take naming the call made (``variations()``, not
  the decoder task behind it) and what it takes (kandinsky/pipelines/combined.py);
* too few steps for a sampler warn, naming its measured minimum (kandinsky/sampling/samplers.py);
* a mask stroke in any non-black colour repaints; a dark stroke beside bright ones is kept, with a
  warning (kandinsky/pipelines/images.py);
* the long-prompt warning quotes the dropped words whole (kandinsky/clip/tokenizer.py);
* a LoRA strength beyond +-10, NaN or inf is refused, naming the value and the range (kandinsky/lora:
  check_scale; the Python doors in tests/test_lora.py);
* offload on a CPU warns that it does nothing and runs without it (kandinsky/offload.py: offload_helps; the
  Python doors in tests/test_offload.py).
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageFilter
import pytest
import torch

from kandinsky.cli import main
from kandinsky.clip import Tokenizer
from kandinsky.pipelines.combined import Kandinsky
from kandinsky.pipelines.images import load_masks
from kandinsky.pipelines.tasks import DECODER_OPTIONS, PRIOR_OPTIONS, PROMPT_TASKS
from kandinsky.sampling.samplers import SAMPLERS, make_plan
from kandinsky.sampling.schedule import NoiseSchedule
from tests.conftest import DATA
from tests.helpers import gen, rgb

FAST = ["--steps", "20", "--prior-steps", "2", "--width", "64", "--height", "64", "--no-progress"]
DOCS = Path(__file__).resolve().parent.parent / "docs"


def _warnings(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught]


# --------------------------------------------------------------------------- unexpected arguments
@pytest.mark.parametrize("task", list(PROMPT_TASKS))
def test_every_prompt_level_call_names_itself(random_demo_kandinsky, task):
    """An unknown argument is refused before any work, by the name of the call made (emb2emb, variations,
    interpolate and controlnet run the decoder's text2img / controlnet: not the name the user called)."""
    with pytest.raises(TypeError, match=rf"^{task}\(\) got unexpected argument\(s\) bogus; it takes: "):
        random_demo_kandinsky.run(task, bogus=1)


def test_variations_refuses_a_negative_prompt_and_says_where_it_has_a_meaning(random_demo_kandinsky):
    pipe = random_demo_kandinsky
    with pytest.raises(TypeError) as e:
        pipe.variations(rgb(0), negative_prompt="x")
    message = str(e.value)
    assert message.startswith("variations() got unexpected argument(s) negative_prompt; it takes: image, height")
    assert "text2img" not in message and "interpolate([image], [1.0], negative_prompt=...)" in message
    takes = message.split("it takes: ")[1].split(".")[0].split(", ")
    # the maths: the image, then every decoder option; no prompt, no prior option (no prior runs)
    assert takes == ["image", *DECODER_OPTIONS]
    for name in ("prompt", *PRIOR_OPTIONS):
        with pytest.raises(TypeError, match=rf"^variations\(\) got unexpected argument\(s\) {name}"):
            pipe.variations(rgb(0), **{name: 2})


def test_ignored_arguments_are_refused(random_demo_kandinsky):
    """emb2emb starts the prior from the image's noised embedding (no prior_latents); img2img starts the
    decoder from the image (no latents): both were once accepted and ignored."""
    pipe = random_demo_kandinsky
    with pytest.raises(TypeError, match=r"^emb2emb\(\) got unexpected argument\(s\) prior_latents"):
        pipe.emb2emb("a", rgb(0), prior_latents=torch.zeros(1, 32))
    with pytest.raises(TypeError, match=r"^img2img\(\) got unexpected argument\(s\) latents; it takes: (?!.*\blatents\b)"):
        pipe.img2img("a", rgb(0), latents=torch.zeros(1, 4, 8, 8))


def test_decoder_tasks_take_latents_unless_they_start_from_an_image(random_demo_kandinsky):
    """The decoder's own door (DecoderPipeline.run) lists what a task takes from tasks.decoder_options, the
    one owner of the rule: every decoder option, less ``latents`` where the task starts from an image."""
    from kandinsky.pipelines.tasks import DECODER_TASKS

    decoder = random_demo_kandinsky.decoder
    assert {DECODER_TASKS[t].start == "image" for t in decoder.tasks} == {True, False}  # both kinds are checked
    for task in decoder.tasks:
        spec = DECODER_TASKS[task]
        with pytest.raises(TypeError) as e:
            decoder.run(task, torch.zeros(1, 32), bogus=1)
        takes = str(e.value).split("it takes: ")[1].rstrip(".").split(", ")
        options = [n for n in DECODER_OPTIONS if not (n == "latents" and spec.start == "image")]
        assert takes == [*spec.inputs, *options]


def test_interpolate_is_the_negative_prompt_route(random_demo_kandinsky):
    """What the message points to runs: one image at weight 1 with a negative prompt."""
    out = random_demo_kandinsky.interpolate([rgb(0)], [1.0], negative_prompt="x", num_inference_steps=2,
                                            prior_num_inference_steps=2, height=64, width=64,
                                            output_type="latent", progress=False, generator=gen(0))
    assert out.images.shape[0] == 1


def test_cli_variations_refuses_negative(cli_demo, cli_pictures, tmp_path, capsys):
    assert main(["variations", "--random-demo", "--image", str(cli_pictures / "image.png"), "--negative", "x",
                 "-o", str(tmp_path / "v.png"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"^error: variations does not use --negative(-prompt)? ", err, flags=re.M) and "without the prior" in err
    assert "kandinsky interpolate --mix IMAGE 1 --negative-prompt TEXT" in err  # the route that has a meaning
    mix = ["interpolate", "--random-demo", "--mix", str(cli_pictures / "image.png"), "1", "--negative-prompt", "x",
           "-o", str(tmp_path / "m.png"), *FAST]
    assert main(mix) == 0, capsys.readouterr().err


# --------------------------------------------------------------------------- too few steps
def _schedule(spec):
    folder = "kandinsky-2-2-prior" if spec.stages == ("prior",) else "kandinsky-2-2-decoder"
    return NoiseSchedule.from_folder(DATA / folder / "scheduler")


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_below_the_minimum_warns_at_it_does_not(name):
    spec = SAMPLERS[name]
    schedule = _schedule(spec)
    assert not [m for m in _warnings(lambda: make_plan(name, schedule, spec.min_steps)) if "too few" in m]
    assert not [m for m in _warnings(lambda: make_plan(name, schedule, spec.min_steps + 5)) if "too few" in m]
    if spec.min_steps - 1 < (2 if name == "unclip" else 1):
        return  # (fewer is an error, not a warning)
    below = spec.min_steps - 1
    assert _warnings(lambda: make_plan(name, schedule, below)) == [
        f"{below} steps of {name} are too few for a usable picture from "
        f"{'the prior' if name == 'unclip' else 'the decoder'}: {name} needs at least {spec.min_steps} "
        f"(docs/usage.md, Samplers: measured on the shapes model). Expect a blurred or noisy result; use "
        f"{spec.min_steps} or more steps."]


def test_python_door_warns_at_the_callers_line(random_demo_kandinsky):
    heun = SAMPLERS["heun"].min_steps
    with pytest.warns(UserWarning, match=f"2 steps of heun are too few .* needs at least {heun}") as record:
        random_demo_kandinsky.decoder.text2img(torch.zeros(1, 32), num_inference_steps=2, scheduler="heun",
                                               guidance_scale=1.0, height=64, width=64, output_type="latent",
                                               progress=False)
    assert [w.filename for w in record if "too few" in str(w.message)] == [__file__]


def test_cli_door_says_the_minimum(cli_demo, tmp_path, capsys):
    heun = SAMPLERS["heun"].min_steps
    assert main(["text2img", "--random-demo", "a", "-o", str(tmp_path / "o.png"), *FAST[2:], "--steps", "2",
                 "--scheduler", "heun"]) == 0
    err = capsys.readouterr().err
    assert f"warning: 2 steps of heun are too few for a usable picture from the decoder: heun needs at least {heun}" in err
    assert main(["text2img", "--random-demo", "a", "-o", str(tmp_path / "p.png"), *FAST[2:], "--steps", str(heun),
                 "--scheduler", "heun"]) == 0
    assert "too few" not in capsys.readouterr().err


def test_docs_sampler_table_shows_the_registry():
    """docs/usage.md's sampler table: a "warns below" column with each sampler's min_steps."""
    text = (DOCS / "usage.md").read_text()
    table = text[text.index("| name | sampler |"):].split("\n\n")[0].splitlines()
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table]
    column = cells[0].index("warns below")
    shown = {row[0].strip("`"): row[column] for row in cells[2:]}
    assert shown == {name: str(spec.min_steps) for name, spec in SAMPLERS.items() if "decoder" in spec.stages}
    assert "benchmarks/min_steps.py" in text


# --------------------------------------------------------------------------- masks
def _stroke(colour, background=(0, 0, 0)) -> tuple[PIL.Image.Image, np.ndarray]:
    """A 64 x 64 picture: a block in ``colour``; and the block as a {0, 1} array."""
    picture = np.zeros((64, 64, 3), dtype=np.uint8)
    picture[:] = background
    picture[8:40, 16:48] = colour
    block = np.zeros((64, 64), dtype=np.float32)
    block[8:40, 16:48] = 1
    return PIL.Image.fromarray(picture), block


@pytest.mark.parametrize("colour", [(90, 0, 0), (0, 0, 80), (40, 40, 40), (255, 0, 0), (255, 255, 255)])
def test_any_non_black_stroke_repaints(colour):
    picture, block = _stroke(colour)
    assert not [m for m in _warnings(lambda: load_masks(picture, 64, 64)) if "mask_image" in m]
    assert torch.equal(load_masks(picture, 64, 64)[0, 0], torch.from_numpy(block))


def test_masks_reaching_one_half_keep_the_references_threshold():
    """The reference's rule (values >= 0.5 repaint) for every mask that reaches 0.5: a grey ramp binarises
    exactly at 128 / 255; a soft-edged white block (blurred) does not warn."""
    ramp = np.tile(np.arange(256, dtype=np.uint8)[None, :], (16, 1))  # (16, 256): 0 .. 255 left to right
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a 256 px ramp is not a soft edge: it warns)
        got = load_masks(PIL.Image.fromarray(ramp), 16, 256)[0, 0]
    assert torch.equal(got, torch.from_numpy((ramp / 255 >= 0.5).astype(np.float32)))
    block, _ = _stroke((255, 255, 255))
    soft = block.convert("L").filter(PIL.ImageFilter.GaussianBlur(4))
    assert not [m for m in _warnings(lambda: load_masks(soft, 64, 64)) if "mask_image" in m]
    assert torch.equal(load_masks(soft, 64, 64)[0, 0], torch.from_numpy((np.asarray(soft) / 255 >= 0.5).astype(np.float32)))


def test_a_dark_stroke_beside_white_is_kept_and_warns():
    picture = np.zeros((64, 128, 3), dtype=np.uint8)
    picture[8:56, 4:36] = (90, 0, 0)  # dark red, more than 16 px from the white block
    picture[8:56, 80:120] = 255
    (message,) = [m for m in _warnings(lambda: load_masks(PIL.Image.fromarray(picture), 64, 128)) if "mask" in m]
    share = 48 * 32 / (64 * 128)
    assert message.startswith(f"mask_image: {share:.0%} of its pixels are painted too dark to repaint")
    assert "KEPT" in message and "white or a bright colour" in message
    assert load_masks(PIL.Image.fromarray(picture), 64, 128).sum().item() == 48 * 40  # the white block only


def test_black_with_noise_repaints_nothing():
    noise = np.random.default_rng(0).integers(0, 12, (64, 64), dtype=np.uint8)  # JPEG-like black, < 1/16
    with pytest.warns(UserWarning, match="repaints nothing"):
        assert load_masks(PIL.Image.fromarray(noise), 64, 64).sum() == 0


def test_cli_dark_red_mask_repaints(cli_demo, cli_pictures, tmp_path, capsys):
    dark, _ = _stroke((90, 0, 0))
    dark.save(tmp_path / "dark.png")
    image = str(cli_pictures / "image.png")
    assert main(["inpaint", "--random-demo", "a hat", "--image", image, "--mask", str(tmp_path / "dark.png"),
                 "-o", str(tmp_path / "o.png"), *FAST]) == 0
    err = capsys.readouterr().err
    assert "mask_image" not in err
    beside = np.zeros((64, 64, 3), dtype=np.uint8)
    beside[:, :20] = (90, 0, 0)
    beside[:, 44:] = 255
    PIL.Image.fromarray(beside).save(tmp_path / "beside.png")
    assert main(["inpaint", "--random-demo", "a hat", "--image", image, "--mask", str(tmp_path / "beside.png"),
                 "-o", str(tmp_path / "p.png"), *FAST]) == 0
    assert "warning: mask_image: " in capsys.readouterr().err


# --------------------------------------------------------------------------- long prompts
def test_dropped_words_are_quoted_whole(clip_tokenizer_folder):
    """75 BPE tokens fit: 74 one-token words, then a long word cut after its first token."""
    from transformers import CLIPTokenizer

    hf = CLIPTokenizer.from_pretrained(clip_tokenizer_folder)
    word = "supercalifragilisticexpialidocious"
    pieces = hf(word, add_special_tokens=False).input_ids
    assert len(pieces) > 1 and len(hf("cat " * 74, add_special_tokens=False).input_ids) == 74
    first = hf.decode(pieces[:1]).strip()  # the part of the word that fits
    got = _warnings(lambda: Tokenizer.from_folder(clip_tokenizer_folder)("cat " * 74 + word + " in the rain"))
    assert got == [f"the prompt is longer than CLIP's 75 tokens; these words are dropped: '{word} in the rain' "
                   f"(of '{word}', only '{first}' is kept). Shorten it, or put what matters first."]


def test_cli_quotes_dropped_words_whole(cli_demo, tmp_path, capsys):
    """The random demo's byte-level tokenizer: one token per character, 75 fit: "a " * 74 then 'h'."""
    assert main(["text2img", "--random-demo", "a " * 74 + "hello world", "-o", str(tmp_path / "o.png"), *FAST]) == 0
    assert ("warning: the prompt is longer than CLIP's 75 tokens; these words are dropped: 'hello world' "
            "(of 'hello', only 'h' is kept)") in capsys.readouterr().err


# --------------------------------------------------------------------------- LoRA strength, offload on a CPU
@pytest.mark.parametrize("text, value", [("1e9", 1e9), ("nan", float("nan")), ("inf", float("inf")),
                                         ("-10.5", -10.5)])
def test_cli_lora_strength_out_of_range(cli_demo, tmp_path, capsys, text, value):
    """The CLI door of kandinsky.lora.check_scale: a usage error before anything loads, naming the argument,
    the value and the range."""
    (tmp_path / "style.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    arg = f"{tmp_path / 'style.safetensors'}:{text}"
    with pytest.raises(SystemExit) as e:
        main(["text2img", "--random-demo", "a", "-o", str(tmp_path / "o.png"), "--lora", arg, *FAST])
    assert e.value.code == 2 and not (tmp_path / "o.png").exists()
    assert (f"error: argument --lora: {arg}: strength {value:g} is out of range: a LoRA's strength is a finite "
            "number from -10 to 10") in capsys.readouterr().err


def test_cli_offload_on_a_cpu_says_so_and_runs_without(cli_demo, tmp_path, capsys):
    """The CLI door of kandinsky.offload.offload_helps: the Python door's wording with the option as typed."""
    assert main(["text2img", "--random-demo", "a", "-o", str(tmp_path / "o.png"), "--offload", "sequential",
                 "--device", "cpu", *FAST]) == 0
    err = capsys.readouterr().err
    assert ("warning: --offload sequential does nothing on cpu (it keeps weights off the GPU until they run); "
            "running without it") in err
    assert ".py:" not in err and (tmp_path / "o.png").is_file()
