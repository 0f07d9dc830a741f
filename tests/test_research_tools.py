"""Pictures (kandinsky.research.viz, `kandinsky attention`), embedding tools (`kandinsky score`,
`kandinsky mix`) on the tiny demo checkpoints, and docs/research.md's examples."""
from __future__ import annotations

import json
import math
import pathlib
import re

import numpy as np
import PIL.Image
import pytest
import torch

import kandinsky
from kandinsky.demo import build_demo_checkpoints
from kandinsky.research import Record
from kandinsky.research import embeddings as emb
from kandinsky.research import embeddings_cli, viz

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "research.md"


@pytest.fixture(scope="session")
def demo_folders(tmp_path_factory):
    return build_demo_checkpoints(tmp_path_factory.mktemp("research-demo"), seed=0)


@pytest.fixture(scope="session")
def demo_pipe(demo_folders):
    from kandinsky.pipelines.combined import Kandinsky

    return Kandinsky.from_pretrained(demo_folders["decoder"], prior=demo_folders["prior"])


@pytest.fixture(scope="session")
def pictures(demo_pipe):
    return viz.attention_pictures(demo_pipe, "a red cat", steps=[0, 1], trajectory=True, num_inference_steps=2,
                                  prior_num_inference_steps=2, height=64, width=64,
                                  generator=torch.Generator().manual_seed(0), progress=False)


# ----------------------------------------------------------------------------- viz
def test_colormap_is_monotone_from_dark_to_bright():
    values = np.linspace(0, 1, 50)
    rgb = viz.colorize(values).astype(float)
    assert (rgb[0] == viz.COLORMAP[0]).all() and (rgb[-1] == viz.COLORMAP[-1]).all()
    luminance = rgb @ np.array([0.299, 0.587, 0.114])
    assert (np.diff(luminance) >= -1e-6).all()
    assert viz.heatmap(np.eye(4), (40, 20)).size == (40, 20)


def test_image_token_share_and_prd_row_from_probabilities():
    probs = torch.rand(2, 3, 16, 32 + 16).softmax(-1)
    share = viz.image_token_share(probs)
    torch.testing.assert_close(share, probs[..., :32].sum(-1).mean(1))
    prior = torch.rand(2, 4, 3, 81).softmax(-1)
    torch.testing.assert_close(viz.prd_to_text(prior), prior[:, :, 2, :77].mean(1))
    assert viz._grid_shape(8 * 16, aspect=2.0) == (8, 16)
    assert viz.unet_level("unet.up.1.attn.2") == "unet.up.1" and viz.unet_level("unet.mid.attn") == "unet.mid"


def test_words_join_bpe_pieces(demo_pipe):
    words = viz.words_of(demo_pipe.prior.tokenizer, "a red cat")
    assert [w for w, _ in words] == ["<|startoftext|>", "a", "red", "cat", "<|endoftext|>"]
    positions = [p for _, ps in words for p in ps]
    assert positions == list(range(len(positions)))  # every real token once, in order


def test_attention_pictures(pictures, demo_pipe):
    grid, words = pictures["decoder"], pictures["prior"]
    levels = {viz.unet_level(n) for n in kandinsky.module_names(demo_pipe, "unet.*.attn*", size=(64, 64))
              if re.search(r"attn(\.\d+)?$", n)}
    assert grid.size == (64 + (len(levels) + 1) * 128, 18 + 2 * 128 + 22)  # 2 steps, image + one per level
    assert words.size[1] == 20 + 5 * 28 + 26  # one row per word of "a red cat" with start / end tokens
    assert pictures["trajectory"].size[0] > pictures["trajectory"].size[1]  # steps across


def test_prior_word_matrix_equals_the_recorded_probabilities(demo_pipe):
    g = torch.Generator().manual_seed(1)
    with kandinsky.capture(demo_pipe, "prior.blocks.1.attn", attention=True, steps=[0], branch="cond") as rec:
        demo_pipe.prior("a red cat", num_inference_steps=2, generator=g, progress=False)
    probs = rec["prior.blocks.1.attn", 0, "cond"]  # (1, heads, Lq, 81)
    words = viz.words_of(demo_pipe.prior.tokenizer, "a red cat")
    reduced = viz.prd_to_text(probs)
    rec2 = Record()
    rec2.add("prior.blocks.1.attn", 0, "cond", reduced)
    layers, matrix = viz.word_attention(rec2, words)
    expected = [probs[0, :, -1, ps].sum(-1).mean().item() for _, ps in words]
    np.testing.assert_allclose(matrix[:, 0], expected, rtol=1e-5)
    assert matrix.sum() <= 1 + 1e-5  # a share of the prd token's attention


def test_attention_cli_writes_its_pictures(demo_folders, tmp_path, capsys):
    out = tmp_path / "attn.png"
    args = ["a red cat", "--prior", str(demo_folders["prior"]), "--decoder", str(demo_folders["decoder"]),
            "--steps", "2", "--prior-steps", "2", "--size", "64x64", "-o", str(out)]
    assert viz.main(args) == 0
    for suffix in ("", "-words", "-image", "-x0"):
        path = tmp_path / f"attn{suffix}.png"
        assert PIL.Image.open(path).format == "PNG"
    assert viz.main(args[:-1] + [str(tmp_path / "attn.jpg")]) == 2
    assert viz.main(args + ["--at", "5"]) == 2
    assert "--at steps must be in [0, 1]" in capsys.readouterr().err


# ----------------------------------------------------------------------------- embeddings
def test_slerp_and_arithmetic_maths():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(16, generator=g) for _ in range(3))
    path = emb.slerp(a, b, [0, 0.3, 1])
    torch.testing.assert_close(path[0], a)
    torch.testing.assert_close(path[2], b)
    omega = math.acos(float(torch.nn.functional.cosine_similarity(a, b, dim=0)))
    angle = math.acos(float(torch.nn.functional.cosine_similarity(path[1], a, dim=0)))
    assert abs(angle - 0.3 * omega) < 1e-4  # constant angular speed
    assert abs(path[1].norm() - (0.7 * a.norm() + 0.3 * b.norm())) < 1e-4
    mixed = emb.arithmetic(a, b, c)
    torch.testing.assert_close(mixed[0], (a + b - c) * a.norm() / (a + b - c).norm())
    torch.testing.assert_close(emb.arithmetic(a, b, c, keep_norm=False)[0], a + b - c)


def test_similarity_is_clip_cosine(demo_pipe, tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"im{i}.png")
        PIL.Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(paths[-1])
    prompts = ["a red cat", "a dog"]
    sims = emb.similarity(demo_pipe.prior, paths, prompts)
    ie = demo_pipe.prior.encode_image([PIL.Image.open(p).convert("RGB") for p in paths])
    te = demo_pipe.prior.encode_text(prompts)[0]
    expected = torch.nn.functional.cosine_similarity(ie[:, None], te[None], dim=-1)
    torch.testing.assert_close(sims["text"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sims["image"].diagonal(), torch.ones(2))


def test_score_cli_matrix_and_json(demo_folders, tmp_path, capsys):
    image = tmp_path / "im.png"
    PIL.Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    out = tmp_path / "sims.json"
    argv = [str(image), str(image), "a red cat", "a dog", "--prior", str(demo_folders["prior"]), "--json", str(out)]
    assert emb.main(argv) == 0
    data = json.loads(out.read_text())
    assert np.array(data["text"]).shape == (2, 2) and np.allclose(data["image"], 1, atol=1e-5)
    assert "text-image cosine" in capsys.readouterr().out
    assert emb.main(argv) == 2  # the JSON exists: not overwritten
    assert emb.main([str(tmp_path / "missing.png"), "a cat", "--prior", str(demo_folders["prior"])]) == 2
    assert "no such image file" in capsys.readouterr().err


def test_mix_cli_slerp_strip_and_arithmetic(demo_folders, tmp_path, capsys):
    common = ["--prior", str(demo_folders["prior"]), "--decoder", str(demo_folders["decoder"]),
              "--steps", "2", "--prior-steps", "2", "--size", "64x64"]
    out = tmp_path / "strip.png"
    assert embeddings_cli.main(["a red cat", "a blue dog", "--slerp", "0,0.5,1", "-o", str(out)] + common) == 0
    assert PIL.Image.open(out).size == (3 * (64 + 4) + 4, 64 + 8)
    image = tmp_path / "im.png"
    PIL.Image.new("RGB", (32, 32), (20, 30, 200)).save(image)
    out2 = tmp_path / "sum.png"
    assert embeddings_cli.main([str(image), "a red cat", "a cat", "-o", str(out2)] + common) == 0
    assert PIL.Image.open(out2).size == (64 + 8, 64 + 8)
    assert embeddings_cli.main(["a", "b", "-o", str(tmp_path / "x.png")] + common) == 2  # 2 items, no --slerp
    assert embeddings_cli.main(["a", "b", "--slerp", "0,1", "-o", str(out)] + common) == 2  # exists
    assert "exists" in capsys.readouterr().err


def test_mix_decodes_the_slerp_embeddings(demo_pipe):
    """mix() paints exactly the slerp of the two embeddings (same seed -> same picture)."""
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    opts = dict(num_inference_steps=2, height=64, width=64, progress=False, output_type="pt")
    got = embeddings_cli.mix(demo_pipe, ["a red cat", "a dog"], ts=[0.5], generator=g(), prior_steps=2, **opts)
    gen = g()  # one generator, first drawn by the prior, then by the decoder (as mix does)
    e = emb.embed(demo_pipe, ["a red cat", "a dog"], generator=gen, prior_steps=2)
    expected = emb.decode(demo_pipe, emb.slerp(e[0], e[1], [0.5]), generator=gen, **opts).images
    torch.testing.assert_close(got, expected)
    endpoint = embeddings_cli.mix(demo_pipe, ["a red cat", "a dog"], ts=[0.0], generator=g(), prior_steps=2, **opts)
    assert not torch.equal(endpoint, got)  # t matters


# ----------------------------------------------------------------------------- docs/research.md
def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def run_research_doc(folder: pathlib.Path) -> dict:
    """Execute docs/research.md's python blocks in order in ``folder`` (what the pictures in
    docs/images/research-*.png are made with)."""
    import os

    namespace: dict = {"__name__": "research_md"}
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        for i, block in enumerate(python_blocks(DOC.read_text())):
            try:
                exec(compile(block, f"docs/research.md python block {i}", "exec"), namespace)
            except Exception as e:
                raise AssertionError(f"docs/research.md python block {i} failed: {e!r}\n---\n{block}") from e
    finally:
        os.chdir(cwd)
    return namespace


def test_research_doc_examples_run(tmp_path):
    ns = run_research_doc(tmp_path)
    pictures = sorted(p.name for p in tmp_path.glob("research-*.png"))
    linked = sorted(set(re.findall(r"\(images/(research-[\w-]+\.png)\)", DOC.read_text())))
    assert linked and set(linked) <= set(pictures)  # every picture the page shows, it makes
    for name in linked:
        assert (ROOT / "docs" / "images" / name).is_file(), f"docs/images/{name} is not committed"
    assert ns["rec"] is not None


def test_strip_lays_pictures_in_a_row_or_a_grid():
    from kandinsky.research.embeddings_cli import strip

    tiles = [PIL.Image.new("RGB", (10, 6), c) for c in ("red", "green", "blue")]
    assert strip(tiles).size == (3 * 14 + 4, 6 + 8)
    grid = strip(tiles, columns=2)  # two rows: red green / blue
    assert grid.size == (2 * 14 + 4, 2 * 10 + 4)
    assert grid.getpixel((4, 14)) == (0, 0, 255) and grid.getpixel((18, 14)) == (255, 255, 255)
