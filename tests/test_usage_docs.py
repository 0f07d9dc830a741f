"""docs/usage.md's python examples run as written, on the tiny random demo checkpoints; so do the
self-contained examples of docs/architecture.md and docs/components.md.

usage.md's ```python blocks are executed in order in one namespace (like a notebook), in a temporary
folder holding the demo repos under their hub names (``./kandinsky-2-2-prior``, ...: the ``demo_as_hub``
fixture). Hub ids ``kandinsky-community/NAME`` become ``./NAME``; picture sizes (512, 768) and step
counts are shrunk so the whole page runs in seconds on a CPU.
"""
from __future__ import annotations

import pathlib
import re

import pytest

from tests.helpers import python_blocks, run_python_blocks

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "usage.md"


def shrink(code: str) -> str:
    code = code.replace("kandinsky-community/", "./")
    code = re.sub(r"\b768\b", "128", code)
    code = re.sub(r"\b512\b", "64", code)
    code = re.sub(r"(?<!\w)num_inference_steps=\d+", "num_inference_steps=4", code)
    return re.sub(r"prior_num_inference_steps=\d+", "prior_num_inference_steps=2", code)


def test_usage_examples_run(demo_as_hub, tmp_path):
    assert len(python_blocks(DOC.read_text())) >= 15
    namespace = run_python_blocks(DOC, shrink)
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
    assert python_blocks(path.read_text())
    monkeypatch.chdir(DOC.parent.parent)  # they read tests/data configs relative to the repo root
    run_python_blocks(path)
