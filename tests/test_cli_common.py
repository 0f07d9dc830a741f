"""The shared path of the generation commands (kandinsky/cli/common.py, kandinsky/cli/generate.py) on the
tiny random demo (``--random-demo`` on the session's folders: the ``cli_demo`` fixture): work is
never lost (outputs checked before any weight loads, never overwritten unasked, rescued when the save
fails), flags that a command or a checkpoint cannot use are refused by name, warnings are plain lines,
and --lora / --tile / --offload change the picture only as they should."""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from kandinsky.cli import main
from kandinsky.pipelines.combined import Kandinsky

FAST = ["--steps", "2", "--prior-steps", "2", "--width", "64", "--height", "64", "--no-progress"]


# --------------------------------------------------------------------------- never lose work
def test_existing_output_is_not_overwritten(cli_demo, tmp_path, capsys):
    out = tmp_path / "o.png"
    out.write_bytes(b"my picture")
    assert main(["text2img", "--random-demo", "a", "-o", str(out), *FAST]) == 2
    assert out.read_bytes() == b"my picture"
    assert "--overwrite" in capsys.readouterr().err
    assert main(["text2img", "--random-demo", "a", "-o", str(out), "--overwrite", *FAST]) == 0
    assert PIL.Image.open(out).size == (64, 64)



def test_unwritable_outputs_fail_before_work(cli_demo, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(Kandinsky, "from_pretrained", lambda *a, **k: pytest.fail("weights were loaded"))
    assert main(["text2img", "--random-demo", "a", "-o", str(tmp_path / "file" / "o.png"), *FAST]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    (tmp_path / "dir.png").mkdir()
    assert main(["text2img", "--random-demo", "a", "-o", str(tmp_path / "dir.png"), *FAST]) == 2
    assert "is a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["text2img", "--random-demo", "a", "--seed", str(2**64), *FAST])
    assert e.value.code == 2 and "64-bit" in capsys.readouterr().err



def test_failed_save_rescues_the_images(cli_demo, tmp_path, capsys, monkeypatch):
    from kandinsky.cli import common

    target = tmp_path / "gone" / "o.png"
    monkeypatch.setattr(common, "check_outputs",
                        lambda paths, overwrite, image: (tmp_path / "gone").write_text("now a file"))
    assert main(["text2img", "--random-demo", "a", "-o", str(target), *FAST]) == 1
    err = capsys.readouterr().err
    assert "saved to" in err
    rescued = err.rsplit("saved to ", 1)[1].split(" instead")[0]
    assert PIL.Image.open(f"{rescued}/o.png").size == (64, 64)


# --------------------------------------------------------------------------- flags, checkpoints, warnings
def test_cli_flags_and_checkpoints(cli_demo, tmp_path, capsys):
    image = tmp_path / "i.png"
    PIL.Image.new("RGB", (64, 64), (200, 10, 10)).save(image)
    assert main(["variations", "--random-demo", "--image", str(image), "--negative-prompt", "x", "-o", str(tmp_path / "v.png"),
                 *FAST[:2], *FAST[4:]]) == 2
    assert "does not use --negative-prompt" in capsys.readouterr().err
    assert main(["inpaint", "a hat", "--image", str(image), "--mask", str(image), "--decoder", str(cli_demo["decoder"]),
                 "--prior", str(cli_demo["prior"]), "-o", str(tmp_path / "h.png"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "pass --decoder kandinsky-community/kandinsky-2-2-decoder-inpaint" in err



def test_cli_warnings_are_plain(cli_demo, tmp_path, capsys):
    assert main(["text2img", "--random-demo", "a " * 90, "-o", str(tmp_path / "o.png"), *FAST]) == 0
    err = capsys.readouterr().err
    assert "warning: " in err and "warnings.warn" not in err and ".py:" not in err


# --------------------------------------------------------------------------- --lora on every task
def test_cli_lora(cli_demo, tmp_path, capsys):
    """`--lora FILE[:SCALE]` applies an adapter to the decoder's UNet: scale 0 gives the plain picture,
    another scale changes it, two flags stack; a missing file stops before any work."""
    from kandinsky.lora import add_lora, save_lora
    from weights_convert import load_component

    unet = load_component(cli_demo["decoder"] / "unet")
    for p in add_lora(unet, rank=2):
        torch.nn.init.normal_(p, std=0.5)  # up is zero-initialised: give the adapter an effect
    save_lora(unet, tmp_path / "style")

    def run(*extra):
        out = tmp_path / f"o{len(list(tmp_path.glob('o*.png')))}.png"
        assert main(["text2img", "--random-demo", "a", "-o", str(out), *FAST, *extra]) == 0, capsys.readouterr().err
        return np.asarray(PIL.Image.open(out), dtype=int)

    plain = run()
    assert np.array_equal(run("--lora", f"{tmp_path / 'style'}:0"), plain)
    half = run("--lora", f"{tmp_path / 'style'}:0.5")
    assert np.abs(half - plain).max() > 2
    assert np.abs(run("--lora", f"{tmp_path / 'style'}:0.5", "--lora", f"{tmp_path / 'style'}:0.5") - half).max() > 2
    with pytest.raises(SystemExit) as e:
        main(["text2img", "--random-demo", "a", "-o", str(tmp_path / "x.png"), "--lora", str(tmp_path / "nope"), *FAST])
    assert e.value.code == 2 and "nope" in capsys.readouterr().err


# --------------------------------------------------------------------------- speed and memory flags
def test_cli_tile_offload_same_picture(cli_demo, tmp_path):
    """--tile on (tiny tiles), --offload model / sequential: the same picture as a plain run (the
    demo decodes 64 px, so one 64 px tile covers it: tiling is then exact)."""
    def run(name, *extra):
        out = tmp_path / f"{name}.png"
        assert main(["text2img", "--random-demo", "a", "-o", str(out), *FAST, *extra]) == 0
        return np.asarray(PIL.Image.open(out))

    plain = run("plain")
    assert np.array_equal(run("tile", "--tile", "64"), plain)
    assert np.array_equal(run("model", "--offload", "model", "--device", "cpu"), plain)
    assert np.array_equal(run("seq", "--offload", "sequential", "--device", "cpu"), plain)
    with pytest.raises(SystemExit):
        main(["text2img", "--random-demo", "a", "--tile", "big", *FAST])


def test_messages_say_the_true_thing(cli_demo, tmp_path, capsys):
    """--lora on a picture: not a weights file (nothing loaded, no torch advice to unpickle it); --lora
    FILE:1e9 out of range; --offload on a CPU said to do nothing; train-demo's --shape-weight default 6."""
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "cat.png")
    with pytest.raises(SystemExit) as e:
        main(["text2img", "--random-demo", "a", "-o", str(tmp_path / "x.png"), "--lora", str(tmp_path / "cat.png"),
              *FAST])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "cat.png: not a LoRA weights file" in err and "weights_only" not in err
    (tmp_path / "style.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(SystemExit):
        main(["text2img", "--random-demo", "a", "--lora", f"{tmp_path / 'style.safetensors'}:1e9", *FAST])
    assert "strength 1e+09 is out of range" in capsys.readouterr().err
    assert main(["text2img", "--random-demo", "a", "-o", str(tmp_path / "o.png"), "--offload", "model",
                 "--device", "cpu", *FAST]) == 0
    assert "warning: --offload model does nothing on cpu" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train-demo", "--help"])
    assert "(default 6, the shipped weights" in " ".join(capsys.readouterr().out.split())
