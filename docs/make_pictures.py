"""Remake the pictures of the shipped shapes model that README.md and docs/ show.

    python docs/make_pictures.py            # all: docs/images/demo-shapes.png, usage-shapes-steps.png, research-*.png

Each picture is made by the command or the doc example it illustrates, on kandinsky/demo_weights, so
after new demo weights are shipped this one command brings the pictures up to date (then read the
pages' descriptions of them again: they say what the pictures show).
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import PIL.Image

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"
# README.md: the first command's prompt, then three more of the grammar
README_PROMPTS = (
    "a red circle on a blue background",
    "a large yellow triangle on the left on a black background",
    "a small green square at the top on a white background",
    "a purple circle on the right on a orange background",
)


def demo_shapes(folder: Path) -> None:
    """README.md: ``kandinsky text2img --demo PROMPT -o out.png`` (defaults: 20 steps, seed 0) for each prompt,
    64 x 64 shown at 128."""
    from kandinsky.cli import main
    from kandinsky.research.embeddings import strip

    tiles = []
    for k, prompt in enumerate(README_PROMPTS):
        path = folder / f"demo-{k}.png"
        assert main(["text2img", "--demo", prompt, "-o", str(path)]) == 0
        tiles.append(PIL.Image.open(path).resize((128, 128), PIL.Image.NEAREST))
    strip(tiles).save(IMAGES / "demo-shapes.png")


def usage_steps(folder: Path) -> None:
    """docs/usage.md, "x0 at every step": the shapes model's trajectory grid."""
    import torch

    from kandinsky import Kandinsky
    from kandinsky.demo import demo_folders
    from kandinsky.sampling.trajectory import save_x0_grid

    shapes = demo_folders()
    pipe = Kandinsky.from_pretrained(shapes["decoder"], prior=shapes["prior"])
    out = pipe.text2img(["a large red triangle on a blue background", "a small white circle at the top"],
                        height=64, width=64, num_inference_steps=20, return_trajectory=True,
                        progress=False, generator=torch.Generator().manual_seed(0))
    save_x0_grid(out.trajectory, pipe.decoder.movq, str(folder / "shapes-steps.png"), every=2, size=64)
    shutil.copy(folder / "shapes-steps.png", IMAGES / "usage-shapes-steps.png")


def research(folder: Path) -> None:
    """docs/research.md: its python blocks, run in order (the test does the same), pictures kept."""
    sys.path.insert(0, str(ROOT))
    from tests.test_research_docs import run_research_doc

    run_research_doc(folder)
    for picture in sorted(folder.glob("research-*.png")):
        shutil.copy(picture, IMAGES / picture.name)
        print("wrote", IMAGES / picture.name)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        demo_shapes(Path(tmp))
        usage_steps(Path(tmp))
        research(Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
