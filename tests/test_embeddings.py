"""kandinsky/research/embeddings.py: slerp and arithmetic maths, CLIP similarity, mix and strip, on the tiny
random demo checkpoints (the commands `kandinsky score` and `kandinsky mix`: tests/test_cli_research.py)."""
from __future__ import annotations

import math

import numpy as np
import PIL.Image
import torch

from kandinsky.research import embeddings as emb


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


def test_similarity_is_clip_cosine(random_demo_kandinsky, tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"im{i}.png")
        PIL.Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(paths[-1])
    prompts = ["a red cat", "a dog"]
    sims = emb.similarity(random_demo_kandinsky.prior, paths, prompts)
    ie = random_demo_kandinsky.prior.encode_image([PIL.Image.open(p).convert("RGB") for p in paths])
    te = random_demo_kandinsky.prior.encode_text(prompts)[0]
    expected = torch.nn.functional.cosine_similarity(ie[:, None], te[None], dim=-1)
    torch.testing.assert_close(sims["text"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sims["image"].diagonal(), torch.ones(2))


def test_mix_decodes_the_slerp_embeddings(random_demo_kandinsky):
    """mix() paints exactly the slerp of the two embeddings (same seed -> same picture)."""
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    opts = dict(num_inference_steps=2, height=64, width=64, progress=False, output_type="pt")
    got = emb.mix(random_demo_kandinsky, ["a red cat", "a dog"], ts=[0.5], generator=g(), prior_steps=2, **opts)
    gen = g()  # one generator, first drawn by the prior, then by the decoder (as mix does)
    e = emb.embed(random_demo_kandinsky, ["a red cat", "a dog"], generator=gen, prior_steps=2)
    expected = emb.decode(random_demo_kandinsky, emb.slerp(e[0], e[1], [0.5]), generator=gen, **opts).images
    torch.testing.assert_close(got, expected)
    endpoint = emb.mix(random_demo_kandinsky, ["a red cat", "a dog"], ts=[0.0], generator=g(), prior_steps=2, **opts)
    assert not torch.equal(endpoint, got)  # t matters



def test_strip_lays_pictures_in_a_row_or_a_grid():
    tiles = [PIL.Image.new("RGB", (10, 6), c) for c in ("red", "green", "blue")]
    assert emb.strip(tiles).size == (3 * 14 + 4, 6 + 8)
    grid = emb.strip(tiles, columns=2)  # two rows: red green / blue
    assert grid.size == (2 * 14 + 4, 2 * 10 + 4)
    assert grid.getpixel((4, 14)) == (0, 0, 255) and grid.getpixel((18, 14)) == (255, 255, 255)
