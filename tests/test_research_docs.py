"""docs/research.md: every python block runs, in order, as written (on the shapes model that ships in
the package), makes every picture the page shows, and prints the numbers the page says."""
from __future__ import annotations

import os
import pathlib
import re

import torch

from tests.helpers import run_python_blocks

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "research.md"
# pictures of section 10's full measurement (its command is on the page; about 1.5 CPU-hours), not remade here
MEASURED = {"research-routes-64.png"}


def run_research_doc(folder: pathlib.Path) -> dict:
    """Execute docs/research.md's python blocks in order in ``folder`` (what the pictures in
    docs/images/research-*.png are made with; docs/make_pictures.py calls this)."""
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        return run_python_blocks(DOC)
    finally:
        os.chdir(cwd)


def test_research_doc_examples_run(tmp_path):
    ns = run_research_doc(tmp_path)
    pictures = sorted(p.name for p in tmp_path.glob("research-*.png"))
    linked = sorted(set(re.findall(r"\(images/(research-[\w-]+\.png)\)", DOC.read_text())))
    assert linked and set(linked) - MEASURED <= set(pictures)  # every picture the page shows, it makes
    for name in linked:
        assert (ROOT / "docs" / "images" / name).is_file(), f"docs/images/{name} is not committed"
    # the numbers the page prints
    rec, small, att = ns["rec"], ns["small"], ns["att"]
    assert rec["unet.mid", 19, "cond"].shape == (1, 96, 1, 1) and ns["h"].shape == (2, 1, 96, 1, 1)
    assert rec.steps("prior.blocks.1") == [0] and len(rec) == 6
    assert small.stack("unet.up.1", branch="cond").shape == (20, 1, 64) and small.nbytes == 2560
    torch.testing.assert_close(ns["p"].sum(-1), torch.ones_like(ns["p"].sum(-1)))  # probabilities
    n_text = att.meta["prior.blocks.1.attn"]["text_tokens"]
    assert n_text == ns["pipe"].prior.prior.config.num_embeddings  # the layer's layout reads its config
    assert ns["prd"].shape[0] == 1 and ns["prd"].shape[-1] == n_text
