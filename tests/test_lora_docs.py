"""docs/lora.md's python blocks run as written, in order, on the tiny random demo checkpoints
(hub ids ``kandinsky-community/NAME`` become the local demo folders ``./NAME``: the ``demo_as_hub`` fixture)."""
from __future__ import annotations

import pathlib

import torch

from kandinsky.lora import LoRALinear
from tests.helpers import python_blocks, run_python_blocks

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "lora.md"


def test_lora_doc_examples_run(demo_as_hub, tmp_path):
    assert len(python_blocks(DOC.read_text())) >= 7
    namespace = run_python_blocks(DOC, lambda code: code.replace("kandinsky-community/", "./"))
    # what the page says happened
    assert (tmp_path / "my-lora" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "my-lora" / "adapter_config.json").is_file()
    assert namespace["name"] == "my-lora"
    fresh = namespace["fresh"]
    assert not any(isinstance(m, LoRALinear) for m in fresh.decoder.unet.modules())
    # the merged "my-lora" stayed in the weights: they differ from the checkpoint's
    from weights_convert import load_component

    base = load_component(demo_as_hub["decoder"] / "unet")
    diff = (fresh.decoder.unet.mid.attn.to_q.weight - base.mid.attn.to_q.weight).abs().max()
    assert diff > 0
    saved = load_component(tmp_path / "unet-finetuned")
    torch.testing.assert_close(saved.mid.attn.to_q.weight, fresh.decoder.unet.mid.attn.to_q.weight)
