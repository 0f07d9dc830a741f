"""The bridge between Hugging Face checkpoint folders and kandinsky's models.

    build_model(config)              our nn.Module from a component's config.json dict
    convert_state_dict(config, sd)   hub tensor names -> ours (pure renaming; works on meta)
    load_component(folder)           a component folder (hub or kandinsky layout) -> loaded model
    save_component(model, folder)    write a folder the reference library (or kandinsky) loads

Renaming rules live as data, one table per component (weights_convert/<component>.py), and
one row per component says which classes and files it is (weights_convert/registry.py);
this module knows nothing about sampling, the pipelines know nothing about weight names.
"""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch
from torch import nn

from kandinsky.config import ConfigError
from weights_convert.io import (
    KANDINSKY_STEM,
    WeightsError,
    WeightsNotFoundError,
    find_weight_files,
    read_weights,
    write_safetensors,
)
from weights_convert.naming import rename, rename_all
from weights_convert.registry import class_name, component_for, component_for_model

__all__ = [
    "ConfigError",
    "WeightsError",
    "WeightsNotFoundError",
    "build_model",
    "convert_state_dict",
    "load_component",
    "save_component",
    "read_config",
]

# Marks a folder written with layout="kandinsky" (our tensor names).
LAYOUT_KEY = "_kandinsky_layout"
# Weight files and shard indexes in any form the loader reads.
_WEIGHT_FILE = re.compile(r"\.(safetensors|bin)$|\.(safetensors|bin)\.index(\.[\w-]+)?\.json$")


@contextlib.contextmanager
def skip_init():
    """Build modules without running ``torch.nn.init`` (their ``reset_parameters``): for models whose
    every parameter is then assigned from a file. On the meta device the init computes nothing but
    still costs Python time: 0.09 s of a 0.16 s full-size UNet build. Tensors that modules compute
    themselves (buffers such as position ids) are not initialisers and are made as usual."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, _keep)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def _keep(tensor, *args, **kwargs):
    return tensor


def build_model(config: dict) -> nn.Module:
    """Our model for a component's config.json dict (dispatch on its class name).

    Works under ``with torch.device("meta"):``. Raises ConfigError for classes or
    config values kandinsky does not implement, naming the key and value.
    """
    comp = component_for(config)
    return comp.model(comp.config.from_dict(config, source=f"{class_name(config)} config"))


def convert_state_dict(config: dict, state_dict: dict, reverse: bool = False) -> dict:
    """Rename a reference state dict to ours (``reverse=True``: ours to the reference's).

    Pure renaming: the tensors themselves are the same objects (no copies), so this
    works on meta tensors and memory-mapped ones alike. Keys the hub carries that hold
    no weights (the component's ``drop_keys``, e.g. old CLIP ``position_ids``) are dropped.
    """
    comp = component_for(config)
    if not reverse:
        # older hub files use names the reference library renames on load (legacy_table:
        # old hub name -> current hub name) and extra keys that hold no weights (drop_keys)
        state_dict = {rename(k, comp.legacy_table): v for k, v in state_dict.items() if k not in comp.drop_keys}
    mapping = rename_all(state_dict, comp.table, reverse=reverse)
    return {mapping[k]: v for k, v in state_dict.items()}


def read_config(folder: str | Path) -> dict:
    """A component folder's config.json as a dict. A missing folder or config.json raises
    WeightsNotFoundError (a FileNotFoundError); a file given for the folder, WeightsError."""
    folder = Path(folder)
    path = folder / "config.json"
    if folder.is_file():
        raise WeightsError(f"{folder}: is a file; pass the component folder that holds it ({folder.parent}).")
    if not folder.is_dir():
        raise WeightsNotFoundError(f"{folder}: no such component folder.")
    if not path.is_file():
        parts = sorted(p.name + "/" for p in folder.iterdir() if (p / "config.json").is_file())
        if parts:
            raise WeightsNotFoundError(
                f"{folder}: no config.json; this looks like a whole checkpoint, load one of its "
                f"component folders: {', '.join(parts)} (e.g. {folder / parts[0]})."
            )
        raise WeightsNotFoundError(
            f"{folder}: no config.json; is this a component folder (unet/, movq/, prior/, ...)?"
        )
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e}).") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object.")
    return config


def load_component(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    variant: str | None = None,
) -> nn.Module:
    """Load one component folder (``.../unet``, ``.../prior``, ``.../text_encoder``, ...).

    Reads config.json, builds the model on the meta device, and assigns the tensors
    of the weights file(s) — safetensors memory-mapped, ``.bin`` with weights_only,
    fp16 variants, sharded ``*.index.json`` — so no second copy of the weights is held.
    ``dtype=None`` gives float32 (diffusers' default; every component alike); pass
    ``torch.float16`` / ``torch.bfloat16`` for half precision, or ``"auto"`` for the dtype
    the file stores (transformers 5's default: an fp16 file loads as fp16, without a copy),
    or ``"keep"`` for each tensor exactly as stored (a file mixing dtypes stays mixed: what
    ``python -m weights_convert`` uses by default). ``variant="fp16"`` (or ``"bf16"``, ...)
    loads only that variant's files and raises WeightsNotFoundError when there are none, as
    diffusers does. Problems with the files raise WeightsError, an ``OSError``.
    The model is returned in eval mode with ``requires_grad_(False)``.
    """
    check_dtype(dtype, auto=True)
    folder = Path(path)
    config = read_config(folder)
    comp = component_for(config)
    with skip_init(), torch.device("meta"):  # every tensor comes from the file
        model = build_model(config)
    ours = config.get(LAYOUT_KEY) == "kandinsky"
    stems = (KANDINSKY_STEM,) if ours else (comp.hub_weights, "pytorch_model", "model")
    files = find_weight_files(folder, tuple(dict.fromkeys(stems)), variant=variant)
    raw = read_weights(files)
    state = {rename(k, comp.legacy_ours): v for k, v in raw.items()} if ours else convert_state_dict(config, raw)
    where = files[0] if len(files) == 1 else f"{folder} ({len(files)} shards)"
    check_state_dict(model, state, where)
    if dtype == "auto":
        dtype = auto_dtype(config, raw)
    dtype = dtype or torch.float32
    state = {
        k: v.to(device=device, dtype=dtype if v.is_floating_point() and dtype != "keep" else v.dtype)
        for k, v in state.items()
    }
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def auto_dtype(config: dict, state: dict) -> torch.dtype:
    """transformers' ``dtype="auto"``: the config's ``dtype`` / ``torch_dtype`` if it names a
    floating dtype, else the dtype of the first floating tensor stored."""
    for key in ("dtype", "torch_dtype"):
        named = getattr(torch, str(config.get(key)), None)
        if isinstance(named, torch.dtype) and named.is_floating_point:
            return named
    return next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)


def check_dtype(dtype, auto: bool = False) -> None:
    """Refuse what ``Tensor.to`` would fail on deep inside (or silently truncate to integers)."""
    if dtype is None or (auto and dtype in ("auto", "keep")):
        return
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        also = ', "auto", "keep"' if auto else ""
        raise ValueError(
            f"dtype must be a floating-point torch.dtype (torch.float32, torch.float16, torch.bfloat16)"
            f"{also} or None, not {dtype!r}."
        )


def check_state_dict(model: nn.Module, state: dict, where) -> None:
    """Raise WeightsError listing missing, unexpected and misshapen tensors."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshapen = [
        f"{k}: file {tuple(state[k].shape)} vs model {expected[k]}"
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)):
        if items:
            shown = ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "")
            problems.append(f"{len(items)} {label} tensor(s): {shown}")
    if problems:
        raise WeightsError(
            f"{where}: the checkpoint does not match its config.json ({type(model).__name__}): "
            + "; ".join(problems)
            + ". Is config.json from the same checkpoint as the weights?"
        )


def save_component(
    model: nn.Module,
    folder: str | Path,
    layout: str = "hub",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model`` as a component folder.

    ``layout="hub"``: config.json + diffusion_pytorch_model.safetensors / model.safetensors
    with the reference library's names (its ``from_pretrained`` loads the folder).
    ``layout="kandinsky"``: config.json + kandinsky.safetensors with our names.
    A folder that already holds other weight files (the other layout, a ``.bin``, a variant)
    is refused with FileExistsError: a loader would read one or the other.
    """
    if layout not in ("hub", "kandinsky"):
        raise ValueError(f"layout must be 'hub' or 'kandinsky', not {layout!r}")
    check_dtype(dtype)
    comp = component_for_model(model)
    # Adapter layers (kandinsky.lora.LoRALinear, a floor above this one) say so with `holds_adapters`.
    if any(getattr(m, "holds_adapters", False) for m in model.modules()):
        raise WeightsError(f"{type(model).__name__} has LoRA adapters: save them with kandinsky.lora.save_lora, or "
                           "merge(model) and remove_lora(model) first to save the fine-tuned weights.")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder}: is a file; pass the folder to write the component into.")
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in model.state_dict().items()}
    if layout == "hub":
        state = convert_state_dict(config, state, reverse=True)
        stem = comp.hub_weights
    else:
        config[LAYOUT_KEY] = "kandinsky"
        stem = KANDINSKY_STEM
    if dtype is not None and "torch_dtype" in config:
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
    target = folder / f"{stem}.safetensors"
    others = sorted(p.name for p in folder.iterdir() if p != target and _WEIGHT_FILE.search(p.name))
    if others:
        raise FileExistsError(
            f"{folder} already holds weight files {others}: {target.name} would sit beside them and "
            f"a loader would read one or the other. Save into a new or empty folder, or delete them first."
        )
    write_safetensors(state, target)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder
