"""LoRA for kandinsky's models: add and train adapters, save them (PEFT layout), load the
Kandinsky 2.2 LoRA files in the wild, mix several with their own scales, merge them.

    params = add_lora(prior, rank=8)                 # train these; the prior's own weights are frozen
    save_lora(prior, "out/lora")                     # adapter_model.safetensors + adapter_config.json
    load_lora(pipe, "style.safetensors", scale=0.8)  # a model or a pipeline; any known format
    set_scale(pipe, "style", 0.5); merge(pipe); unmerge(pipe); remove_lora(pipe)

See docs/lora.md.
"""
from kandinsky.lora.cli import add_lora_argument, apply_lora_args, parse_lora_arg
from kandinsky.lora.files import load_lora, lora_format, save_lora
from kandinsky.lora.layers import (
    COMPONENTS,
    LoRAAdapter,
    LoRAError,
    LoRALinear,
    adapters,
    add_lora,
    has_lora,
    lora_layers,
    lora_parameters,
    merge,
    remove_lora,
    set_scale,
    unmerge,
)

__all__ = [
    "COMPONENTS", "LoRAAdapter", "LoRAError", "LoRALinear", "adapters", "add_lora", "add_lora_argument",
    "apply_lora_args", "has_lora",
    "load_lora", "lora_format", "lora_layers", "lora_parameters", "merge", "parse_lora_arg", "remove_lora",
    "save_lora", "set_scale", "unmerge",
]
