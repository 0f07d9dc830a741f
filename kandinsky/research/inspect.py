"""``kandinsky inspect COMPONENT``: the module tree with parameter counts and the output shape
of every block at a given image size, computed on the meta device (no weights, no memory).

    kandinsky inspect unet --size 768x768 --depth 2
    kandinsky inspect prior
    kandinsky inspect movq --checkpoint ./my-decoder          # a checkpoint or component folder

The real hub configs of the four Kandinsky 2.2 checkpoints ship in ``kandinsky/configs``, so
this works offline. :func:`module_names` (``kandinsky.module_names``) gives the shapes of the
modules a glob names, on a model or a pipeline.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kandinsky.pipelines.tasks import CHECKPOINTS, PRIOR_CHECKPOINT
from kandinsky.research.targets import components, match, prefixed, tensors

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _shipped(kind: str) -> str:
    """The hub repo of a checkpoint kind (kandinsky.pipelines.tasks) by its name: its folder in CONFIGS."""
    return {"prior": PRIOR_CHECKPOINT, **CHECKPOINTS}[kind].split("/")[-1]


# COMPONENT -> (shipped checkpoint, component folder)
COMPONENTS = {
    "text_encoder": (_shipped("prior"), "text_encoder"),
    "image_encoder": (_shipped("prior"), "image_encoder"),
    "prior": (_shipped("prior"), "prior"),
    "unet": (_shipped("decoder"), "unet"),
    "unet-inpaint": (_shipped("inpaint"), "unet"),
    "unet-controlnet": (_shipped("controlnet"), "unet"),
    "movq": (_shipped("decoder"), "movq"),
}


# ----------------------------------------------------------------------------- models on meta
def meta_model(config: dict) -> nn.Module:
    """Our model for a component config.json dict, on the meta device."""
    from weights_convert import build_model

    with torch.device("meta"):
        return build_model(config)


def shipped_config(component: str) -> dict:
    checkpoint, folder = COMPONENTS[component]
    return json.loads((CONFIGS / checkpoint / folder / "config.json").read_text())


def _on_meta(model: nn.Module) -> nn.Module:
    if all(p.device.type == "meta" for p in model.parameters()):
        return model
    with torch.device("meta"):
        return type(model)(model.config)


SIZE_FORMAT = "give WIDTHxHEIGHT in pixels, e.g. 512x768 (or one number for a square)"


def read_size(size) -> tuple[int, int]:
    """(width, height) from "WxH" (one number: a square), an int (a square) or a (W, H) pair, each side a
    positive number of pixels; the one reader of a size (``--size``'s argparse type calls it)."""
    if isinstance(size, str):
        try:
            values = [int(part) for part in size.lower().split("x")]
        except ValueError:
            values = []
        if len(values) not in (1, 2) or min(values) < 1:
            raise ValueError(f"{size!r} is not a size: {SIZE_FORMAT}")
        return values[0], values[-1]
    if isinstance(size, int):
        w = h = size
    else:
        try:
            w, h = (int(s) for s in size)
        except (TypeError, ValueError):
            raise ValueError(f"size must be (width, height), 'WxH' or an int, got {size!r}") from None
    if w < 1 or h < 1:
        raise ValueError(f"size {w}x{h}: width and height must be positive numbers of pixels")
    return w, h


def parse_size(size) -> tuple[int, int]:
    """(width, height) from "WxH", an int (square) or a (W, H) pair (read_size), each side a multiple of 64."""
    w, h = read_size(size)
    if w % 64 or h % 64:
        raise ValueError(f"size {w}x{h}: width and height must be positive multiples of 64 "
                         "(the MoVQ factor 8 times the UNet's 3 halvings)")
    return w, h


def example_call(model: nn.Module, size, batch: int = 1):
    """Call ``model`` (on meta) on inputs of the right shapes for images of ``size``."""
    from kandinsky.clip.model import ImageEncoder, TextEncoder
    from kandinsky.movq.model import MoVQ
    from kandinsky.prior.model import DiffusionPrior
    from kandinsky.unet.model import UNet

    cfg, B, meta = model.config, batch, dict(device="meta")
    w, h = parse_size(size)
    if isinstance(model, UNet):
        hint = torch.empty(B, 3, h, w, **meta) if cfg.addition_embed_type == "image_hint" else None
        return model(torch.empty(B, cfg.sample_channels, h // 8, w // 8, **meta), torch.tensor(999, **meta),
                     torch.empty(B, cfg.encoder_hid_dim, **meta), hint=hint)
    if isinstance(model, MoVQ):
        return model(torch.empty(B, cfg.in_channels, h, w, **meta))  # encode, quantize, decode
    if isinstance(model, DiffusionPrior):
        T = cfg.num_embeddings
        return model(torch.empty(B, cfg.embedding_dim, **meta), torch.tensor(999, **meta),
                     torch.empty(B, cfg.text_embed_dim, **meta), torch.empty(B, T, cfg.embedding_dim, **meta),
                     torch.ones(B, T, dtype=torch.bool, **meta))
    if isinstance(model, TextEncoder):
        return model(torch.zeros(B, cfg.max_position_embeddings, dtype=torch.long, **meta))
    if isinstance(model, ImageEncoder):
        return model(torch.empty(B, cfg.num_channels, cfg.image_size, cfg.image_size, **meta))
    raise TypeError(f"no example inputs for {type(model).__name__}; expected a kandinsky component")


def _shape(x):
    shapes = [tuple(t.shape) for t in tensors(x)]
    return shapes[0] if len(shapes) == 1 else (tuple(shapes) or None)


def output_shapes(model: nn.Module, size=(512, 512), batch: int = 1) -> dict[str, tuple | None]:
    """{name: output shape} of every module of ``model`` ("" = the model) for images of ``size``."""
    model = _on_meta(model)
    shapes: dict[str, tuple | None] = {name: None for name, _ in model.named_modules()}
    handles = [m.register_forward_hook(lambda mod, a, out, name=name: shapes.__setitem__(name, _shape(out)))
               for name, m in model.named_modules()]
    try:
        with torch.no_grad():
            example_call(model, size, batch)
    finally:
        for hd in handles:
            hd.remove()
    return shapes


def module_names(target, pattern: str = "*", size=(512, 512), batch: int = 1) -> dict[str, tuple | None]:
    """{name: output shape} of the modules matching ``pattern``, for images of ``size``
    ((width, height) or "WxH"), computed on the meta device (no memory, no weights touched).
    A module the example forward does not reach (e.g. the hint encoder of a text2img UNet)
    has shape None; a module with several outputs has a tuple of shapes."""
    names = match(target, pattern)
    shapes = {}
    for prefix, model in components(target):
        for name, shape in output_shapes(model, size, batch).items():
            shapes[prefixed(prefix, name)] = shape
    return {n: shapes.get(n) for n in names}


# ----------------------------------------------------------------------------- the tree
@dataclass
class Row:
    name: str  # "" for the model itself
    kind: str  # class name
    params: int  # parameters of the module and everything under it
    shape: tuple | None  # output shape at the size asked; None when not called


def tree(model: nn.Module, size=(512, 512), depth: int | None = 2, batch: int = 1) -> list[Row]:
    """One Row per module up to ``depth`` dots deep (None: all), in definition order."""
    shapes = output_shapes(model, size, batch)
    rows = []
    for name, module in _on_meta(model).named_modules():
        if depth is not None and name and name.count(".") >= depth:
            continue
        rows.append(Row(name, type(module).__name__, sum(p.numel() for p in module.parameters()), shapes[name]))
    return rows


def _fmt_shape(shape) -> str:
    if shape is None:
        return "-"
    if shape and isinstance(shape[0], tuple):
        return ", ".join(_fmt_shape(s) for s in shape)
    return "(" + ", ".join(["B"] + [str(s) for s in shape[1:]]) + ")"


def _label(r: Row) -> str:
    return "  " * (r.name.count(".") + bool(r.name)) + (r.name.split(".")[-1] or "(model)")


def format_text(rows: list[Row]) -> str:
    width = max(len(_label(r)) for r in rows) + 2
    kinds = max(len(r.kind) for r in rows) + 2
    lines = [f"{'module':<{width}}{'class':<{kinds}}{'parameters':>15}  output"]
    for r in rows:
        label = _label(r)
        lines.append(f"{label:<{width}}{r.kind:<{kinds}}{r.params:>15,}  {_fmt_shape(r.shape)}")
    return "\n".join(lines)


def format_markdown(rows: list[Row]) -> str:
    """The table docs/architecture.md carries (full names, so it can be searched)."""
    lines = ["| module | class | parameters | output |", "| --- | --- | ---: | --- |"]
    for r in rows:
        lines.append(f"| `{r.name or '(model)'}` | {r.kind} | {r.params:,} | {_fmt_shape(r.shape)} |")
    return "\n".join(lines)
