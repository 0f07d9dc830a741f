"""LoRA for kandinsky's models: add and train adapters, save them (PEFT layout), load the
Kandinsky 2.2 LoRA files in the wild, mix several with their own scales, merge them.

    params = add_lora(prior, rank=8)                 # train these; the prior's own weights are frozen
    save_lora(prior, "out/lora")                     # adapter_model.safetensors + adapter_config.json
    load_lora(pipe, "style.safetensors", scale=0.8)  # a model or a pipeline; any known format
    set_scale(pipe, "style", 0.5); merge(pipe); unmerge(pipe); remove_lora(pipe)

    layers.py   the adapted layer (LoRALinear) and what acts on adapters in memory
    files.py    saving and loading files, the formats in the wild
    args.py     the FILE[:SCALE] form of the CLI's --lora (the option itself: kandinsky.cli.common)

Names load lazily (``import kandinsky.lora`` does not import torch: the CLI's ``--help`` stays fast).
See docs/lora.md.
"""


import math
import numbers


class LoRAError(ValueError):
    """A LoRA file, adapter name or argument kandinsky cannot use (the message says why and what to do)."""


MAX_SCALE = 10.0  # a LoRA's strength: about 0-2 in use; beyond +-10 the adapter swamps the weights it adapts


def check_scale(scale, who: str) -> float:
    """``scale``, a LoRA's strength (1.0 = as trained, 0 = off, negative = away from it), as a float; else
    LoRAError naming ``who`` (the call or argument), the value and the range: a finite number within
    +-MAX_SCALE. The one check for every door that takes a strength: ``load_lora``, ``set_scale``, the
    CLI's ``--lora FILE:SCALE`` (``parse_lora_arg``)."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise LoRAError(f"{who}: a LoRA's strength must be a number (1.0 = as trained, 0 = off), not {scale!r}.")
    if not (math.isfinite(scale) and abs(scale) <= MAX_SCALE):
        raise LoRAError(f"{who}: strength {float(scale):g} is out of range: a LoRA's strength is a finite number "
                        f"from {-MAX_SCALE:g} to {MAX_SCALE:g}, about 0-2 in use (1.0 = as trained, 0 = off).")
    return float(scale)


def check_lora_file(path) -> None:
    """Refuse a file that is not LoRA weights by its first bytes, before torch reads it (nothing is ever
    unpickled to find out): a safetensors file (an 8-byte header length, then '{'), a torch zip archive
    or a pickle pass. The one check for every door: ``load_lora``, ``lora_format``, the CLI's ``--lora``."""
    with open(path, "rb") as f:
        head = f.read(9)
    if not (head[8:9] == b"{" or head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise LoRAError(f"{path}: not a LoRA weights file (a .safetensors file, a torch .bin / .pt file, or a PEFT "
                        "adapter folder); nothing was loaded from it.")


_LAZY = {
    **dict.fromkeys(["COMPONENTS", "LoRAAdapter", "LoRALinear", "adapters", "add_lora", "has_lora", "lora_layers",
                     "lora_parameters", "merge", "remove_lora", "set_scale", "unmerge"], "kandinsky.lora.layers"),
    **dict.fromkeys(["load_lora", "lora_format", "save_lora"], "kandinsky.lora.files"),
    **dict.fromkeys(["apply_lora_args", "parse_lora_arg"], "kandinsky.lora.args"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kandinsky.lora' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])


__all__ = ["LoRAError", "MAX_SCALE", "check_lora_file", "check_scale", *_LAZY]
