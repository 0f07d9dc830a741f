"""Outputs and paths at every door (issue 18 item 7; kandinsky/cli/common.py: check_outputs, check_folder,
save): an output under a folder this user cannot write in, or under a file, is refused with the path
before any weights load, by every command that writes; a missing folder is made; a picture that cannot
be written after all is rescued to a temporary folder and the run goes on; `--image` naming a folder says
what it takes; `eval shapes --save` joins its names with a separator."""
from __future__ import annotations

import os
from pathlib import Path

import PIL.Image
import pytest

from kandinsky.cli import main

SMALL = ["--steps", "2", "--prior-steps", "2", "--size", "64"]


@pytest.fixture
def locked(tmp_path, monkeypatch) -> Path:
    """A folder this process may not write in (os.access says no: the tests may run as root)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **k: Path(path) != folder and real(path, mode, **k))
    return folder


@pytest.fixture
def nothing_loads(monkeypatch):
    """Any weights loaded fail the test: the door must refuse before."""
    from kandinsky.pipelines.combined import Kandinsky
    from kandinsky.pipelines.decoder import DecoderPipeline
    from kandinsky.pipelines.prior import PriorPipeline

    for cls in (Kandinsky, PriorPipeline, DecoderPipeline):
        monkeypatch.setattr(cls, "from_pretrained", lambda *a, **k: pytest.fail("weights were loaded"))


def doors(demo, image, out: Path) -> dict[str, list]:
    """Each command that writes, with its output at ``out`` (a name without suffix)."""
    weights = ["--prior", demo["prior"], "--decoder", demo["decoder"]]
    return {
        "text2img": ["text2img", "a cat", "-o", f"{out}.png", *weights, *SMALL],
        "attention": ["attention", "a cat", "-o", f"{out}.png", *weights, *SMALL],
        "mix": ["mix", "a cat", "a dog", "--slerp", "0,1", "-o", f"{out}.png", *weights, *SMALL],
        "routes": ["routes", "a cat", "a dog", "-o", f"{out}.png", "--windows", "1", *weights, *SMALL],
        "score": ["score", image, "a cat", "--json", f"{out}.json", "--prior", demo["prior"]],
        "eval": ["eval", "shapes", "--save", out, *weights, "--n", "2"],
        "batch": ["batch", image.with_suffix(".txt"), "--out", out, *weights, *SMALL],
    }


@pytest.fixture
def inputs(tmp_path) -> Path:
    image = tmp_path / "image.png"
    PIL.Image.new("RGB", (64, 64), (200, 20, 20)).save(image)
    image.with_suffix(".txt").write_text("a red circle\n")
    return image


@pytest.mark.parametrize("door", ["text2img", "attention", "mix", "routes", "score", "eval", "batch"])
def test_an_unwritable_folder_is_refused_before_any_work(door, random_demo, inputs, locked, nothing_loads,
                                                         capsys):
    assert main(doors(random_demo, inputs, locked / "sub" / "out")[door]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"no permission to write in {str(locked)!r}" in err, err
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("door", ["text2img", "attention", "mix", "routes", "score", "eval", "batch"])
def test_an_output_under_a_file_is_refused_before_any_work(door, random_demo, inputs, tmp_path, nothing_loads,
                                                           capsys):
    (tmp_path / "file").write_text("mine")
    assert main(doors(random_demo, inputs, tmp_path / "file" / "out")[door]) == 2
    err = capsys.readouterr().err
    assert f"{str(tmp_path / 'file')!r} is a file, not a folder" in err, err
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("argv", [["train", "prior", "--data", "{data}", "--checkpoint", "{prior}", "--out"],
                                  ["train-demo", "--steps", "1", "--out"]], ids=["train", "train-demo"])
def test_training_out_is_checked_before_any_work(argv, random_demo, tmp_path, locked, monkeypatch, capsys):
    import kandinsky.data.train_demo as train_demo
    import kandinsky.training.loop as loop

    monkeypatch.setattr(loop, "train", lambda *a, **k: pytest.fail("training started"))
    monkeypatch.setattr(train_demo, "run", lambda *a, **k: pytest.fail("training started"))
    argv = [str(a).format(data=tmp_path, prior=random_demo["prior"]) for a in argv]
    assert main(argv + [locked / "run"]) == 2
    assert f"--out {locked / 'run'}: no permission to write in {str(locked)!r}" in capsys.readouterr().err
    (tmp_path / "file").write_text("mine")
    assert main(argv + [tmp_path / "file" / "run"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_batch_out_that_is_a_file(random_demo, inputs, tmp_path, nothing_loads, capsys):
    (tmp_path / "out").write_text("mine")
    assert main(doors(random_demo, inputs, tmp_path / "out")["batch"]) == 2
    assert f"--out {tmp_path / 'out'}: {str(tmp_path / 'out')!r} is a file, not a folder" in capsys.readouterr().err


def test_attention_makes_a_missing_folder(random_demo, inputs, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "attn"
    assert main(doors(random_demo, inputs, out)["attention"]) == 0
    for suffix in ("", "-words", "-image", "-x0"):
        assert PIL.Image.open(out.parent / f"attn{suffix}.png").size[0] > 0


@pytest.mark.parametrize("flag", ["--image", "--mask"])
def test_a_folder_given_for_a_picture_says_what_is_expected(flag, cli_demo_seeds, cli_pictures, tmp_path, capsys):
    argv = ["inpaint", "--random-demo", "a hat", "--image", cli_pictures / "image.png", "--mask",
            cli_pictures / "mask.png", "-o", tmp_path / "o.png", *SMALL]
    argv[argv.index(flag) + 1] = tmp_path
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {flag}: {str(tmp_path)!r} is a folder, not an image file; {flag} takes one picture file" in err
    assert "no such image file" not in err and cli_demo_seeds == []  # nothing built


@pytest.mark.parametrize("save, names", [
    ("runs/g", ["runs/g-text2img.png", "runs/g-variations.png", "runs/g-inpaint.png"]),
    ("runs/g-", ["runs/g-text2img.png", "runs/g-variations.png", "runs/g-inpaint.png"]),
    ("runs/", ["runs/text2img.png", "runs/variations.png", "runs/inpaint.png"]),
])
def test_eval_save_names(save, names):
    from kandinsky.cli.eval import grid_paths

    assert [str(p) for p in grid_paths(save).values()] == [str(Path(n)) for n in names]


def test_eval_save_makes_the_folder_and_never_loses_the_run(tmp_path, monkeypatch, capsys):
    """`eval shapes --demo --save DIR/new/g`: the folder is made, the grids are DIR/new/g-<section>.png;
    a grid that cannot be written (here: variations) is rescued to a temporary folder, and the sections
    after it still run (exit status 1: something was saved elsewhere)."""
    import kandinsky.data.evaluate as ev

    real = ev.save_grid

    def save_grid(pictures, path, *a, **k):
        if Path(path).name == "g-variations.png" and Path(path).parent == tmp_path / "new":
            raise OSError(28, "No space left on device")
        return real(pictures, path, *a, **k)

    monkeypatch.setattr(ev, "save_grid", save_grid)
    argv = ["eval", "shapes", "--demo", "--n", "2", "--steps", "4", "--prior-steps", "2", "--batch", "2",
            "--save", tmp_path / "new" / "g"]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert "inpaint (2 cases)" in out  # the last section ran
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["g-inpaint.png", "g-text2img.png"]
    assert "warning: could not write" in err and "No space left on device" in err
    rescued = Path(err.split("the images were saved to ", 1)[1].split(" instead")[0])
    assert PIL.Image.open(rescued / "g-variations.png").size == PIL.Image.open(tmp_path / "new" / "g-text2img.png").size
