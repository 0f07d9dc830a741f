"""``kandinsky train-demo`` and ``kandinsky eval`` (kandinsky/cli/train.py, kandinsky/cli/eval.py): the
command-line checks, before any training or loading. The runs themselves: tests/test_demo_model.py
(train-demo) and tests/test_training_loop.py (train)."""
from __future__ import annotations

from kandinsky.cli import main


def test_train_demo_bad_arguments(tmp_path, capsys):
    assert main(["train-demo", "--out", tmp_path, "--minutes", "0"]) == 2
    assert "error: --minutes" in capsys.readouterr().err
    # a stage whose inputs are not trained: the library's FileNotFoundError, as an `error:` line
    assert main(["train-demo", "--out", tmp_path, "--stages", "prior", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "add them to --stages" in err and "Traceback" not in err


def test_eval_cli_needs_checkpoints(capsys):
    assert main(["eval", "shapes"]) == 2
    assert "--prior and --decoder" in capsys.readouterr().err


def test_eval_refuses_to_overwrite_its_grids(tmp_path, capsys):
    (tmp_path / "run-text2img.png").write_bytes(b"my grid")
    argv = ["eval", "shapes", "--prior", "p", "--decoder", "d", "--save", f"{tmp_path}/run-"]
    assert main(argv) == 2  # refused before loading anything (the folders p and d do not exist)
    err = capsys.readouterr().err
    assert "run-text2img.png' exists; pass --overwrite" in err
    assert (tmp_path / "run-text2img.png").read_bytes() == b"my grid"
    assert main(argv + ["--overwrite"]) == 2  # now it gets as far as loading: the checkpoint is missing
    assert "exists" not in capsys.readouterr().err


def test_train_demo_refuses_to_overwrite_an_earlier_run(tmp_path, capsys):
    (tmp_path / "decoder").mkdir()
    (tmp_path / "decoder" / "model_index.json").write_text("{}")  # an earlier run's hub folder
    assert main(["train-demo", "--out", tmp_path, "--write-only"]) == 2
    err = capsys.readouterr().err
    assert "decoder exists" in err and "pass --overwrite" in err and "--resume" in err
    assert (tmp_path / "decoder" / "model_index.json").read_text() == "{}"
    # --overwrite lets it run (nothing is trained here, so there is nothing to write yet)
    assert main(["train-demo", "--out", tmp_path, "--write-only", "--overwrite"]) == 0
    assert "not writing the repos" in capsys.readouterr().out


def test_train_demo_ctrl_c_saves_the_stage(tmp_path, monkeypatch, capsys):
    """Ctrl-C in a stage: its checkpoint at the step reached (unfinished: --resume continues it), exit 130."""
    import torch

    import kandinsky.data.train_demo as train_demo

    real, calls = train_demo.optimizer_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_demo, "optimizer_step", step)
    assert main(["train-demo", "--out", tmp_path, "--stages", "clip", "--steps", "10"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "interrupted: " in err and "--resume continues" in err
    saved = torch.load(tmp_path / "stages" / "clip.pt", weights_only=True)
    assert saved["done"] is False and set(saved["state"]) == {"text_encoder", "image_encoder"}
