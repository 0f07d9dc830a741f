"""Procedural shapes: the data set, its analyser, and the tiny model trained on it.

    kandinsky.data.shapes      pictures + captions of the shapes grammar, from a seed
    kandinsky.data.analyse     what a picture shows (colours, shape, size, position)
    kandinsky.data.evaluate    ``kandinsky eval shapes``: accuracy of a checkpoint on the grammar
    kandinsky.data.train_demo  ``kandinsky train-demo``: reproduce the shipped weights

``demo_folders()`` gives the shipped checkpoints (kandinsky/demo_weights/).
"""
from __future__ import annotations

from pathlib import Path

DEMO_WEIGHTS = Path(__file__).resolve().parent.parent / "demo_weights"
DEMO_REPOS = ("prior", "decoder", "decoder-inpaint")


def demo_folders() -> dict[str, Path]:
    """{"prior", "decoder", "inpaint"} -> the shipped tiny trained checkpoint folders (hub layout).

    Raises FileNotFoundError naming the fix when the package has no shipped weights.
    """
    folders = {"prior": DEMO_WEIGHTS / "prior", "decoder": DEMO_WEIGHTS / "decoder",
               "inpaint": DEMO_WEIGHTS / "decoder-inpaint"}
    missing = [str(f) for f in folders.values() if not (f / "model_index.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"the shipped demo weights are missing ({', '.join(missing)}); reinstall the package, or "
            f"rebuild them with `kandinsky train-demo --out {DEMO_WEIGHTS}`."
        )
    return folders
