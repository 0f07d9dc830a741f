"""`python -m weights_convert` as a user runs it (a subprocess), at the edges: an existing
destination, a destination that is a file or read-only, a source that is invalid or breaks
half-way, and the dtype of what is written.

Each class of problem runs once through the console command (exit status and stderr as the user
sees them); its variants run the same ``main(argv)`` in-process (importing torch in a fresh
process costs seconds). Rules under test: a non-empty DST is refused unless --overwrite, which replaces it (no
file of the old conversion survives); the result appears only when complete (a failure leaves neither DST nor
a temporary folder nor created parents behind, and an existing DST untouched); bad paths give
``error: ...`` and exit status 2 before anything is written; ``--dtype keep`` (the default) writes
each tensor in the dtype it is stored in.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kandinsky.demo import TINY
from weights_convert import build_model, convert_state_dict, load_component, save_component
from weights_convert.__main__ import main
from weights_convert.io import read_safetensors, read_safetensors_header

ROOT = Path(__file__).resolve().parents[1]
HUB_FILE = "diffusion_pytorch_model.safetensors"


def convert(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "weights_convert", *map(str, args)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


def convert_here(capsys, *args) -> subprocess.CompletedProcess:
    """The same command, in this process: (returncode, stdout, stderr) as from the console."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def tree(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` with its bytes (to show a folder was not touched)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@torch.no_grad()
def _component(config: dict, folder: Path, seed: int, dtype=None) -> None:
    torch.manual_seed(seed)
    model = build_model(config)
    for p in model.parameters():
        p.normal_(0, 0.05)
    save_component(model, folder, layout="hub", dtype=dtype)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny decoder-like repo: movq/ and text_encoder/ (hub layout, fp32), scheduler/, model_index.json."""
    repo = tmp_path_factory.mktemp("src") / "repo"
    _component(TINY["movq"], repo / "movq", seed=0)
    _component(TINY["text_encoder"], repo / "text_encoder", seed=1)
    (repo / "scheduler").mkdir()
    (repo / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "DDPMScheduler"}')
    (repo / "model_index.json").write_text("{}")
    return repo


@pytest.fixture(scope="module")
def broken(checkpoint, tmp_path_factory) -> Path:
    """The same repo with its second component (text_encoder, converted after movq) truncated."""
    repo = tmp_path_factory.mktemp("broken") / "repo"
    shutil.copytree(checkpoint, repo)
    weights = repo / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return repo


def test_refuses_a_non_empty_destination_then_overwrite_replaces_it(checkpoint, tmp_path):
    """The issue's case: DST holds a conversion in the other layout. Refused, untouched; with
    --overwrite, only the new layout's files are left (diffusers would otherwise read the old)."""
    dst = tmp_path / "out"
    save_component(load_component(checkpoint / "movq"), dst / "movq", layout="hub")
    (dst / "notes.txt").write_text("an earlier conversion")
    before = tree(dst)
    assert f"movq/{HUB_FILE}" in before

    refused = convert(checkpoint, dst, "--to", "kandinsky")
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: DST") and "is not empty" in refused.stderr
    assert "--overwrite" in refused.stderr and "Traceback" not in refused.stderr
    assert tree(dst) == before

    replaced = convert(checkpoint, dst, "--to", "kandinsky", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    after = tree(dst)
    assert "movq/kandinsky.safetensors" in after and f"movq/{HUB_FILE}" not in after
    assert "notes.txt" not in after  # replaced, not merged
    assert "scheduler/scheduler_config.json" in after and "model_index.json" in after
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old folder left


def test_an_empty_destination_folder_is_used(checkpoint, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    done = convert_here(capsys, checkpoint, tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "movq" / "kandinsky.safetensors").is_file()


def test_a_failure_half_way_leaves_nothing_behind(broken, tmp_path, capsys):
    """text_encoder is corrupt: movq was already converted when it fails. No DST, no temporary
    folder, no parent created for DST; an existing DST (with --overwrite) stays as it was."""
    dst = tmp_path / "new" / "parents" / "out"
    failed = convert(broken, dst)
    assert failed.returncode == 2
    assert failed.stderr.startswith("error: ") and "truncated or corrupt" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert list(tmp_path.iterdir()) == []

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("the user's work")
    failed = convert_here(capsys, broken, existing, "--overwrite")
    assert failed.returncode == 2 and "truncated or corrupt" in failed.stderr
    assert tree(existing) == {"keep.txt": b"the user's work"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", r"SRC .*nope: no such folder"),
        ("file", r"SRC .*config.json: is a file; pass the checkpoint folder"),
        ("no components", r"SRC .*: found no component folder"),
    ],
)
def test_an_invalid_source_creates_nothing(checkpoint, tmp_path, capsys, case, expected):
    src = {
        "missing": tmp_path / "nope",
        "file": checkpoint / "movq" / "config.json",
        "no components": checkpoint / "scheduler",
    }[case]
    dst = tmp_path / "made" / "out"
    result = convert(src, dst) if case == "missing" else convert_here(capsys, src, dst)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr

    assert re.search(expected, result.stderr), result.stderr
    assert not (tmp_path / "made").exists()


def test_a_destination_that_is_a_file(checkpoint, tmp_path, capsys):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"the user's file")
    cases = ((target, "is a file; pass the path of a folder"), (target / "sub", "is a file, so no folder"))
    for dst, expected in cases:
        result = convert_here(capsys, checkpoint, dst, "--overwrite")
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: DST") and expected in result.stderr
        assert "Traceback" not in result.stderr
    assert target.read_bytes() == b"the user's file"


def _make_read_only(folder: Path) -> bool:
    """chmod (a normal user) or the immutable flag (root ignores modes); False if neither holds."""
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        folder.chmod(0o755)
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
            return False
    return not os.access(folder, os.W_OK)


def _make_writable(folder: Path) -> None:
    if shutil.which("chattr"):
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    folder.chmod(0o755)


def test_a_read_only_destination(checkpoint, tmp_path):
    parent = tmp_path / "read-only"
    parent.mkdir()
    if not _make_read_only(parent):
        pytest.skip("cannot make a folder read-only here")
    try:
        result = convert(checkpoint, parent / "out")
        assert result.returncode == 2
        assert result.stderr.startswith("error: DST") and "permission denied" in result.stderr
        assert "Traceback" not in result.stderr
        assert list(parent.iterdir()) == []
    finally:
        _make_writable(parent)


def test_dtype_keep_is_the_default_and_keeps_each_tensor_as_stored(tmp_path, capsys):
    """An fp16-only source converts to fp16 (the same bytes, renamed), not to a file twice the size;
    --dtype fp32 casts on request."""
    src = tmp_path / "movq-fp16"
    _component(TINY["movq"], src, seed=3, dtype=torch.float16)
    stored = read_safetensors(src / HUB_FILE)
    assert {v.dtype for v in stored.values()} == {torch.float16}

    assert convert(src, tmp_path / "kept").returncode == 0
    out = tmp_path / "kept" / "kandinsky.safetensors"
    written = read_safetensors(out)
    expected = convert_state_dict(json.loads((src / "config.json").read_text()), stored)
    assert written.keys() == expected.keys()
    assert all(written[k].dtype == torch.float16 and torch.equal(written[k], expected[k]) for k in expected)
    assert out.stat().st_size < 1.05 * (src / HUB_FILE).stat().st_size

    assert convert_here(capsys, src, tmp_path / "fp32", "--dtype", "fp32").returncode == 0
    header, _ = read_safetensors_header(tmp_path / "fp32" / "kandinsky.safetensors")
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F32"}


def test_ctrl_c_leaves_nothing_and_exits_130(checkpoint, tmp_path, capsys, monkeypatch):
    """KeyboardInterrupt half-way: the rule of every command (kandinsky/exits.py): one line saying what was
    kept, status 130, no traceback; no DST, no temporary folder."""
    import weights_convert.__main__ as cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "convert_into", interrupted)
    dst = tmp_path / "new" / "out"
    result = convert_here(capsys, checkpoint, dst)
    assert result.returncode == 130
    kept = f"nothing written ({dst} as it was)"
    assert result.stderr == f"interrupted: python -m weights_convert stopped by Ctrl-C; kept {kept}\n"
    assert not (tmp_path / "new").exists()
