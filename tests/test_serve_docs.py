"""docs/studio.md's python block runs as written against the session's live studio (conftest's
studio_server: `kandinsky serve --demo`), its address put in for http://127.0.0.1:7860/."""
import pathlib

import numpy as np
import pytest

from tests.helpers import python_blocks, run_python_blocks

pytest.importorskip("gradio_client", reason="the studio's docs example needs gradio_client")
DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "studio.md"


def test_studio_doc_example_runs(studio_server, tmp_path, monkeypatch):
    url, _, _ = studio_server
    monkeypatch.chdir(tmp_path)
    assert len(python_blocks(DOC.read_text())) == 1
    ns = run_python_blocks(DOC, lambda code: code.replace("http://127.0.0.1:7860/", url))
    picture, repainted, wider = ns["picture"], ns["repainted"], ns["wider"]
    assert picture.size == repainted.size == (64, 64) and wider.size == (80, 64)  # what the page says
    before, after = np.asarray(picture.convert("RGB")), np.asarray(repainted.convert("RGB"))
    keep = np.ones((64, 64), bool)
    keep[16:48, 16:48] = False
    np.testing.assert_array_equal(after[keep], before[keep])  # "the rest stays exactly as it was"
    assert f"Seed: {ns['seed']}, " in repainted.text["parameters"]
    np.testing.assert_array_equal(np.asarray(wider.convert("RGB"))[:, 16:], after)
