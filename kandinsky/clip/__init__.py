"""CLIP ViT-bigG/14 encoders of Kandinsky 2.2's prior, their tokenizer and image preprocessing."""
from kandinsky.clip.model import (
    CLIPTextConfig,
    CLIPVisionConfig,
    ImageEncoder,
    TextEncoder,
    TextEncoderOutput,
)
from kandinsky.clip.preprocess import ImagePreprocessor, ImageProcessorConfig
from kandinsky.clip.tokenizer import Tokenizer

__all__ = [
    "CLIPTextConfig",
    "CLIPVisionConfig",
    "TextEncoder",
    "TextEncoderOutput",
    "ImageEncoder",
    "ImagePreprocessor",
    "ImageProcessorConfig",
    "Tokenizer",
]
