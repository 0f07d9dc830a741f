"""The ``kandinsky`` command line's shared path (kandinsky/cli/__init__.py, common.py, kandinsky/exits.py):
the one command table (``kandinsky --help``, every ``COMMAND --help``, docs/usage.md's list), errors
(``error:`` and status 2 for every expected class; a bug keeps its traceback), Ctrl-C (status 130, one
line saying what was kept, temporary folders removed), warnings, --overwrite on every task, inputs and
devices refused before any work, and the entry points. Each command family: tests/test_cli_generate.py,
test_cli_research.py, test_cli_train.py, test_batch.py; output checks and flags on pictures:
test_cli_common.py. ``--random-demo`` runs on the session's checkpoints (conftest ``cli_demo_seeds``)."""
from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import PIL.Image
import pytest
import torch

import kandinsky.demo
from kandinsky.cli import main
from kandinsky.pipelines.combined import Kandinsky
from tests.test_cli_generate import FAST, NO_PRIOR, TASKS


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


def test_ctrl_c_exits_130_and_cleans_up(cli_demo_seeds, tmp_path, monkeypatch, capsys):
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
    line = "interrupted: kandinsky inspect stopped by Ctrl-C; kept 3 of 5 pictures in out/\n"
    assert capsys.readouterr().err == line


def test_warnings_print_as_one_plain_line(monkeypatch, capsys):
    import warnings

    def run(args):
        warnings.warn("the prompt is longer than CLIP's 75 tokens")
        return 0

    _replace_run(monkeypatch, "inspect", run)
    assert main(["inspect", "unet"]) == 0
    assert capsys.readouterr().err == "warning: the prompt is longer than CLIP's 75 tokens\n"


@pytest.mark.parametrize("task", ["text2img", *TASKS])
def test_every_task_refuses_to_overwrite(task, cli_demo_seeds, cli_pictures, tmp_path, capsys):
    """An existing -o is refused before anything is built; --overwrite replaces it."""
    args = [a.format(image=cli_pictures / "image.png", mask=cli_pictures / "mask.png", hint=cli_pictures / "hint.png")
            for a in TASKS.get(task, ["a red cat"])]
    out = tmp_path / "mine.png"
    out.write_bytes(b"my picture")
    fast = NO_PRIOR if task == "variations" else FAST
    assert main([task, "--random-demo", "-o", str(out), *fast, *args]) == 2
    assert f"{str(out)!r} exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert out.read_bytes() == b"my picture" and cli_demo_seeds == []
    assert main([task, "--random-demo", "-o", str(out), "--overwrite", *fast, *args]) == 0
    assert PIL.Image.open(out).format == "PNG"


def test_missing_image_file(cli_demo_seeds, tmp_path, capsys):
    missing = tmp_path / "nope.png"
    out = str(tmp_path / "o.png")
    assert main(["img2img", "--random-demo", "a cat", "--image", str(missing), "-o", out, *FAST]) == 2
    assert f"no such image file: '{missing}'" in capsys.readouterr().err
    assert cli_demo_seeds == []  # failed before building anything
    # an --mix item that names a missing image file is an error, not a prompt
    assert main(["interpolate", "--random-demo", "--mix", "cat", "1", "--mix", str(missing), "1", *FAST]) == 2
    assert "no such image file" in capsys.readouterr().err
    # a folder is not an image file, and says so
    assert main(["img2img", "--random-demo", "a cat", "--image", str(tmp_path), "-o", out, *FAST]) == 2
    assert f"{str(tmp_path)!r} is a folder, not an image file" in capsys.readouterr().err


def test_bad_output_name_and_arguments(tmp_path, capsys):
    assert main(["text2img", "a cat", "-o", str(tmp_path / "out"), *FAST]) == 2
    assert "output" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: a required option is missing
        main(["img2img", "a cat"])
    assert e.value.code == 2
    assert "--image" in capsys.readouterr().err


def test_hub_id_offline(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["text2img", "a cat", "--prior", "kandinsky-community/no-such-prior",
                 "--decoder", "kandinsky-community/no-such-decoder", "-o", str(tmp_path / "o.png"), *FAST])
    assert code == 2
    err = capsys.readouterr().err
    assert "is not in the Hugging Face" in err and "hf download" in err
    assert not (tmp_path / "o.png").exists()


def test_bad_devices_refused_before_building(cli_demo_seeds, tmp_path, capsys):
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
    assert cli_demo_seeds == []


def test_console_script_help():
    exe = shutil.which("kandinsky")
    if exe is None:
        pytest.skip("the `kandinsky` console script is not installed (pip install -e .)")
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for task in ("text2img", "img2img", "inpaint", "variations", "interpolate", "controlnet"):
        assert task in result.stdout


def test_module_entry_point(tmp_path):
    """``python -m kandinsky.cli --help`` works too (no console script needed)."""
    result = subprocess.run([sys.executable, "-m", "kandinsky.cli", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "text2img" in result.stdout


def test_a_real_sigint_in_a_fresh_process(tmp_path):
    """Ctrl-C as the terminal sends it (SIGINT to a running `python -m kandinsky.cli`): status 130, the one
    `interrupted:` line, no traceback, no picture."""
    import os
    import signal

    out = tmp_path / "o.png"
    child = subprocess.Popen(
        [sys.executable, "-m", "kandinsky.cli", "text2img", "--random-demo", "a red cat", "-o", str(out),
         "--steps", "100000", "--width", "64", "--height", "64", "--no-progress", "--device", "cpu"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's foreground job
    try:
        assert child.stderr.readline().startswith("DEMO:")  # running: the demo checkpoints are being built
        child.send_signal(signal.SIGINT)
        err = child.stderr.read()
        assert child.wait(timeout=120) == 130
    finally:
        child.kill()
    assert err == "interrupted: kandinsky text2img stopped by Ctrl-C; kept nothing written\n"
    assert not out.exists()
