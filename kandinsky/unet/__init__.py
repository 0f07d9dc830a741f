"""The Kandinsky 2.2 decoder UNet (text2img/img2img, inpainting and ControlNet-depth variants)."""
from kandinsky.unet.model import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig"]
