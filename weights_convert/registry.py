"""Which checkpoint class is which kandinsky component: one row per component.

A row (``Component``) holds what the loader needs to know about a component and nothing else:

    config       the kandinsky ComponentConfig subclass (config.CLASS_NAME = the hub class name)
    model        the kandinsky nn.Module class, built as model(config)
    hub_weights  the file stem the reference library writes ("diffusion_pytorch_model" or "model")
    table        (hub_prefix, our_prefix) renaming rules (naming.py), from weights_convert/<component>.py
    legacy_table old hub name -> current hub name, for files older libraries wrote (read only)
    legacy_ours  old name -> current name in kandinsky-layout files older kandinsky versions wrote (read only)
    drop_keys    hub tensors that hold no weights (old persistent buffers), dropped on load
"""
from __future__ import annotations

import dataclasses

from kandinsky.clip.model import CLIPTextConfig, CLIPVisionConfig, ImageEncoder, TextEncoder
from kandinsky.config import ConfigError
from kandinsky.movq.model import MoVQ, MoVQConfig
from kandinsky.prior.model import DiffusionPrior, PriorConfig
from kandinsky.unet.model import UNet, UNetConfig
from weights_convert import clip_text, clip_vision, movq, prior, unet
from weights_convert.naming import Table


@dataclasses.dataclass(frozen=True)
class Component:
    config: type
    model: type
    hub_weights: str
    table: Table
    legacy_table: Table = ()
    drop_keys: tuple[str, ...] = ()
    legacy_ours: Table = ()


COMPONENTS = [
    Component(CLIPTextConfig, TextEncoder, "model", clip_text.TABLE, drop_keys=clip_text.DROP_KEYS),
    Component(CLIPVisionConfig, ImageEncoder, "model", clip_vision.TABLE, drop_keys=clip_vision.DROP_KEYS),
    Component(PriorConfig, DiffusionPrior, "diffusion_pytorch_model", prior.TABLE, legacy_ours=prior.LEGACY_OURS),
    Component(UNetConfig, UNet, "diffusion_pytorch_model", unet.TABLE),
    Component(MoVQConfig, MoVQ, "diffusion_pytorch_model", movq.TABLE, legacy_table=movq.LEGACY_TABLE),
]
# hub class name (diffusers `_class_name`, transformers `architectures[0]`) -> component
BY_CLASS_NAME = {c.config.CLASS_NAME: c for c in COMPONENTS}


def class_name(config: dict) -> str:
    if "_class_name" in config:
        return config["_class_name"]
    arch = config.get("architectures") or []
    if arch:
        return arch[0]
    hint = f" (its model_type is {config['model_type']!r})" if "model_type" in config else ""
    raise ConfigError(
        "config has neither `_class_name` (diffusers) nor `architectures` (transformers), so the model "
        f"class is unknown{hint}; add the class, e.g. \"architectures\": [\"CLIPTextModelWithProjection\"] "
        "or \"_class_name\": \"UNet2DConditionModel\" (kandinsky builds "
        f"{', '.join(sorted(BY_CLASS_NAME))})."
    )


def component_for(config: dict) -> Component:
    name = class_name(config)
    if name not in BY_CLASS_NAME:
        raise ConfigError(f"unknown model class {name!r}; kandinsky builds {sorted(BY_CLASS_NAME)}")
    return BY_CLASS_NAME[name]


def component_for_model(model) -> Component:
    for component in COMPONENTS:
        if type(model) is component.model:
            return component
    raise TypeError(f"{type(model).__name__} is not a kandinsky component model")
