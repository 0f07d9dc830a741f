"""docs/usage.md's python examples run as written, on the tiny random demo checkpoints.

All ```python blocks are executed in order in one namespace (like a notebook), in a temporary
folder holding the demo repos under their hub names (``./kandinsky-2-2-prior``, ...). Hub ids
``kandinsky-community/NAME`` become ``./NAME``; picture sizes (512, 768) and step counts are shrunk
so the whole page runs in seconds on a CPU.
"""
from __future__ import annotations

import pathlib
import re

import pytest

from kandinsky.demo import build_demo_checkpoints

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "usage.md"
REPOS = {"prior": "kandinsky-2-2-prior", "decoder": "kandinsky-2-2-decoder",
         "decoder-inpaint": "kandinsky-2-2-decoder-inpaint", "controlnet-depth": "kandinsky-2-2-controlnet-depth"}


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def shrink(code: str) -> str:
    code = code.replace("kandinsky-community/", "./")
    code = re.sub(r"\b768\b", "128", code)
    code = re.sub(r"\b512\b", "64", code)
    code = re.sub(r"(?<!\w)num_inference_steps=\d+", "num_inference_steps=4", code)
    return re.sub(r"prior_num_inference_steps=\d+", "prior_num_inference_steps=2", code)


def test_usage_examples_run(tmp_path, monkeypatch):
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 15
    folders = build_demo_checkpoints(tmp_path / "demo")
    for name, repo in REPOS.items():
        (tmp_path / repo).symlink_to(folders[name], target_is_directory=True)
    monkeypatch.chdir(tmp_path)

    namespace: dict = {"__name__": "usage_md"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(shrink(block), f"docs/usage.md python block {i}", "exec"), namespace)
        except Exception as e:
            pytest.fail(f"docs/usage.md python block {i} failed: {e!r}\n---\n{block}")
    # a few of the documented results
    stages = [state[0] for state in namespace["seen"]]  # the callback ran once per step of both stages
    assert stages == ["prior"] * 2 + ["decoder"] * 4
    assert namespace["out"].trajectory.x0.shape == (4, 1, 4, 8, 8)
    assert (tmp_path / "steps.png").is_file()
    assert namespace["lat"].shape[1] == 4 and namespace["arr"].shape[-1] == 3


@pytest.mark.parametrize("doc", ["architecture.md", "components.md"])
def test_reference_docs_examples_run(doc, monkeypatch):
    """docs/architecture.md and docs/components.md build their own tiny models: run them as written."""
    path = DOC.parent / doc
    blocks = python_blocks(path.read_text())
    assert blocks
    monkeypatch.chdir(DOC.parent.parent)  # they read tests/data configs relative to the repo root
    namespace: dict = {"__name__": doc}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"docs/{doc} python block {i}", "exec"), namespace)
        except Exception as e:
            pytest.fail(f"docs/{doc} python block {i} failed: {e!r}\n---\n{block}")
