"""What the research tools point at: a model or a pipeline, its modules by name, their outputs.

    components(pipe)                  [("prior", DiffusionPrior), ("text_encoder", ...), ...]
    named_modules(pipe)               {"unet.mid": MidBlock, ...}: component-prefixed names
    match(pipe, "unet.up.*.attn.*")   the modules a glob names (an error when it names none)
    attention_layout(module)          what an attention layer's keys are, as the layer declares it

Module outputs may be tensors nested in tuples, lists and dataclasses; :func:`map_tensors`
walks them (capture splits, shrinks and measures records with it; inspect reads their shapes).
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Callable

import torch
from torch import nn

# Pipeline class -> the components it holds, as (name prefix, attribute path).
PIPELINE_COMPONENTS = {
    "PriorPipeline": [("prior", "prior"), ("text_encoder", "text_encoder"), ("image_encoder", "image_encoder")],
    "DecoderPipeline": [("unet", "unet"), ("movq", "movq")],
    "Kandinsky": [("prior", "prior.prior"), ("text_encoder", "prior.text_encoder"),
                  ("image_encoder", "prior.image_encoder"), ("unet", "decoder.unet"), ("movq", "decoder.movq")],
}


# ----------------------------------------------------------------------------- names
def components(target) -> list[tuple[str, nn.Module]]:
    """[(name prefix, model)] of a model ("" prefix) or a pipeline (component prefixes)."""
    if isinstance(target, nn.Module):
        if hasattr(target, "_orig_mod"):  # torch.compile's wrapper
            raise TypeError(
                "target is a torch.compile'd model: a compiled graph does not run hooks added after "
                "compiling, so nothing would be recorded or edited. Capture / edit the eager model "
                "(target._orig_mod) and call that one."
            )
        return [("", target)]
    table = PIPELINE_COMPONENTS.get(type(target).__name__)
    if table is None:
        raise TypeError(
            f"target must be a torch model (nn.Module) or a pipeline ({', '.join(PIPELINE_COMPONENTS)}), "
            f"got {type(target).__name__}"
        )
    out = []
    for prefix, path in table:
        obj = target
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None:
            out.append((prefix, obj))
    return out


def prefixed(prefix: str, name: str) -> str:
    """'unet' + 'mid' -> 'unet.mid'; '' + 'mid' -> 'mid'."""
    return ".".join(p for p in (prefix, name) if p)


def named_modules(target) -> dict[str, nn.Module]:
    """Every module of ``target`` by name (pipelines: component-prefixed, the component itself included)."""
    names = {}
    for prefix, model in components(target):
        for name, module in model.named_modules():
            full = prefixed(prefix, name)
            if full:
                names[full] = module
    return names


def match(target, patterns, *, only: Callable[[nn.Module], bool] | None = None,
          what: str = "module") -> dict[str, nn.Module]:
    """The modules whose names match any glob in ``patterns`` (``*`` also crosses dots).
    A pattern that matches nothing is an error naming it."""
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"patterns must be a glob string or a list of them (e.g. 'unet.mid', 'unet.up.*.attn.*'), "
                        f"got {patterns!r}")
    modules = {n: m for n, m in named_modules(target).items() if only is None or only(m)}
    found = {}
    for pattern in patterns:
        hits = {n: m for n, m in modules.items() if fnmatch.fnmatchcase(n, pattern)}
        if not hits:
            close = [n for n in modules if fnmatch.fnmatchcase(n, pattern.split(".")[0] + "*")][:8]
            raise ValueError(
                f"pattern {pattern!r} matches no {what} of this {type(target).__name__}"
                + (f"; names near it: {', '.join(close)}" if close else "")
                + "; list them with kandinsky.module_names(target)"
            )
        found.update(hits)
    return found


# ----------------------------------------------------------------------------- attention layers
def attention_layout(module: nn.Module) -> dict | None:
    """What an attention layer's keys are, as the layer declares it (``token_layout()``):
    {"kind": "self"}, {"kind": "added_kv", "image_tokens": 32}, {"kind": "prior", "text_tokens": T,
    "prd_token": -1}; None for a module that is not an attention layer."""
    layout = getattr(module, "token_layout", None)
    return layout() if callable(layout) else None


def is_attention(module: nn.Module) -> bool:
    return attention_layout(module) is not None



# ----------------------------------------------------------------------------- outputs
def map_tensors(fn, x):
    """``x`` with ``fn`` applied to every tensor in it (inside tuples, lists and dataclasses too)."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (tuple, list)):
        return type(x)(map_tensors(fn, y) for y in x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: map_tensors(fn, getattr(x, f.name)) for f in dataclasses.fields(x)})
    return x


def tensors(x) -> list:
    """The tensors in ``x``, in order."""
    out = []
    map_tensors(out.append, x)
    return out
