"""Image preprocessing for the CLIP image encoder (the checkpoint's ``image_processor/``).

    image -> RGB uint8 -> bicubic resize of the shortest edge to `size` (Pillow)
          -> centre crop `crop_size` x `crop_size` -> * rescale_factor (1/255)
          -> (x - image_mean) / image_std -> (B, 3, crop_size, crop_size) float32

This reproduces, to the bit, transformers 5's CLIP image processor as it runs without
torchvision (``CLIPImageProcessorPil``, which ``CLIPImageProcessor.from_pretrained``
falls back to; with torchvision installed transformers switches to a torch resize
whose numbers differ slightly). Its details, kept here:

* the resized shortest edge is exactly `size`, the other one ``int(size * long / short)``
  (truncated); the crop offsets are ``(h - crop) // 2`` and ``(w - crop) // 2``;
* the resize runs in Pillow on uint8 pixels, so float images are first quantised the way
  transformers does it: ``uint8(float32(x * 255))`` (truncation, not rounding);
* transparency is composited onto a white background (PIL images with an alpha band or
  a transparency key, and 4-channel arrays); grey images are repeated to RGB.

Accepted inputs: a PIL image; a numpy array (H, W, C) or (B, H, W, C), channels last;
a torch tensor (C, H, W) or (B, C, H, W), channels first; or a list of these. C is
1 (grey), 3 (RGB) or 4 (RGBA). Arrays are uint8 (0..255) or floating point in [0, 1].
Note: transformers' processor, called with its defaults on a float array, would divide
by 255 a second time; we treat floats as [0, 1] images (transformers with
``do_rescale=False`` gives our numbers).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import PIL.Image
import torch

from kandinsky.config import ComponentConfig, ConfigError, any_sign

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass
class ImageProcessorConfig(ComponentConfig):
    """``image_processor/preprocessor_config.json`` (defaults: transformers' CLIPImageProcessor)."""

    CLASS_NAME: ClassVar[str] = "CLIPImageProcessor"
    FIXED: ClassVar[dict] = {
        "do_convert_rgb": True,
        "do_resize": True,
        "do_center_crop": True,
        "do_rescale": True,
        "do_normalize": True,
        "resample": 3,  # PIL bicubic
    }
    IGNORED: ClassVar[frozenset] = frozenset({"feature_extractor_type", "image_processor_type", "processor_class"})
    EXTRA_OUT: ClassVar[dict] = {"image_processor_type": "CLIPImageProcessor"}

    size: int = 224  # shortest edge after the resize ({"shortest_edge": n} in newer files)
    crop_size: int = 224  # side of the square centre crop ({"height": n, "width": n})
    image_mean: tuple[float, ...] = any_sign(OPENAI_CLIP_MEAN)
    image_std: tuple[float, ...] = any_sign(OPENAI_CLIP_STD)
    rescale_factor: float = 1 / 255

    def __post_init__(self):
        if isinstance(self.size, dict):
            if set(self.size) != {"shortest_edge"}:
                raise ConfigError(
                    f"preprocessor_config.json: size={self.size!r} is not supported (kandinsky resizes the "
                    "shortest edge: an integer or {'shortest_edge': n})."
                )
            self.size = self.size["shortest_edge"]
        if isinstance(self.crop_size, dict):
            if set(self.crop_size) != {"height", "width"} or self.crop_size["height"] != self.crop_size["width"]:
                raise ConfigError(
                    f"preprocessor_config.json: crop_size={self.crop_size!r} is not supported (a square crop: "
                    "an integer or {'height': n, 'width': n})."
                )
            self.crop_size = self.crop_size["height"]
        self.image_mean = tuple(self.image_mean)
        self.image_std = tuple(self.image_std)

    def check_sizes(self, source: str = "preprocessor_config.json") -> None:
        if self.crop_size > self.size:
            raise ConfigError(
                f"{source}: crop_size={self.crop_size} > size={self.size} would need padding, which "
                "kandinsky does not implement."
            )
        for key in ("image_mean", "image_std"):
            if len(getattr(self, key)) != 3:
                raise ConfigError(f"{source}: {key}={getattr(self, key)!r} must have 3 values (RGB).")
        if any(s == 0 for s in self.image_std):
            raise ConfigError(f"{source}: image_std={self.image_std!r} has a zero.")


class ImagePreprocessor:
    """Images -> CLIP image-encoder input (B, 3, crop_size, crop_size) float32."""

    def __init__(self, config: ImageProcessorConfig | None = None):
        self.config = config or ImageProcessorConfig()

    @classmethod
    def from_dict(cls, config: dict) -> "ImagePreprocessor":
        return cls(ImageProcessorConfig.from_dict(config, source="preprocessor_config.json"))

    @classmethod
    def from_folder(cls, folder) -> "ImagePreprocessor":
        """Read ``preprocessor_config.json`` from a checkpoint's ``image_processor/`` folder."""
        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (the image processor config of the checkpoint).")
        return cls(ImageProcessorConfig.from_dict(json.loads(path.read_text()), source=str(path)))

    def __call__(self, images) -> torch.Tensor:
        pixels = [self.preprocess(image) for image in _flatten(images)]
        return torch.from_numpy(np.stack(pixels))  # (B, 3, crop, crop)

    def preprocess(self, image) -> np.ndarray:
        """One image -> (3, crop, crop) float32."""
        cfg = self.config
        rgb = to_rgb_uint8(image)  # (H, W, 3) uint8
        h, w = rgb.shape[:2]
        out_h, out_w = shortest_edge_size(h, w, cfg.size)
        resized = np.asarray(PIL.Image.fromarray(rgb).resize((out_w, out_h), resample=PIL.Image.BICUBIC))
        top, left = (out_h - cfg.crop_size) // 2, (out_w - cfg.crop_size) // 2
        crop = resized[top : top + cfg.crop_size, left : left + cfg.crop_size]  # (crop, crop, 3)
        x = (crop.transpose(2, 0, 1).astype(np.float64) * cfg.rescale_factor).astype(np.float32)  # (3, crop, crop)
        mean = np.array(cfg.image_mean, dtype=np.float32)[:, None, None]
        std = np.array(cfg.image_std, dtype=np.float32)[:, None, None]
        return (x - mean) / std


def shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) with the shortest edge == size, the other scaled and truncated."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


# --------------------------------------------------------------------------- input handling
def _flatten(images) -> list:
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images given (empty list).")
        return [one for image in images for one in _flatten(image)]
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return list(images)  # (B, C, H, W) -> B x (C, H, W)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)  # (B, H, W, C) -> B x (H, W, C)
    return [images]


def to_rgb_uint8(image) -> np.ndarray:
    """PIL image, numpy (H, W, C) or torch (C, H, W) -> (H, W, 3) uint8."""
    if isinstance(image, PIL.Image.Image):
        has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
        if has_alpha:  # composite onto white, as transformers does
            white = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = PIL.Image.alpha_composite(white, image.convert("RGBA"))
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        if image.ndim != 3:
            raise ValueError(
                f"a torch image must be (C, H, W) or (B, C, H, W) channels first, got shape {tuple(image.shape)}."
            )
        image = image.detach().cpu()
        if image.dtype == torch.bfloat16:
            image = image.float()
        image = image.permute(1, 2, 0).numpy()  # (H, W, C)
        layout = "torch (C, H, W)"
    elif isinstance(image, np.ndarray):
        if image.ndim != 3:
            raise ValueError(
                f"a numpy image must be (H, W, C) or (B, H, W, C) channels last, got shape {image.shape}."
            )
        layout = "numpy (H, W, C)"
    else:
        raise TypeError(
            f"unsupported image type {type(image).__name__}: give a PIL image, a numpy array, a torch tensor "
            "or a list of them."
        )
    channels = image.shape[-1]
    if channels not in (1, 3, 4):
        raise ValueError(
            f"{layout} image with {channels} channels (shape {image.shape}); expected 1 (grey), 3 (RGB) or "
            "4 (RGBA) channels."
        )
    if image.dtype == np.uint8:
        pass
    elif np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
            raise ValueError(
                f"a floating point image must hold values in [0, 1], got [{image.min()}, {image.max()}] "
                "(give uint8 for 0..255 pixels)."
            )
    else:
        raise TypeError(f"image dtype {image.dtype} is not supported: use uint8 (0..255) or float in [0, 1].")

    if channels == 1:
        image = np.repeat(image, 3, axis=-1)
    elif channels == 4:  # composite onto white (the same arithmetic as transformers)
        white = 255 if image.dtype == np.uint8 else 1.0
        alpha = image[..., 3:4] / white
        rgb = alpha * image[..., :3] + (1 - alpha) * white
        image = np.round(rgb).astype(np.uint8) if white == 255 else rgb.astype(image.dtype)
    if image.dtype != np.uint8:  # quantise like transformers before the Pillow resize (truncates)
        image = (image.astype(np.float64) * 255).astype(np.float32).astype(np.uint8)
    return np.ascontiguousarray(image)
