"""The generation tasks (kandinsky/cli/generate.py): every task runs from the command line on the tiny
``--random-demo`` checkpoints (the session's, conftest ``cli_demo_seeds``) and gives the Python API's
pixels for the same arguments (dtype, scheduler, seeds, pictures as stored: alpha, 16-bit depth, EXIF
orientation); each task's --help; numbers refused by the parser. The real ``--demo`` path runs end to
end once, and the shipped shapes model draws what the prompt says."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import time

import numpy as np
import PIL.Image
import pytest
import torch

from kandinsky.cli import main
from kandinsky.pipelines.combined import Kandinsky
from kandinsky.pipelines.tasks import PROMPT_TASKS

FAST = ["--width", "64", "--height", "64", "--steps", "2", "--prior-steps", "2", "--no-progress", "--device", "cpu"]
NO_PRIOR = ["--width", "64", "--height", "64", "--steps", "2", "--no-progress", "--device", "cpu"]  # variations
API = dict(height=64, width=64, num_inference_steps=2, prior_num_inference_steps=2, progress=False)


def pixels(path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path))


def api_pixels(images) -> np.ndarray:
    return np.asarray(images[0])


TASKS = {
    "img2img": ["a red cat", "--image", "{image}", "--strength", "0.5", "--width", "128"],  # non-square
    "inpaint": ["a hat", "--image", "{image}", "--mask", "{mask}"],
    "variations": ["--image", "{image}"],
    "interpolate": ["--mix", "a red cat", "0.4", "--mix", "{image}", "0.6", "--negative-prompt", "blurry"],
    "controlnet": ["a robot", "--hint", "{hint}", "--negative-prompt", "a cat"],
    "controlnet_img2img": ["a robot", "--image", "{image}", "--hint", "{hint}", "--strength", "0.6"],
    "emb2emb": ["a red cat", "--image", "{image}", "--prior-strength", "0.5"],
}


def test_text2img_demo_end_to_end(tmp_path, capsys):
    """The real --demo path: checkpoints built on the fly in a temporary folder."""
    out = tmp_path / "tmp" / "out.png"
    assert main(["text2img", "--random-demo", "a red cat", "-o", str(out), *FAST]) == 0
    image = PIL.Image.open(out)
    assert image.format == "PNG" and image.mode == "RGB" and image.size == (64, 64)
    assert pixels(out).std() > 0  # not a blank picture
    err = capsys.readouterr().err
    assert "RANDOM" in err and str(out) in err
    assert "it/s" not in err and "s/it" not in err  # --no-progress


def test_every_task_is_tested():
    assert set(PROMPT_TASKS) == set(TASKS) | {"text2img"}


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_with_demo(task, cli_demo_seeds, cli_pictures, tmp_path, capsys):
    args = [a.format(image=cli_pictures / "image.png", mask=cli_pictures / "mask.png", hint=cli_pictures / "hint.png")
            for a in TASKS[task]]
    out = tmp_path / f"{task}.png"
    fast = NO_PRIOR if task == "variations" else FAST  # variations runs no prior: its flags are refused
    assert main([task, "--random-demo", "-o", str(out), *fast, *args]) == 0
    assert cli_demo_seeds == [0]
    width = 128 if task == "img2img" else 64
    assert PIL.Image.open(out).size == (width, 64)
    err = capsys.readouterr().err
    assert "it/s" not in err and "s/it" not in err  # --no-progress silences the prior's bars too


def test_num_images(cli_demo_seeds, tmp_path):
    out = tmp_path / "out.png"
    assert main(["text2img", "--random-demo", "a red cat", "-o", str(out), "--num-images", "2", *FAST]) == 0
    assert not out.exists()
    first, second = pixels(tmp_path / "out-0.png"), pixels(tmp_path / "out-1.png")
    assert first.shape == second.shape == (64, 64, 3)
    assert not np.array_equal(first, second)


def test_seed_determinism(cli_demo_seeds, tmp_path):
    def run(seed: int, name: str) -> np.ndarray:
        out = tmp_path / name
        assert main(["text2img", "--random-demo", "a red cat", "-o", str(out), "--seed", str(seed), *FAST]) == 0
        return pixels(out)

    a, b, c = run(0, "a.png"), run(0, "b.png"), run(1, "c.png")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert cli_demo_seeds == [0, 0, 1]


def test_cli_equals_python_api(cli_demo_seeds, random_demo, tmp_path):
    """The CLI's flags map onto Kandinsky's arguments: same seed, same pixels."""
    out = tmp_path / "out.png"
    flags = ["--negative-prompt", "blurry", "--guidance-scale", "3", "--prior-guidance-scale", "2", "--num-images", "2"]
    assert main(["text2img", "--random-demo", "a red cat", "-o", str(out), "--seed", "0", *FAST, *flags]) == 0

    pipe = Kandinsky.from_pretrained(random_demo["decoder"])  # the prior: from the demo's model card
    images = pipe.text2img(
        "a red cat", negative_prompt="blurry", guidance_scale=3.0, prior_guidance_scale=2.0, num_images_per_prompt=2,
        height=64, width=64, num_inference_steps=2, prior_num_inference_steps=2,
        generator=torch.Generator().manual_seed(0), progress=False,
    ).images
    for i, image in enumerate(images):
        assert np.array_equal(pixels(tmp_path / f"out-{i}.png"), np.asarray(image))


@pytest.mark.parametrize("flags, dtype, scheduler", [(["--dtype", "bf16"], torch.bfloat16, None),
                                                     (["--scheduler", "ddim"], None, "ddim")])
def test_dtype_and_scheduler_flags_equal_python_api(flags, dtype, scheduler, cli_demo_seeds, random_demo, tmp_path):
    out = tmp_path / "out.png"
    assert main(["text2img", "--random-demo", "a red cat", "-o", str(out), *FAST, *flags]) == 0
    pipe = Kandinsky.from_pretrained(random_demo["decoder"], prior=random_demo["prior"], dtype=dtype,
                                     scheduler=scheduler)
    assert pipe.decoder.dtype == (dtype or torch.float32)
    assert pipe.decoder.sampler == (scheduler or "ddpm")
    images = pipe.text2img("a red cat", generator=torch.Generator().manual_seed(0), **API).images
    assert np.array_equal(pixels(out), api_pixels(images))


def test_pictures_read_like_the_python_api(cli_demo_seeds, random_demo, tmp_path):
    """An RGBA photo (variations: alpha composited onto white by CLIP preprocessing), a 16-bit
    depth PNG (not clipped at 255) and a photo with an EXIF rotation (shown upright)."""
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (48, 40, 4), dtype=np.uint8)
    rgba[:10, :, 3] = 0  # a transparent band storing random colours
    PIL.Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    no_prior = ["--width", "64", "--height", "64", "--steps", "2", "--no-progress", "--device", "cpu"]  # no prior
    assert main(["variations", "--random-demo", "--image", str(tmp_path / "rgba.png"), "-o", str(tmp_path / "v.png"),
                 *no_prior]) == 0
    pipe = Kandinsky.from_pretrained(random_demo["decoder"], prior=random_demo["prior"])
    expected = pipe.variations(PIL.Image.fromarray(rgba, mode="RGBA"), generator=torch.Generator().manual_seed(0),
                               height=64, width=64, num_inference_steps=2, progress=False).images
    dropped = pipe.variations(PIL.Image.fromarray(rgba[..., :3]), generator=torch.Generator().manual_seed(0),
                              height=64, width=64, num_inference_steps=2, progress=False).images
    assert not np.array_equal(api_pixels(expected), api_pixels(dropped))  # the alpha handling matters
    assert np.array_equal(pixels(tmp_path / "v.png"), api_pixels(expected))

    depth = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    PIL.Image.fromarray(depth).save(tmp_path / "depth.png")
    assert main(["controlnet", "--random-demo", "a robot", "--hint", str(tmp_path / "depth.png"), "-o",
                 str(tmp_path / "c.png"), *FAST]) == 0
    depth_pipe = Kandinsky.from_pretrained(random_demo["controlnet"], prior=random_demo["prior"])
    hint = torch.from_numpy(depth.astype(np.float32) / 65535)[None]  # (1, H, W) in [0, 1]
    expected = depth_pipe.controlnet("a robot", hint, generator=torch.Generator().manual_seed(0), **API).images
    assert np.array_equal(pixels(tmp_path / "c.png"), api_pixels(expected))

    photo = rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)  # stored 64 high, 128 wide
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    PIL.Image.fromarray(photo).save(tmp_path / "photo.png", exif=exif)
    assert main(["img2img", "--random-demo", "a cat", "--image", str(tmp_path / "photo.png"), "--strength", "0.5",
                 "-o", str(tmp_path / "i.png"), *FAST, "--width", "64", "--height", "128", "--steps", "4"]) == 0
    upright = PIL.Image.fromarray(np.rot90(photo, k=-1).copy())  # 128 high, 64 wide, as viewers show it
    expected = pipe.img2img("a cat", upright, strength=0.5, generator=torch.Generator().manual_seed(0),
                            **{**API, "height": 128, "num_inference_steps": 4}).images
    assert np.array_equal(pixels(tmp_path / "i.png"), api_pixels(expected))


def test_inpaint_on_a_decoder_that_cannot(cli_demo_seeds, random_demo, cli_pictures, tmp_path, capsys):
    decoder = random_demo["decoder"]
    code = main(["inpaint", "--random-demo", "a hat", "--image", str(cli_pictures / "image.png"), "--mask",
                 str(cli_pictures / "mask.png"), "--decoder", str(decoder), "-o", str(tmp_path / "o.png"), *FAST])
    assert code == 2
    assert "pass --decoder kandinsky-community/kandinsky-2-2-decoder-inpaint" in capsys.readouterr().err


@pytest.mark.parametrize("task", list(PROMPT_TASKS))
def test_help_of_every_subcommand(task, capsys):
    with pytest.raises(SystemExit) as info:
        main([task, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert f"kandinsky {task}" in text and "examples:" in text and f"{task} inputs:" in text
    assert "--random-demo" in text and "--scheduler" in text and "--dtype" in text
    task_options = {"img2img": ["--image", "--strength", "(0, 1]"], "inpaint": ["--mask", "white = repaint"],
                    "variations": ["--image"], "interpolate": ["--mix"], "controlnet": ["--hint", "depth"],
                    "text2img": ["what to paint"], "emb2emb": ["--image", "--prior-strength"],
                    "controlnet_img2img": ["--image", "--hint", "--strength"]}
    for word in task_options[task]:
        assert word in text


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps: 0 is too small"),
    (["--width", "0"], "--width: 0 is too small"),
    (["--height", "0"], "--height: 0 is too small (at least 1)"),
    (["--prior-steps", "1"], "--prior-steps: 1 is too small (at least 2)"),
    (["--num-images", "0"], "--num-images: 0 is too small"),
    (["--width", "abc"], "'abc' is not an integer"),
])
def test_bad_numbers_refused_by_the_parser(flags, message, cli_demo_seeds, capsys):
    with pytest.raises(SystemExit) as info:
        main(["text2img", "--random-demo", "a red cat", *flags])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert cli_demo_seeds == []


def test_bad_strength_refused(cli_demo_seeds, capsys):
    with pytest.raises(SystemExit):
        main(["img2img", "--random-demo", "a red cat", "--image", "x.png", "--strength", "1.5"])
    assert "--strength: 1.5 is not in (0, 1]" in capsys.readouterr().err


def test_console_script_demo_fresh_process(tmp_path):
    exe = shutil.which("kandinsky")
    if exe is None:
        pytest.skip("the `kandinsky` console script is not installed (pip install -e .)")
    # One thread: the tiny demo models gain nothing from more, and on a machine busy with other
    # work torch's spinning worker threads can make them many times slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    result = subprocess.run([exe, "text2img", "--random-demo", "a red cat", "-o", "out.png"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    image = PIL.Image.open(tmp_path / "out.png")
    assert image.size == (256, 256) and image.mode == "RGB"  # the demo defaults
    assert pixels(tmp_path / "out.png").std() > 0
    assert "RANDOM" in result.stderr
    assert seconds < 60, f"the demo took {seconds:.0f} s"


@pytest.mark.skipif(not (pathlib.Path(__file__).parents[1] / "kandinsky" / "demo_weights" / "prior").is_dir(),
                    reason="no shipped demo weights")
def test_demo_draws_what_the_prompt_says(tmp_path, capsys):
    """The README's first command: `--demo` runs the shipped tiny model trained on shapes (offline)
    and the picture has the prompted colours (checked by the shapes analyser)."""
    from kandinsky.data.analyse import analyse

    out = tmp_path / "demo.png"
    assert main(["text2img", "--demo", "a red circle on a blue background", "-o", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "trained on procedural shapes" in err and "RANDOM" not in err
    picture = PIL.Image.open(out)
    assert picture.size == (64, 64)
    found = analyse(picture)
    assert (found.colour, found.background) == ("red", "blue")


def test_demo_image_tasks_draw_at_the_demo_size(tmp_path):
    """--demo (the 64 px shapes model) resizes an input picture to 64 x 64 unless --width / --height say."""
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    quick = ["--steps", "4", "--prior-steps", "2", "--no-progress", "--device", "cpu"]
    assert main(["img2img", "--demo", "a red circle", "--image", str(tmp_path / "big.png"), "-o",
                 str(tmp_path / "a.png"), *quick]) == 0
    assert PIL.Image.open(tmp_path / "a.png").size == (64, 64)
    assert main(["img2img", "--demo", "a red circle", "--image", str(tmp_path / "big.png"), "-o",
                 str(tmp_path / "b.png"), "--width", "128", *quick]) == 0
    assert PIL.Image.open(tmp_path / "b.png").size == (128, 96)  # a size given: the other is the picture's
