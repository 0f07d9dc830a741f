"""The training loop through ``kandinsky train`` on the tiny demo checkpoints:

* a tiny prior and a tiny decoder overfit a fixed batch (the loss falls at least 10x), and write
  the log (CSV + PNG curve), a checkpoint, validation pictures and the trained component;
* resuming continues exactly: the steps after the checkpoint have the uninterrupted run's losses
  and end at its weights;
* 2 gloo processes under torchrun follow 1 process with the same global batch;
* gradient accumulation and gradient checkpointing change no number; EMA and bf16 run;
* bad settings and folders fail with ``error: ...`` (exit status 2) before anything is written;
* no lost work: Ctrl-C keeps a checkpoint, a failed start leaves a folder the rerun accepts, a damaged
  checkpoint falls back to the one before, --overwrite removes an earlier run only once every check passed.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from kandinsky.cli import main as kandinsky_main
from weights_convert import load_component, save_component


def main(argv) -> int:
    """``kandinsky train ARGV`` in this process."""
    return kandinsky_main(["train", *argv])


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, random_demo):
    """The session's random demo checkpoints, copied; "prior" gets clip_mean 0 / clip_std 1 (the demo's
    random statistics are ~0.05, which would scale the normalised targets by ~20)."""
    root = tmp_path_factory.mktemp("train_demo")
    folders = {name: shutil.copytree(folder, root / name) for name, folder in random_demo.items()}
    prior = load_component(folders["prior"] / "prior")
    with torch.no_grad():
        prior.clip_mean.zero_()
        prior.clip_std.fill_(1.0)
    shutil.rmtree(folders["prior"] / "prior")
    save_component(prior, folders["prior"] / "prior")
    return folders


def write_data(folder: Path, n: int = 4, size: int = 64, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(n):
            PIL.Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"picture number {i}"}) + "\n")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("train_data") / "pics")


def losses(out: Path) -> list[float]:
    with open(out / "log.csv", newline="") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def prior_args(demo, data, out, *extra):
    return ["prior", "--data", str(data), "--out", str(out), "--checkpoint", str(demo["prior"]),
            "--batch", "4", "--lr", "3e-3", "--device", "cpu", *map(str, extra)]


def decoder_args(demo, data, out, *extra):
    return ["decoder", "--data", str(data), "--out", str(out), "--checkpoint", str(demo["decoder"]),
            "--prior", str(demo["prior"]), "--batch", "4", "--lr", "3e-3", "--resolution", "64",
            "--device", "cpu", *map(str, extra)]


def state(folder: Path) -> dict:
    return {k: v.clone() for k, v in load_component(folder).state_dict().items()}


def test_prior_overfits_a_fixed_batch(demo, data, tmp_path):
    out = tmp_path / "run"
    assert main(prior_args(demo, data, out, "--steps", 25, "--log-every", 25)) == 0
    curve = losses(out)
    assert len(curve) == 25
    assert curve[-1] < curve[0] / 10, curve
    trained, base = state(out / "prior"), state(demo["prior"] / "prior")
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    assert torch.equal(trained["clip_std"], base["clip_std"])  # statistics, not learned
    with PIL.Image.open(out / "loss.png") as png:
        assert png.size == (640, 400)
    assert json.loads((out / "train_config.json").read_text())["steps"] == 25
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000025.pt"]


def test_decoder_overfits_a_fixed_batch_and_draws_validation_pictures(demo, data, tmp_path):
    out = tmp_path / "run"
    assert main(decoder_args(demo, data, out, "--steps", 60, "--log-every", 60, "--validate-every", 60,
                             "--validation-steps", 2, "--validation-prompts", "a cat", "a dog")) == 0
    curve = losses(out)
    assert np.mean(curve[-3:]) < curve[0] / 10, curve
    pictures = sorted((out / "validation" / "step-000060").glob("*.png"))
    assert len(pictures) == 2
    with PIL.Image.open(pictures[0]) as image:
        assert image.size == (64, 64)
    assert (out / "validation" / "step-000060" / "prompts.txt").read_text().split("\n")[:2] == ["a cat", "a dog"]
    assert load_component(out / "unet").config.in_channels == 4


def test_resume_continues_exactly(demo, data, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(prior_args(demo, data, whole, "--steps", 6)) == 0
    assert main(prior_args(demo, data, parts, "--steps", 3, "--cache")) == 0  # stops after step 3 (a checkpoint)
    (cache,) = (parts / "cache").glob("encodings-*.pt")
    with open(parts / "log.csv", "a") as f:  # a step logged after the checkpoint by a run that then died
        f.write("4,123.0,0.003,1.0,1.0\n")
    stamp = cache.stat().st_mtime_ns
    assert main(prior_args(demo, data, parts, "--steps", 6, "--resume", "--cache")) == 0
    assert cache.stat().st_mtime_ns == stamp  # the encodings were read back, not recomputed
    assert losses(parts) == losses(whole)  # the next step's loss and every one after: the same numbers
    a, b = state(whole / "prior"), state(parts / "prior")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_follow_one(demo, data, tmp_path):
    """torchrun --nproc_per_node 2 (gloo), global batch 4 = 2 x 2, vs 1 process with batch 4."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(prior_args(demo, data, one, "--steps", 3, "--lr", "1e-3")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "kandinsky.cli", "train", *prior_args(demo, data, two, "--steps", 3, "--lr", "1e-3")]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert np.allclose(losses(one), losses(two), rtol=1e-6)
    a, b, base = state(one / "prior"), state(two / "prior"), state(demo["prior"] / "prior")
    moved = max((a[k] - base[k]).abs().max().item() for k in a)
    # The gradients agree to float rounding; Adam divides by sqrt(v), so where the exact gradient
    # is 0 (attention key biases: softmax ignores a per-query constant) rounding noise moves the
    # two runs apart by a fraction of one step. Everything stays within 1% of how far they moved.
    for k in a:
        assert (a[k] - b[k]).abs().max().item() < 0.01 * moved, k
    assert not (two / "checkpoints" / "step-000003.pt.tmp").exists()
    assert len(list((two / "checkpoints").iterdir())) == 1  # written once


def test_grad_accum_and_checkpointing_change_nothing(demo, data, tmp_path):
    runs = {"plain": [], "accum": ["--grad-accum", 2], "ckpt": ["--gradient-checkpointing"]}
    for name, extra in runs.items():
        assert main(prior_args(demo, data, tmp_path / name, "--steps", 2, *extra)) == 0
    plain = state(tmp_path / "plain" / "prior")
    for name in ("accum", "ckpt"):
        other = state(tmp_path / name / "prior")
        assert np.allclose(losses(tmp_path / name), losses(tmp_path / "plain"), rtol=1e-5), name
        assert max((plain[k] - other[k]).abs().max().item() for k in plain) < 1e-4, name


def test_ema_and_bf16(demo, data, tmp_path):
    """EMA with decay 0.5 over two steps from w0: 0.25 w0 + 0.25 w1 + 0.5 w2 (w1 from the step-1
    checkpoint, w2 the raw final weights); bf16 autocast trains too."""
    out = tmp_path / "ema"
    assert main(prior_args(demo, data, out, "--steps", 2, "--ema-decay", 0.5, "--bf16", "--save-every", 1,
                           "--keep-checkpoints", 5)) == 0
    w0, w2, ema = state(demo["prior"] / "prior"), state(out / "prior-no-ema"), state(out / "prior")
    w1 = torch.load(out / "checkpoints" / "step-000001.pt", weights_only=False)["params"]
    for k in ("proj_out.weight", "blocks.0.attn.q.weight"):
        assert not torch.equal(w2[k], w0[k])
        assert torch.allclose(ema[k], 0.25 * w0[k] + 0.25 * w1[k] + 0.5 * w2[k], atol=1e-6), k
    assert torch.equal(ema["clip_mean"], w0["clip_mean"])
    assert all(np.isfinite(losses(out)))


def test_learning_rate_warms_up_then_stays(demo, data, tmp_path):
    """kandinsky.training.optim.lr_at(step + 1, --lr, --warmup-steps): 3e-3 * 1/2, then 3e-3 (log.csv's lr)."""
    out = tmp_path / "warmup"
    assert main(prior_args(demo, data, out, "--steps", 3, "--warmup-steps", 2)) == 0
    with open(out / "log.csv", newline="") as f:
        assert [float(row["lr"]) for row in csv.DictReader(f)] == [1.5e-3, 3e-3, 3e-3]


def test_kandinsky_train_dispatches_here(capsys):
    with pytest.raises(SystemExit) as e:
        kandinsky_main(["train", "--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    assert "prior,decoder,inpaint" in help_text and "--grad-accum" in help_text and "--lora" in help_text


def test_bad_settings_and_folders_fail_clearly(demo, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(prior_args(demo, data, out, "--steps", 1, "--batch", 3, "--grad-accum", 2)) == 2
    assert "--batch 3 must be a multiple of --grad-accum" in capsys.readouterr().err
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert main(prior_args(demo, data, out, "--steps", 1)) == 2
    assert "is not empty" in capsys.readouterr().err and (out / "mine.txt").read_text() == "keep me"
    assert main(prior_args(demo, data, tmp_path / "new", "--steps", 1, "--resume")) == 2
    assert "holds no training run" in capsys.readouterr().err
    assert main(decoder_args(demo, data, tmp_path / "d", "--steps", 1, "--resolution", 60)) == 2
    assert "--resolution must be a multiple of 64" in capsys.readouterr().err
    args = decoder_args(demo, data, tmp_path / "d2", "--steps", 1)
    args[args.index("--checkpoint") + 1] = str(demo["inpaint"])
    assert main(args) == 2
    assert "needs a UNet with 4 input channels" in capsys.readouterr().err
    assert main(prior_args(demo, tmp_path / "nowhere", tmp_path / "p", "--steps", 1)) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(prior_args(demo, data, data / "runs", "--steps", 1)) == 2
    assert "is inside --data" in capsys.readouterr().err and not (data / "runs").exists()


def test_inpaint_trains(demo, data, tmp_path):
    out = tmp_path / "inpaint"
    args = decoder_args(demo, data, out, "--steps", 2, "--vlb-weight", 1.0, "--cond-drop", 0.5, "--snr-gamma", 5)
    args[0] = "inpaint"
    args[args.index("--checkpoint") + 1] = str(demo["inpaint"])
    assert main(args) == 0
    assert load_component(out / "unet").config.in_channels == 9
    assert all(np.isfinite(losses(out)))


def test_lora_trains_only_adapters(demo, data, tmp_path):
    from kandinsky.lora import load_lora

    out = tmp_path / "lora"
    assert main(prior_args(demo, data, out, "--steps", 8, "--lora", 4, "--lr", "1e-2", "--save-every", 4)) == 0
    curve = losses(out)
    assert curve[-1] < curve[0]
    saved = torch.load(out / "checkpoints" / "step-000008.pt", weights_only=False)
    assert saved["params"] and all(".lora." in k for k in saved["params"])  # only adapters are trained
    base = load_component(demo["prior"] / "prior")
    x = (torch.randn(2, 32), torch.tensor([10, 500]), torch.randn(2, 32), torch.randn(2, 77, 32),
         torch.ones(2, 77, dtype=torch.bool))
    with torch.no_grad():
        before = base(*x)
        load_lora(base, out / "lora")
        assert (base(*x) - before).abs().max() > 1e-4  # the trained adapter acts
    assert main(prior_args(demo, data, out, "--steps", 10, "--lora", 4, "--lr", "1e-2", "--resume")) == 0
    assert len(losses(out)) == 10


# ----------------------------------------------------------------------------- no lost work


@pytest.fixture(scope="module")
def whole_run(demo, data, tmp_path_factory):
    """An uninterrupted 6-step prior run (the reference of the interrupted and resumed ones)."""
    out = tmp_path_factory.mktemp("whole") / "run"
    assert main(prior_args(demo, data, out, "--steps", 6)) == 0
    return out


def interrupt_at(monkeypatch, at: int):
    """train_step raises KeyboardInterrupt (what Ctrl-C raises) when asked for step index ``at``."""
    import kandinsky.training.loop as loop

    real = loop.train_step

    def step(*args):
        if args[6] == at:  # train_step(model, task, data, optimizer, params, config, step, ctx, ...)
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(loop, "train_step", step)


def seconds(out: Path) -> list[float]:
    with open(out / "log.csv", newline="") as f:
        return [float(row["seconds"]) for row in csv.DictReader(f)]


def test_ctrl_c_keeps_a_checkpoint_that_resume_continues(demo, data, whole_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    interrupt_at(monkeypatch, 3)  # after 3 steps done; --save-every 20 would have saved none
    assert main(prior_args(demo, data, out, "--steps", 6, "--save-every", 20)) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("interrupted:")]
    assert "step-000003.pt" in line and "--resume" in line
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000003.pt"]
    assert torch.load(out / "checkpoints" / "step-000003.pt", weights_only=False)["step"] == 3
    before = seconds(out)
    monkeypatch.undo()
    assert main(prior_args(demo, data, out, "--steps", 6, "--save-every", 20, "--resume")) == 0
    assert losses(out) == losses(whole_run)  # the steps after the Ctrl-C: the uninterrupted run's numbers
    after = seconds(out)
    assert after[:3] == before and after[3] >= after[2]  # the clock continues, it does not restart at 0
    a, b = state(whole_run / "prior"), state(out / "prior")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "done: 6 steps (steps 4-6 in " in capsys.readouterr().err  # the closing line


def test_ctrl_c_in_the_first_step_leaves_a_run_that_resume_starts(demo, data, whole_run, tmp_path, monkeypatch,
                                                                     capsys):
    out = tmp_path / "run"
    interrupt_at(monkeypatch, 0)
    assert main(prior_args(demo, data, out, "--steps", 6)) == 130
    assert "rerun the same command with --resume" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(prior_args(demo, data, out, "--steps", 6, "--resume")) == 0
    assert "no checkpoint in" in capsys.readouterr().err  # warned: it starts from step 0
    assert losses(out) == losses(whole_run)


def test_a_failed_start_leaves_a_folder_the_corrected_rerun_accepts(demo, data, tmp_path, monkeypatch, capsys):
    import kandinsky.training.loop as loop

    out = tmp_path / "run"
    wrong = prior_args(demo, data, out, "--steps", 1)
    wrong[wrong.index("--checkpoint") + 1] = str(demo["decoder"])  # not a prior checkpoint
    assert main(wrong) == 2
    assert "not a prior checkpoint folder" in capsys.readouterr().err
    assert not out.exists()
    assert main(prior_args(demo, data, out, "--steps", 1, "--min-size", 65)) == 2  # too-small pictures
    assert "too small (64x64" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()  # an empty folder stays usable too
    monkeypatch.setattr(loop, "load_dataset", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(prior_args(demo, data, out, "--steps", 1)) == 130  # Ctrl-C while encoding the data
    assert "kept nothing written" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
    monkeypatch.undo()
    assert main(prior_args(demo, data, out, "--steps", 1)) == 0  # the corrected rerun, same folder
    assert len(losses(out)) == 1


def files(folder: Path) -> dict:
    """Every file under ``folder``: relative path -> bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_removes_the_earlier_run_only_after_every_check(demo, data, whole_run, tmp_path, monkeypatch,
                                                                   capsys):
    """--overwrite with a bad --data, too-small pictures, a wrong --checkpoint or a Ctrl-C while loading
    leaves the earlier run byte for byte; a folder holding no run and --resume with it are refused; the
    good settings start over: the new run's numbers are a fresh run's, and nothing of the old one is left."""
    import kandinsky.training.loop as loop

    out = tmp_path / "run"
    shutil.copytree(whole_run, out)  # an earlier run: 6 steps, its checkpoint, log, trained prior
    before = files(out)
    starts = {
        "does not exist": prior_args(demo, tmp_path / "typo", out, "--steps", 4, "--overwrite"),
        "too small (64x64": prior_args(demo, data, out, "--steps", 4, "--min-size", 65, "--overwrite"),
        "not a prior checkpoint folder": prior_args(demo, data, out, "--steps", 4, "--overwrite"),
        "give one of them": prior_args(demo, data, out, "--steps", 4, "--overwrite", "--resume"),
    }
    wrong = starts["not a prior checkpoint folder"]
    wrong[wrong.index("--checkpoint") + 1] = str(demo["decoder"])
    for message, argv in starts.items():
        assert main(argv) == 2, message
        assert message in capsys.readouterr().err
        assert files(out) == before, message
    monkeypatch.setattr(loop, "load_dataset", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(prior_args(demo, data, out, "--steps", 4, "--overwrite")) == 130  # Ctrl-C while encoding
    assert "--resume in place of --overwrite" in capsys.readouterr().err
    assert files(out) == before
    monkeypatch.undo()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(prior_args(demo, data, mine, "--steps", 4, "--overwrite")) == 2
    assert "holds no training run" in capsys.readouterr().err and files(mine) == {Path("notes.txt"): b"keep me"}

    assert main(prior_args(demo, data, out, "--steps", 4, "--save-every", 2, "--overwrite")) == 0
    assert losses(out) == losses(whole_run)[:4]  # a fresh run's first 4 steps, not appended to the old log
    assert json.loads((out / "train_config.json").read_text())["steps"] == 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002.pt", "step-000004.pt"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in whole_run.iterdir())


def test_ctrl_c_while_overwriting_leaves_a_run_that_resume_starts(demo, data, whole_run, tmp_path, monkeypatch,
                                                                    capsys):
    """A Ctrl-C while --overwrite removes the earlier run lands once this run's settings are written:
    the folder is then this run's, which --resume starts and continues as a fresh run."""
    import signal

    import kandinsky.training.loop as loop

    out = tmp_path / "run"
    shutil.copytree(whole_run, out)
    real = loop.start_over

    def start_over(*args):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the removal
        real(*args)

    monkeypatch.setattr(loop, "start_over", start_over)
    assert main(prior_args(demo, data, out, "--steps", 4, "--overwrite")) == 130
    assert "no checkpoint yet" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["train_config.json"]
    assert json.loads((out / "train_config.json").read_text())["steps"] == 4
    monkeypatch.undo()
    assert main(prior_args(demo, data, out, "--steps", 4, "--resume")) == 0
    assert losses(out) == losses(whole_run)[:4]


def test_a_damaged_last_checkpoint_falls_back_to_the_one_before(demo, data, whole_run, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(prior_args(demo, data, out, "--steps", 4, "--save-every", 2)) == 0
    last = out / "checkpoints" / "step-000004.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated (a full disk, a killed copy)
    capsys.readouterr()
    assert main(prior_args(demo, data, out, "--steps", 6, "--save-every", 2, "--resume")) == 0
    err = capsys.readouterr().err
    assert "step-000004.pt cannot be read" in err and "resumed from" in err and "step-000002.pt" in err
    assert "PytorchStreamReader" not in err.split("cannot be read")[0]
    assert losses(out) == losses(whole_run)
    assert not list((out / "checkpoints").glob("*.tmp"))  # written atomically: no leftovers


class _RunsCode:
    """Unpickling this runs code (touches a file): what a foreign checkpoint could carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_reads_checkpoints_without_running_their_code(demo, data, whole_run, tmp_path, capsys):
    """Checkpoints read back with weights_only (numpy's RNG state is stored as a tensor); one written before
    that (numpy's state as a tuple holding an array) still resumes exactly; a file in checkpoints/ holding
    other Python objects is passed over, never unpickled."""
    out = tmp_path / "run"
    assert main(prior_args(demo, data, out, "--steps", 4, "--save-every", 2)) == 0
    folder = out / "checkpoints"
    assert isinstance(torch.load(folder / "step-000004.pt", weights_only=True)["rng"]["numpy"]["keys"], torch.Tensor)
    old = torch.load(folder / "step-000002.pt", weights_only=True)  # rewritten the way earlier versions wrote it
    n = old["rng"]["numpy"]
    old["rng"]["numpy"] = (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                           n["cached_gaussian"])
    torch.save(old, folder / "step-000002.pt")
    marker = tmp_path / "code-ran"
    state = torch.load(folder / "step-000004.pt", weights_only=True)
    state["payload"] = _RunsCode(marker)
    torch.save(state, folder / "step-000004.pt")
    capsys.readouterr()
    assert main(prior_args(demo, data, out, "--steps", 6, "--save-every", 2, "--resume")) == 0
    err = capsys.readouterr().err
    assert not marker.exists()  # the foreign object was never unpickled
    assert "step-000004.pt cannot be read" in err and "Python objects other than tensors" in err
    assert "resumed from" in err and "step-000002.pt" in err
    assert losses(out) == losses(whole_run)  # the old-format state restored every generator exactly


def test_shipped_shapes_model_fine_tunes(data, tmp_path):
    """The shipped demo (8 latent channels: a 8-channel decoder UNet, a 17-channel inpainting UNet)
    trains 2 steps of `train decoder` and `train inpaint`."""
    shipped = ROOT / "kandinsky" / "demo_weights"
    for task, folder, channels in (("decoder", "decoder", 8), ("inpaint", "decoder-inpaint", 17)):
        out = tmp_path / task
        argv = [task, "--data", str(data), "--out", str(out), "--checkpoint", str(shipped / folder),
                "--prior", str(shipped / "prior"), "--batch", "2", "--resolution", "64", "--steps", "2",
                "--device", "cpu"]
        assert main(argv) == 0, task
        assert len(losses(out)) == 2 and all(np.isfinite(losses(out)))
        assert load_component(out / "unet").config.in_channels == channels
