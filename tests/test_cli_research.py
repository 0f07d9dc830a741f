"""The research commands (kandinsky/cli/research.py): ``kandinsky inspect``, ``attention``, ``score`` and
``mix`` on the tiny random demo checkpoints (the session's ``random_demo``); each refuses to replace an
output file without --overwrite. The library functions they call: tests/test_inspect.py,
tests/test_viz.py, tests/test_embeddings.py."""
from __future__ import annotations

import json

import numpy as np
import PIL.Image

from kandinsky.cli import main
from kandinsky.research import inspect as ki


# --------------------------------------------------------------------------- inspect
def test_inspect_text_and_errors(capsys, tmp_path):
    assert main(["inspect", "unet", "--size", "768x512", "--depth", "1"]) == 0
    out = capsys.readouterr().out
    assert "1,253,057,288" in out and "(B, 8, 64, 96)" in out  # latents of 768 x 512 are 96 x 64
    assert main(["inspect", "unet", "--size", "500x500"]) == 2
    assert "multiples of 64" in capsys.readouterr().err
    assert main(["inspect", "movq", "--checkpoint", tmp_path]) == 2
    assert "movq/config.json" in capsys.readouterr().err
    # a checkpoint folder works like the shipped configs
    (tmp_path / "movq").mkdir()
    (tmp_path / "movq" / "config.json").write_text(json.dumps(ki.shipped_config("movq")))
    assert main(["inspect", "movq", "--checkpoint", tmp_path, "--depth", "0"]) == 0
    assert "67,832,495" in capsys.readouterr().out


# --------------------------------------------------------------------------- attention
def test_attention_writes_its_pictures(random_demo, tmp_path, capsys):
    out = tmp_path / "attn.png"
    args = ["attention", "a red cat", "--prior", random_demo["prior"], "--decoder", random_demo["decoder"],
            "--steps", "2", "--prior-steps", "2", "--size", "64x64", "-o", out]
    assert main(args) == 0
    for suffix in ("", "-words", "-image", "-x0"):
        path = tmp_path / f"attn{suffix}.png"
        assert PIL.Image.open(path).format == "PNG"
    assert main(args[:-1] + [tmp_path / "attn.jpg"]) == 2
    assert main(args + ["--at", "5", "--overwrite"]) == 2
    assert "--at steps must be in [0, 1]" in capsys.readouterr().err


def test_attention_refuses_to_overwrite(random_demo, tmp_path, capsys):
    (tmp_path / "attn-words.png").write_bytes(b"mine")  # one of the four outputs
    args = ["attention", "a red cat", "--prior", random_demo["prior"], "--decoder", random_demo["decoder"],
            "--steps", "2", "--prior-steps", "2", "--size", "64x64", "-o", tmp_path / "attn.png"]
    assert main(args) == 2
    assert "attn-words.png' exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "attn-words.png").read_bytes() == b"mine" and not (tmp_path / "attn.png").exists()
    assert main(args + ["--overwrite"]) == 0
    assert PIL.Image.open(tmp_path / "attn-words.png").format == "PNG"


# --------------------------------------------------------------------------- score
def test_score_matrix_and_json(random_demo, tmp_path, capsys):
    image = tmp_path / "im.png"
    PIL.Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    out = tmp_path / "sims.json"
    argv = ["score", image, image, "a red cat", "a dog", "--prior", random_demo["prior"], "--json", out]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert np.array(data["text"]).shape == (2, 2) and np.allclose(data["image"], 1, atol=1e-5)
    assert "text-image cosine" in capsys.readouterr().out
    out.write_text("mine")
    assert main(argv) == 2  # the JSON exists: not overwritten without --overwrite
    assert "sims.json' exists; pass --overwrite" in capsys.readouterr().err and out.read_text() == "mine"
    assert main(argv + ["--overwrite"]) == 0
    assert np.array(json.loads(out.read_text())["text"]).shape == (2, 2)
    assert main(["score", tmp_path / "missing.png", "a cat", "--prior", random_demo["prior"]]) == 2
    assert "no such image file" in capsys.readouterr().err


# --------------------------------------------------------------------------- mix
def test_mix_slerp_strip_and_arithmetic(random_demo, tmp_path, capsys):
    common = ["--prior", random_demo["prior"], "--decoder", random_demo["decoder"],
              "--steps", "2", "--prior-steps", "2", "--size", "64x64"]
    out = tmp_path / "strip.png"
    assert main(["mix", "a red cat", "a blue dog", "--slerp", "0,0.5,1", "-o", out, *common]) == 0
    assert PIL.Image.open(out).size == (3 * (64 + 4) + 4, 64 + 8)
    image = tmp_path / "im.png"
    PIL.Image.new("RGB", (32, 32), (20, 30, 200)).save(image)
    out2 = tmp_path / "sum.png"
    assert main(["mix", image, "a red cat", "a cat", "-o", out2, *common]) == 0
    assert PIL.Image.open(out2).size == (64 + 8, 64 + 8)
    assert main(["mix", "a", "b", "-o", tmp_path / "x.png", *common]) == 2  # 2 items, no --slerp
    capsys.readouterr()
    # exists: refused unless --overwrite (mix used to refuse always)
    before = out.read_bytes()
    assert main(["mix", "a", "b", "--slerp", "0,1", "-o", out, *common]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["mix", "a", "b", "--slerp", "0,1", "-o", out, "--overwrite", *common]) == 0
    assert PIL.Image.open(out).size == (2 * (64 + 4) + 4, 64 + 8)
