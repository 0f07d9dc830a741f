"""Which table module handles which checkpoint class.

Each module ``weights_convert/<component>.py`` defines:
    CONFIG      the kandinsky ComponentConfig subclass (CONFIG.CLASS_NAME = hub class name)
    MODEL       the kandinsky nn.Module class, built as MODEL(config)
    TABLE       list of (hub_prefix, our_prefix) renaming rules (see naming.py)
    HUB_WEIGHTS file stem the reference library writes ("diffusion_pytorch_model" or "model")
"""
from __future__ import annotations

import importlib
from types import ModuleType

from kandinsky.config import ConfigError

# hub class name (diffusers `_class_name`, transformers `architectures[0]`) -> module
_MODULES = {
    "CLIPTextModelWithProjection": "clip_text",
    "CLIPVisionModelWithProjection": "clip_vision",
    "PriorTransformer": "prior",
    "UNet2DConditionModel": "unet",
    "VQModel": "movq",
}


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
        f"{', '.join(sorted(_MODULES))})."
    )


def component_for(config: dict) -> ModuleType:
    name = class_name(config)
    if name not in _MODULES:
        raise ConfigError(
            f"unknown model class {name!r}; kandinsky builds {sorted(_MODULES)}"
        )
    return importlib.import_module(f"weights_convert.{_MODULES[name]}")


def component_for_model(model) -> ModuleType:
    for mod_name in _MODULES.values():
        mod = importlib.import_module(f"weights_convert.{mod_name}")
        if type(model) is mod.MODEL:
            return mod
    raise TypeError(f"{type(model).__name__} is not a kandinsky component model")
