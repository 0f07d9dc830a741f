"""Review of the ``kandinsky`` command line as a user runs it: the console script in a fresh
process, --dtype bf16 and --scheduler ddim against the Python API, every subcommand's --help,
bad numbers and devices refused before anything is built, and pictures read as the Python API
reads them (alpha, 16-bit depth maps, EXIF orientation)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch

import kandinsky.demo
from kandinsky.cli import main
from kandinsky.pipelines.tasks import PROMPT_TASKS as TASKS
from kandinsky.pipelines.combined import Kandinsky

BUILD_DEMO = kandinsky.demo.build_demo_checkpoints
FAST = ["--width", "64", "--height", "64", "--steps", "2", "--prior-steps", "2", "--no-progress", "--device", "cpu"]
API = dict(height=64, width=64, num_inference_steps=2, prior_num_inference_steps=2, progress=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a machine busy with other work
    torch's spinning worker threads make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The seed-0 demo checkpoints, built once for this module."""
    return BUILD_DEMO(tmp_path_factory.mktemp("review-demo"), seed=0)


@pytest.fixture
def cached_demo(monkeypatch, demo):
    """``--demo`` reuses the module's checkpoints; returns the seeds it was asked for."""
    calls = []

    def build(root, seed=0):
        calls.append(seed)
        return demo

    monkeypatch.setattr(kandinsky.demo, "build_demo_checkpoints", build)
    return calls


def pixels(path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path))


def api_pixels(images) -> np.ndarray:
    return np.asarray(images[0])


# --------------------------------------------------------------------------- the console script
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


@pytest.mark.parametrize("task", list(TASKS))
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


# --------------------------------------------------------------------------- dtype and scheduler
@pytest.mark.parametrize("flags, dtype, scheduler", [(["--dtype", "bf16"], torch.bfloat16, None),
                                                     (["--scheduler", "ddim"], None, "ddim")])
def test_dtype_and_scheduler_flags_equal_python_api(flags, dtype, scheduler, cached_demo, demo, tmp_path):
    out = tmp_path / "out.png"
    assert main(["text2img", "--random-demo", "a red cat", "-o", str(out), *FAST, *flags]) == 0
    pipe = Kandinsky.from_pretrained(demo["decoder"], prior=demo["prior"], dtype=dtype, scheduler=scheduler)
    assert pipe.decoder.dtype == (dtype or torch.float32)
    assert pipe.decoder.sampler == (scheduler or "ddpm")
    images = pipe.text2img("a red cat", generator=torch.Generator().manual_seed(0), **API).images
    assert np.array_equal(pixels(out), api_pixels(images))


# --------------------------------------------------------------------------- refused before any work
@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps: 0 is too small"),
    (["--width", "0"], "--width: 0 is too small"),
    (["--height", "0"], "--height: 0 is too small (at least 1)"),
    (["--prior-steps", "1"], "--prior-steps: 1 is too small (at least 2)"),
    (["--num-images", "0"], "--num-images: 0 is too small"),
    (["--width", "abc"], "'abc' is not an integer"),
])
def test_bad_numbers_refused_by_the_parser(flags, message, cached_demo, capsys):
    with pytest.raises(SystemExit) as info:
        main(["text2img", "--random-demo", "a red cat", *flags])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert cached_demo == []


def test_bad_strength_refused(cached_demo, capsys):
    with pytest.raises(SystemExit):
        main(["img2img", "--random-demo", "a red cat", "--image", "x.png", "--strength", "1.5"])
    assert "--strength: 1.5 is not in (0, 1]" in capsys.readouterr().err


def test_bad_devices_refused_before_building(cached_demo, tmp_path, capsys):
    out = str(tmp_path / "o.png")
    assert main(["text2img", "--random-demo", "a cat", "-o", out, "--device", "nodevice"]) == 2
    assert "not a device name" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["text2img", "--random-demo", "a cat", "-o", out, "--device", "cuda"]) == 2
        assert "has no cuda device" in capsys.readouterr().err.lower()  # the library's check_device, once
    else:
        missing = f"cuda:{torch.cuda.device_count()}"
        assert main(["text2img", "--random-demo", "a cat", "-o", out, "--device", missing]) == 2
        assert "cuda device(s)" in capsys.readouterr().err.lower()
    assert cached_demo == []


# --------------------------------------------------------------------------- pictures read like the Python API
def test_pictures_read_like_the_python_api(cached_demo, demo, tmp_path):
    """An RGBA photo (variations: alpha composited onto white by CLIP preprocessing), a 16-bit
    depth PNG (not clipped at 255) and a photo with an EXIF rotation (shown upright)."""
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (48, 40, 4), dtype=np.uint8)
    rgba[:10, :, 3] = 0  # a transparent band storing random colours
    PIL.Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    no_prior = ["--width", "64", "--height", "64", "--steps", "2", "--no-progress", "--device", "cpu"]  # no prior
    assert main(["variations", "--random-demo", "--image", str(tmp_path / "rgba.png"), "-o", str(tmp_path / "v.png"),
                 *no_prior]) == 0
    pipe = Kandinsky.from_pretrained(demo["decoder"], prior=demo["prior"])
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
    depth_pipe = Kandinsky.from_pretrained(demo["controlnet-depth"], prior=demo["prior"])
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


def test_module_entry_point(tmp_path):
    """``python -m kandinsky.cli --help`` works too (no console script needed)."""
    result = subprocess.run([sys.executable, "-m", "kandinsky.cli", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "text2img" in result.stdout
