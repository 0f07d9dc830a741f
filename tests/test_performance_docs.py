"""docs/performance.md's python blocks run as written (tiny models, CPU)."""
from __future__ import annotations

import pathlib

from tests.helpers import python_blocks, run_python_blocks

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "performance.md"


def test_performance_doc_examples_run():
    assert len(python_blocks(DOC.read_text())) >= 2
    namespace = run_python_blocks(DOC)
    assert namespace["tiled"].shape == namespace["whole"].shape == (1, 3, 128, 192)
    assert namespace["pipe"].offloader is None and namespace["image"].size == (64, 64)
