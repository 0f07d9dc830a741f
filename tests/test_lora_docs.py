"""docs/lora.md's python blocks run as written, in order, on the tiny random demo checkpoints
(hub ids ``kandinsky-community/NAME`` become local demo folders ``./NAME``)."""
from __future__ import annotations

import pathlib

import pytest
import torch

from kandinsky.demo import build_demo_checkpoints
from kandinsky.lora import LoRALinear
from tests.test_usage_docs import REPOS, python_blocks

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "lora.md"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is fastest, and on a busy machine several threads are ~50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_lora_doc_examples_run(tmp_path, monkeypatch):
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 7
    folders = build_demo_checkpoints(tmp_path / "demo")
    for name in ("prior", "decoder"):
        (tmp_path / REPOS[name]).symlink_to(folders[name], target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "lora_md"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block.replace("kandinsky-community/", "./"), f"docs/lora.md python block {i}", "exec"),
                 namespace)
        except Exception as e:
            pytest.fail(f"docs/lora.md python block {i} failed: {e!r}\n---\n{block}")
    # what the page says happened
    assert (tmp_path / "my-lora" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "my-lora" / "adapter_config.json").is_file()
    assert namespace["name"] == "my-lora"
    fresh = namespace["fresh"]
    assert not any(isinstance(m, LoRALinear) for m in fresh.decoder.unet.modules())
    # the merged "my-lora" stayed in the weights: they differ from the checkpoint's
    from weights_convert import load_component

    base = load_component(folders["decoder"] / "unet")
    diff = (fresh.decoder.unet.mid.attn.to_q.weight - base.mid.attn.to_q.weight).abs().max()
    assert diff > 0
    saved = load_component(tmp_path / "unet-finetuned")
    torch.testing.assert_close(saved.mid.attn.to_q.weight, fresh.decoder.unet.mid.attn.to_q.weight)
