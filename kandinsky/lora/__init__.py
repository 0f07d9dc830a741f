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


class LoRAError(ValueError):
    """A LoRA file, adapter name or argument kandinsky cannot use (the message says why and what to do)."""


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


__all__ = ["LoRAError", *_LAZY]
