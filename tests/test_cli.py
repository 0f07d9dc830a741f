"""The ``kandinsky`` command line (kandinsky/cli/): the command table and the shared path (errors and exit
codes, Ctrl-C, warnings, --overwrite for every task), and the generation tasks run in-process on the
--demo checkpoints. Other families: tests/test_cli_research.py, tests/test_cli_train.py, tests/test_batch.py;
the shared path's output checks and flags on pictures: tests/test_cli_common.py.

The demo's random-weight checkpoints take a few seconds to build; apart from one test that
runs the real ``--demo`` path end to end, ``cached_demo`` builds them once per seed (with the
same ``kandinsky.demo.build_demo_checkpoints``) and hands the CLI those folders.
"""
from __future__ import annotations

import pathlib
import shutil
import subprocess

import numpy as np
import PIL.Image
import pytest
import torch

import kandinsky.demo
from kandinsky.cli import main
from kandinsky.pipelines.combined import Kandinsky

BUILD_DEMO = kandinsky.demo.build_demo_checkpoints  # the real builder (cached_demo patches the module's)
FAST = ["--width", "64", "--height", "64", "--steps", "2", "--prior-steps", "2", "--no-progress", "--device", "cpu"]
NO_PRIOR = ["--width", "64", "--height", "64", "--steps", "2", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def demo_folders(tmp_path_factory):
    """seed -> the folders build_demo_checkpoints(root, seed) wrote (built once per seed)."""
    built = {}

    def get(seed: int = 0):
        if seed not in built:
            built[seed] = BUILD_DEMO(tmp_path_factory.mktemp(f"demo-{seed}"), seed=seed)
        return built[seed]

    return get


@pytest.fixture
def cached_demo(monkeypatch, demo_folders):
    """Make ``--demo`` reuse the module's checkpoints; returns the list of seeds it was asked for."""
    calls = []

    def build(root, seed=0):
        calls.append(seed)
        return demo_folders(seed)

    monkeypatch.setattr(kandinsky.demo, "build_demo_checkpoints", build)
    return calls


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """image.png (RGB), mask.png (white block = repaint), hint.png (grey depth ramp), 64 x 64."""
    folder = tmp_path_factory.mktemp("cli-inputs")
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "image.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:40, 8:48] = 255
    PIL.Image.fromarray(mask, mode="L").save(folder / "mask.png")
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))
    PIL.Image.fromarray(ramp, mode="L").save(folder / "hint.png")
    return folder


def pixels(path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path))


# --------------------------------------------------------------------------- runs
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


TASKS = {
    "img2img": ["a red cat", "--image", "{image}", "--strength", "0.5", "--width", "128"],  # non-square
    "inpaint": ["a hat", "--image", "{image}", "--mask", "{mask}"],
    "variations": ["--image", "{image}"],
    "interpolate": ["--mix", "a red cat", "0.4", "--mix", "{image}", "0.6", "--negative", "blurry"],
    "controlnet": ["a robot", "--hint", "{hint}", "--negative", "a cat"],
    "controlnet_img2img": ["a robot", "--image", "{image}", "--hint", "{hint}", "--strength", "0.6"],
    "emb2emb": ["a red cat", "--image", "{image}", "--prior-strength", "0.5"],
}


def test_every_task_is_tested():
    from kandinsky.pipelines.tasks import PROMPT_TASKS

    assert set(PROMPT_TASKS) == set(TASKS) | {"text2img"}


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_with_demo(task, cached_demo, inputs, tmp_path, capsys):
    args = [a.format(image=inputs / "image.png", mask=inputs / "mask.png", hint=inputs / "hint.png")
            for a in TASKS[task]]
    out = tmp_path / f"{task}.png"
    fast = NO_PRIOR if task == "variations" else FAST  # variations runs no prior: its flags are refused
    assert main([task, "--random-demo", "-o", str(out), *fast, *args]) == 0
    assert cached_demo == [0]
    width = 128 if task == "img2img" else 64
    assert PIL.Image.open(out).size == (width, 64)
    err = capsys.readouterr().err
    assert "it/s" not in err and "s/it" not in err  # --no-progress silences the prior's bars too


def test_num_images(cached_demo, tmp_path):
    out = tmp_path / "out.png"
    assert main(["text2img", "--random-demo", "a red cat", "-o", str(out), "--num-images", "2", *FAST]) == 0
    assert not out.exists()
    first, second = pixels(tmp_path / "out-0.png"), pixels(tmp_path / "out-1.png")
    assert first.shape == second.shape == (64, 64, 3)
    assert not np.array_equal(first, second)


def test_seed_determinism(cached_demo, tmp_path):
    def run(seed: int, name: str) -> np.ndarray:
        out = tmp_path / name
        assert main(["text2img", "--random-demo", "a red cat", "-o", str(out), "--seed", str(seed), *FAST]) == 0
        return pixels(out)

    a, b, c = run(0, "a.png"), run(0, "b.png"), run(1, "c.png")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert cached_demo == [0, 0, 1]


def test_cli_equals_python_api(cached_demo, demo_folders, tmp_path):
    """The CLI's flags map onto Kandinsky's arguments: same seed, same pixels."""
    out = tmp_path / "out.png"
    flags = ["--negative", "blurry", "--guidance", "3", "--prior-guidance", "2", "--num-images", "2"]
    assert main(["text2img", "--random-demo", "a red cat", "-o", str(out), "--seed", "0", *FAST, *flags]) == 0

    pipe = Kandinsky.from_pretrained(demo_folders(0)["decoder"])  # the prior: from the demo's model card
    images = pipe.text2img(
        "a red cat", negative_prompt="blurry", guidance_scale=3.0, prior_guidance_scale=2.0, num_images_per_prompt=2,
        height=64, width=64, num_inference_steps=2, prior_num_inference_steps=2,
        generator=torch.Generator().manual_seed(0), progress=False,
    ).images
    for i, image in enumerate(images):
        assert np.array_equal(pixels(tmp_path / f"out-{i}.png"), np.asarray(image))


# --------------------------------------------------------------------------- errors
def test_missing_image_file(cached_demo, tmp_path, capsys):
    missing = tmp_path / "nope.png"
    out = str(tmp_path / "o.png")
    assert main(["img2img", "--random-demo", "a cat", "--image", str(missing), "-o", out, *FAST]) == 2
    assert f"no such image file: '{missing}'" in capsys.readouterr().err
    assert cached_demo == []  # failed before building anything
    # an --mix item that names a missing image file is an error, not a prompt
    assert main(["interpolate", "--random-demo", "--mix", "cat", "1", "--mix", str(missing), "1", *FAST]) == 2
    assert "no such image file" in capsys.readouterr().err
    # a folder is not an image file, and says so
    assert main(["img2img", "--random-demo", "a cat", "--image", str(tmp_path), "-o", out, *FAST]) == 2
    assert f"{str(tmp_path)!r} is a folder, not an image file" in capsys.readouterr().err


def test_hub_id_offline(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["text2img", "a cat", "--prior", "kandinsky-community/no-such-prior",
                 "--decoder", "kandinsky-community/no-such-decoder", "-o", str(tmp_path / "o.png"), *FAST])
    assert code == 2
    err = capsys.readouterr().err
    assert "is not in the Hugging Face" in err and "hf download" in err
    assert not (tmp_path / "o.png").exists()


def test_inpaint_on_a_decoder_that_cannot(cached_demo, demo_folders, inputs, tmp_path, capsys):
    decoder = demo_folders(0)["decoder"]
    code = main(["inpaint", "--random-demo", "a hat", "--image", str(inputs / "image.png"), "--mask",
                 str(inputs / "mask.png"), "--decoder", str(decoder), "-o", str(tmp_path / "o.png"), *FAST])
    assert code == 2
    assert "pass --decoder kandinsky-community/kandinsky-2-2-decoder-inpaint" in capsys.readouterr().err


def test_bad_output_name_and_arguments(tmp_path, capsys):
    assert main(["text2img", "a cat", "-o", str(tmp_path / "out"), *FAST]) == 2
    assert "output" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: a required option is missing
        main(["img2img", "a cat"])
    assert e.value.code == 2
    assert "--image" in capsys.readouterr().err


def test_console_script_help():
    exe = shutil.which("kandinsky")
    if exe is None:
        pytest.skip("the `kandinsky` console script is not installed (pip install -e .)")
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for task in ("text2img", "img2img", "inpaint", "variations", "interpolate", "controlnet"):
        assert task in result.stdout


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


# --------------------------------------------------------------------------- the command table
def test_the_table_drives_help_and_docs(capsys):
    """Every command of kandinsky.cli.COMMANDS is a subcommand, listed by `kandinsky --help` with its help
    line, and docs/usage.md carries the table as command_table() writes it."""
    import kandinsky.cli as cli

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for command in cli.COMMANDS.values():
        assert f"{command.name} {command.help}" in text
        with pytest.raises(SystemExit) as e:
            main([command.name, "--help"])
        assert e.value.code == 0 and f"kandinsky {command.name}" in capsys.readouterr().out
    from kandinsky.pipelines.tasks import PROMPT_TASKS

    assert set(PROMPT_TASKS) | {"train", "train-demo", "eval", "batch", "inspect", "attention", "score",
                                "mix"} <= set(cli.COMMANDS)  # (and any command added to the table)
    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "usage.md").read_text()
    listed = doc.split("<!-- kandinsky.cli.command_table() -->\n", 1)[1].split("\n\n", 1)[0]
    assert listed == cli.command_table()


# --------------------------------------------------------------------------- errors, Ctrl-C, warnings
def _replace_run(monkeypatch, name, run):
    import dataclasses

    import kandinsky.cli as cli

    monkeypatch.setitem(cli.COMMANDS, name, dataclasses.replace(cli.COMMANDS[name], run=run))


def _expected_errors():
    from kandinsky.batch import InputError as BatchInputError
    from kandinsky.cli.common import InputError
    from kandinsky.config import ConfigError
    from kandinsky.hub import CheckpointNotFound
    from kandinsky.lora import LoRAError
    from kandinsky.training.config import TrainError
    from kandinsky.training.data import DataError
    from weights_convert.io import WeightsError

    return [ConfigError, WeightsError, TrainError, DataError, LoRAError, InputError, BatchInputError,
            CheckpointNotFound, ValueError, TypeError, OSError, FileNotFoundError, RuntimeError, FloatingPointError]


@pytest.mark.parametrize("error", _expected_errors(), ids=lambda e: e.__name__)
def test_expected_errors_are_one_line_and_status_2(error, monkeypatch, capsys):
    def fail(args):
        raise error("the checkpoint folder x has no unet/; pass the decoder folder")

    _replace_run(monkeypatch, "inspect", fail)
    assert main(["inspect", "unet"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: the checkpoint folder x has no unet/; pass the decoder folder\n"
    assert captured.out == ""


def test_a_bug_still_shows_its_traceback(monkeypatch):
    """Only the expected error classes become `error:` lines; a KeyError is a bug, and raises."""
    def fail(args):
        raise KeyError("bug")

    _replace_run(monkeypatch, "inspect", fail)
    with pytest.raises(KeyError):
        main(["inspect", "unet"])


def test_ctrl_c_exits_130_and_cleans_up(cached_demo, tmp_path, monkeypatch, capsys):
    """KeyboardInterrupt in the middle of a picture: one line, status 130, no picture, and the
    --random-demo temporary folder removed."""
    folders = []
    real = kandinsky.demo.demo_checkpoints

    def recorded(*args, **kwargs):
        out = real(*args, **kwargs)
        folders.append(out[1])
        return out

    def interrupted(self, task, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(kandinsky.demo, "demo_checkpoints", recorded)
    monkeypatch.setattr(Kandinsky, "run", interrupted)
    out = tmp_path / "o.png"
    assert main(["text2img", "--random-demo", "a red cat", "-o", str(out), *FAST]) == 130
    err = capsys.readouterr().err
    assert err.endswith("interrupted: kandinsky text2img stopped by Ctrl-C; kept nothing written\n")
    assert "Traceback" not in err and not out.exists()
    assert len(folders) == 1 and not pathlib.Path(folders[0].name).exists()


def test_ctrl_c_says_what_the_command_kept(monkeypatch, capsys):
    from kandinsky.cli import common

    def run(args):
        common.on_interrupt(lambda: "3 of 5 pictures in out/")
        raise KeyboardInterrupt

    _replace_run(monkeypatch, "inspect", run)
    assert main(["inspect", "unet"]) == 130
    assert capsys.readouterr().err == "interrupted: kandinsky inspect stopped by Ctrl-C; kept 3 of 5 pictures in out/\n"


def test_warnings_print_as_one_plain_line(monkeypatch, capsys):
    import warnings

    def run(args):
        warnings.warn("the prompt is longer than CLIP's 75 tokens")
        return 0

    _replace_run(monkeypatch, "inspect", run)
    assert main(["inspect", "unet"]) == 0
    assert capsys.readouterr().err == "warning: the prompt is longer than CLIP's 75 tokens\n"


# --------------------------------------------------------------------------- --overwrite, every task
@pytest.mark.parametrize("task", ["text2img", *TASKS])
def test_every_task_refuses_to_overwrite(task, cached_demo, inputs, tmp_path, capsys):
    """An existing -o is refused before anything is built; --overwrite replaces it."""
    args = [a.format(image=inputs / "image.png", mask=inputs / "mask.png", hint=inputs / "hint.png")
            for a in TASKS.get(task, ["a red cat"])]
    out = tmp_path / "mine.png"
    out.write_bytes(b"my picture")
    fast = NO_PRIOR if task == "variations" else FAST
    assert main([task, "--random-demo", "-o", str(out), *fast, *args]) == 2
    assert f"{str(out)!r} exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert out.read_bytes() == b"my picture" and cached_demo == []
    assert main([task, "--random-demo", "-o", str(out), "--overwrite", *fast, *args]) == 0
    assert PIL.Image.open(out).format == "PNG"
