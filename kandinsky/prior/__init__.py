"""The Kandinsky 2.2 diffusion prior (text -> CLIP image embedding)."""
from kandinsky.prior.model import DiffusionPrior, PriorConfig

__all__ = ["DiffusionPrior", "PriorConfig"]
