"""``kandinsky batch`` (kandinsky/batch.py; its command line kandinsky/cli/batch.py): the same files from
1 and 2 processes (torchrun on gloo), resuming a stopped run, the manifest, and input errors. Tiny demo
weights, 64 px, 2 steps."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kandinsky import batch
from kandinsky.cli import main

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--demo", "--steps", "2", "--prior-steps", "2", "--width", "64", "--height", "64", "--no-progress"]
ITEMS = [
    {"prompt": "a red cat"},
    {"prompt": "a blue dog", "negative_prompt": "blurry", "seed": 7},
    {"prompt": "a green bird", "width": 32, "guidance_scale": 1.0},
    {"prompt": "a red cat"},  # same prompt, its own seed
    {"prompt": "a house", "steps": 3},
]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("batch") / "prompts.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    return path


def run_here(argv) -> int:
    """kandinsky batch in this process, on one thread (as torchrun's workers run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(["batch", *argv])
    finally:
        torch.set_num_threads(threads)


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(prompts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    assert run_here([prompts, "--out", out, *FAST]) == 0
    return out


def test_one_process_output(one_process):
    files = pngs(one_process)
    assert sorted(files) == [f"{i:06d}.png" for i in range(len(ITEMS))]
    entries = manifest(one_process)
    assert [e["item"] for e in entries] == list(range(len(ITEMS)))
    assert entries[1]["seed"] == 7 and entries[1]["negative_prompt"] == "blurry"
    assert entries[0]["seed"] == batch.item_seed(0, 0) != entries[3]["seed"] == batch.item_seed(0, 3)
    assert entries[2]["width"] == 32 and entries[4]["steps"] == 3
    assert files["000000.png"] != files["000003.png"]  # same prompt, different seeds
    from PIL import Image

    assert Image.open(one_process / "000002.png").size == (32, 64)
    assert not list(one_process.glob("manifest.rank*")) and not list(one_process.glob(".*.tmp"))


def test_torchrun_two_processes_same_files(prompts, one_process, tmp_path):
    out = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "kandinsky.cli", "batch", str(prompts), "--out", str(out), *FAST]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "5 items, 5 generated now" in done.stdout
    assert pngs(out) == pngs(one_process)
    entries = manifest(out)
    assert [e["item"] for e in entries] == list(range(len(ITEMS)))
    assert [e["rank"] for e in entries] == [0, 1, 0, 1, 0]  # item i on rank i % 2
    assert [e["seed"] for e in entries] == [e["seed"] for e in manifest(one_process)]


def test_resume_skips_finished_items(prompts, one_process, tmp_path, capsys):
    out = tmp_path / "resumed"
    # stopped after 2 items (in low-memory mode: the same pictures)
    assert run_here([prompts, "--out", out, *FAST, "--limit", "2", "--offload", "model", "--device", "cpu"]) == 0
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert sorted(first) == ["000000.png", "000001.png"]
    # a run killed between the PNG and its manifest line: the PNG counts as finished
    (out / "manifest.jsonl").write_text("")
    capsys.readouterr()
    assert run_here([prompts, "--out", out, *FAST]) == 0
    assert "3 generated now" in capsys.readouterr().out
    assert {name: (out / name).stat().st_mtime_ns for name in first} == first  # not redone
    assert pngs(out) == pngs(one_process)
    entries = manifest(out)
    assert [e["item"] for e in entries] == list(range(len(ITEMS)))
    assert [e.get("recovered", False) for e in entries] == [True, True, False, False, False]


def test_txt_prompts_and_another_batch_refused(tmp_path, capsys):
    txt = tmp_path / "prompts.txt"
    txt.write_text("a red cat\n\n  a blue dog  \n")
    out = tmp_path / "out"
    assert run_here([txt, "--out", out, *FAST, "--seed", "5", "--limit", "0"]) == 0
    assert json.loads((out / "batch.json").read_text())["items"] == 2
    txt.write_text("a red cat\nsomething else\n")
    assert run_here([txt, "--out", out, *FAST, "--seed", "5"]) == 2
    assert "holds another batch" in capsys.readouterr().err


@pytest.mark.parametrize("line, message", [
    ("not json", "not a JSON object"),
    ('{"text": "a cat"}', 'with a "prompt" key'),
    ('{"prompt": "a cat", "sede": 3}', "unknown key(s) ['sede']"),
    ('{"prompt": "a cat", "seed": "3"}', "seed must be int"),
    ('{"prompt": "a cat", "width": 0}', "width must be at least 1"),
])
def test_bad_prompts_file(tmp_path, capsys, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "ok"}) + "\n" + line + "\n")
    assert run_here([path, "--out", tmp_path / "out", *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_another_batch_replaced_only_with_overwrite(tmp_path, capsys):
    """kandinsky batch refuses a folder holding another batch; --overwrite starts it over (its own files
    only: batch.json, the manifests, the six-digit PNGs)."""
    txt = tmp_path / "prompts.txt"
    txt.write_text("a red cat\n")
    out = tmp_path / "out"
    assert run_here([txt, "--out", out, *FAST]) == 0
    first = (out / "000000.png").read_bytes()
    (out / "notes.txt").write_text("mine")
    txt.write_text("a blue dog\n")
    capsys.readouterr()
    assert run_here([txt, "--out", out, *FAST]) == 2
    assert "pass --overwrite to start this one over" in capsys.readouterr().err
    assert (out / "000000.png").read_bytes() == first
    assert run_here([txt, "--out", out, *FAST, "--overwrite"]) == 0
    assert (out / "000000.png").read_bytes() != first  # the new batch's picture
    assert [e["prompt"] for e in manifest(out)] == ["a blue dog"]
    assert (out / "notes.txt").read_text() == "mine"


def test_ctrl_c_keeps_the_finished_pictures(prompts, tmp_path, monkeypatch, capsys):
    """Ctrl-C after two items: exit 130, one line saying what was kept, and the same command resumes."""
    real = batch.generate
    calls = []

    def interrupted(pipe, item):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(item.index)
        return real(pipe, item)

    monkeypatch.setattr(batch, "generate", interrupted)
    out = tmp_path / "out"
    assert run_here([prompts, "--out", out, *FAST]) == 130
    err = capsys.readouterr().err
    assert "interrupted: kandinsky batch stopped by Ctrl-C; kept the 2 pictures finished now" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png"]
    monkeypatch.setattr(batch, "generate", real)
    assert run_here([prompts, "--out", out, *FAST]) == 0
    assert "3 generated now" in capsys.readouterr().out


def test_out_that_cannot_be_a_folder(prompts, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert run_here([prompts, "--out", tmp_path / "file", *FAST]) == 2
    assert "is a file, not a folder; name a folder" in capsys.readouterr().err
    assert run_here([prompts, "--out", tmp_path / "file" / "sub", *FAST]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_demo_draws_at_64_px_by_default(tmp_path, capsys):
    """--demo without --width / --height: the shapes model's 64 x 64 (its help says so), not 512."""
    import PIL.Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    assert run_here([prompts, "--out", tmp_path / "out", "--demo", "--steps", "2", "--prior-steps", "2",
                     "--quiet"]) == 0  # the old spelling of --no-progress still works
    assert "warning: --quiet is deprecated (it goes in the next release): use --no-progress" in capsys.readouterr().err
    assert PIL.Image.open(tmp_path / "out" / "000000.png").size == (64, 64)
    assert manifest(tmp_path / "out")[0]["width"] == 64


def test_default_size_is_the_command_lines_rule(tmp_path, cli_demo):
    """The side not given is the model's own, as for every command (cli.common.picture_size): --demo with
    --width 48 draws 48 x 64; --random-demo 256 x 256."""
    import PIL.Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    quick = ["--steps", "1", "--prior-steps", "2", "--no-progress"]
    assert run_here([prompts, "--out", tmp_path / "demo", "--demo", "--width", "48", *quick]) == 0
    assert PIL.Image.open(tmp_path / "demo" / "000000.png").size == (48, 64)
    assert run_here([prompts, "--out", tmp_path / "random", "--random-demo", *quick]) == 0
    assert PIL.Image.open(tmp_path / "random" / "000000.png").size == (256, 256)
