"""MoVQ, the Kandinsky 2.2 image autoencoder: ``encode`` images to latents, ``decode`` latents to images."""
from kandinsky.movq.model import MoVQ, MoVQConfig

__all__ = ["MoVQ", "MoVQConfig"]
