"""Runaway jobs refused before any work (kandinsky/pipelines/limits.py): the memory estimate is its
formula; a size beyond the device's memory is refused in under a second with what it would need and the
largest size that fits, through every door (DecoderPipeline, Kandinsky before its prior runs, the
generation commands before loading, `kandinsky batch` before its first picture); a count above MANY
needs the confirmation flag."""
from __future__ import annotations

import json
import re
import time
import warnings
from pathlib import Path

import pytest
import torch

from kandinsky.cli import main
from kandinsky.pipelines import limits
from kandinsky.pipelines.limits import MANY, check_configs, check_count, estimate_bytes
from kandinsky.unet.model import UNetConfig
from kandinsky.movq.model import MoVQConfig

DATA = Path(__file__).parent / "data"


def configs():
    """The real Kandinsky 2.2 decoder's UNet and MoVQ configs (tests/data)."""
    root = DATA / "kandinsky-2-2-decoder"
    return (UNetConfig.from_dict(json.loads((root / "unet" / "config.json").read_text())),
            MoVQConfig.from_dict(json.loads((root / "movq" / "config.json").read_text())))


def test_estimate_is_the_formula():
    unet, movq = configs()
    assert unet.block_out_channels == (384, 768, 1152, 1536) and unet.layers_per_block == 3
    assert tuple(movq.block_out_channels) == (128, 256, 256, 512)
    # 512 x 512, fp16, untiled: the UNet's 2 x 64 x 64 x 4 x (384 + 768/4 + 1152/16 + 1536/64) x 4 values,
    # the MoVQ's 512 x 512 x 4 x 256, the pictures' 512 x 512 x 9; the larger peak + the pictures, x 2 bytes
    unet_part = 2 * 64 * 64 * 4 * (384 + 768 / 4 + 1152 / 16 + 1536 / 64) * 4
    movq_part = 512 * 512 * 4 * 256
    assert movq_part > unet_part
    assert estimate_bytes(unet, movq, 1, 512, 512, None, torch.float16) == int((movq_part + 512 * 512 * 9) * 2)
    # a tile bounds the MoVQ's part: (512 + 256)^2 pixels at once, and the UNet's part wins at 4096 px
    tiled = estimate_bytes(unet, movq, 1, 4096, 4096, 512, torch.float32)
    unet_4k = 2 * 512 * 512 * 4 * (384 + 768 / 4 + 1152 / 16 + 1536 / 64) * 4
    assert tiled == int((max(unet_4k, 768 ** 2 * 4 * 256) + 4096 ** 2 * 9) * 4)
    # linear in the batch
    assert estimate_bytes(unet, movq, 3, 512, 512, None, torch.float16) == \
        3 * estimate_bytes(unet, movq, 1, 512, 512, None, torch.float16)


def test_refusal_names_the_need_and_the_largest_size_that_fits(monkeypatch):
    unet, movq = configs()
    have = 24 * 2 ** 30
    monkeypatch.setattr(limits, "available_memory", lambda device: have)
    with pytest.raises(ValueError) as e:
        check_configs(unet, movq, torch.device("cpu"), torch.float32, 1, 100032, 100032, None, 64, (100000, 100000))
    message = str(e.value)
    need = estimate_bytes(unet, movq, 1, 100032, 100032, 512, torch.float32)
    assert f"height=100000 x width=100000 (1 picture) would need about {need / 2 ** 40:.1f} TiB" in message
    assert "which has 24.0 GiB" in message
    h, w = map(int, re.search(r"largest size that fits at this aspect ratio is height=(\d+), width=(\d+)",
                              message).groups())
    assert h == w and h % 64 == 0
    check_configs(unet, movq, "cpu", torch.float32, 1, h, w, None, 64)  # it fits
    with pytest.raises(ValueError):  # and one step more does not
        check_configs(unet, movq, "cpu", torch.float32, 1, h + 64, w + 64, None, 64)
    # a batch too big at a size that fits once: how many fit
    per = estimate_bytes(unet, movq, 1, 512, 512, None, torch.float32)
    with pytest.raises(ValueError, match=f"at most {have // per} pictures at once fit"):
        check_configs(unet, movq, "cpu", torch.float32, 100000, 512, 512, None, 64)
    # what fits passes, whatever the machine
    check_configs(unet, movq, "cpu", torch.float32, 1, 512, 512, None, 64)


def test_available_memory_is_the_machines():
    import os

    assert limits.available_memory("cpu") == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _fast_refusal(call) -> str:
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as e:
        call()
    assert time.perf_counter() - t0 < 1.0
    assert "would need about" in str(e.value) and "largest size that fits" in str(e.value)
    return str(e.value)


def test_python_api_refuses_before_any_work(random_demo_kandinsky, monkeypatch):
    pipe = random_demo_kandinsky
    embeds = torch.zeros(1, pipe.decoder.unet.config.encoder_hid_dim)
    _fast_refusal(lambda: pipe.decoder.text2img(embeds, embeds, height=100000, width=100000, progress=False))

    def no_prior(*a, **k):
        raise AssertionError("the prior ran before the size was checked")

    monkeypatch.setattr(type(pipe.prior), "__call__", no_prior)
    message = _fast_refusal(lambda: pipe.text2img("a cat", height=100000, width=100000, progress=False))
    assert "height=100000 x width=100000 (1 picture)" in message
    with pytest.raises(ValueError, match=r"\(100000 pictures\)"):
        pipe.text2img(["a cat"], num_images_per_prompt=100000, height=512, width=512, progress=False)


def test_command_refuses_before_loading(cli_demo_seeds, tmp_path, capsys, monkeypatch):
    import kandinsky.pipelines.combined as combined

    monkeypatch.setattr(combined.Kandinsky, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("loaded before the size check")))
    out = tmp_path / "x.png"
    t0 = time.perf_counter()
    assert main(["text2img", "--demo", "a cat", "--width", "100000", "--height", "100000", "-o", str(out)]) == 2
    assert time.perf_counter() - t0 < 1.0
    err = capsys.readouterr().err
    assert "error: height=100000 x width=100000 (1 picture) would need about" in err
    assert not out.exists()


def test_many_pictures_need_the_flag(capsys):
    assert main(["text2img", "--demo", "a cat", "--num-images", str(MANY + 1)]) == 2
    err = capsys.readouterr().err
    assert f"--num-images {MANY + 1} asks for {MANY + 1} pictures (more than {MANY})" in err
    assert "--allow-many" in err
    check_count(MANY, False)  # up to MANY: no word
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_count(MANY + 1, True)
    assert [str(w.message) for w in caught] == [f"--num-images {MANY + 1}: making {MANY + 1} pictures "
                                                "(--allow-many given)"]


def test_batch_refuses_a_runaway_item_before_the_first_picture(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a cat"}) + "\n"
                       + json.dumps({"prompt": "a dog", "width": 100000, "height": 100000}) + "\n")
    out = tmp_path / "out"
    assert main(["batch", str(prompts), "--out", str(out), "--demo", "--steps", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error: item 1 (000001.png): height=100000 x width=100000 (1 picture) would need about" in err
    assert not list(out.glob("*.png"))  # not even item 0 was drawn
