"""LoRA files: save ours (PEFT layout), load ours and the formats in the wild.

Formats, recognised from the tensor names (module paths are the reference library's; the
weights_convert renaming tables map them to ours):

    PEFT                      [base_model.model.|unet.|prior.|text_encoder.]<path>.lora_A.weight / lora_B
                              alpha: adapter_config.json beside the file (lora_alpha, r, *_pattern)
    diffusers                 unet.<path>.lora.down.weight / .lora.up.weight   (LoRACompatibleLinear)
    attention processors      <attention>[.processor].to_q_lora.down.weight / .up.weight
                              (to_k, to_v, to_out, add_k_proj, add_v_proj): the Kandinsky 2.2
                              example scripts and the authors' notebook
    kohya                     lora_unet_<path with _>.lora_down.weight / .lora_up.weight / .alpha
                              (lora_prior_, lora_te_ for the other models)

alpha, per layer, from: a ``<layer>.alpha`` tensor; else adapter_config.json (beside the file or in
its folder); else the ``lora_adapter_metadata`` diffusers writes into the safetensors header; else
alpha = r (scaling 1, what the attention-processor format means).
"""
from __future__ import annotations

import collections
import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from kandinsky.lora import LoRAError, check_lora_file, check_scale
from kandinsky.lora.layers import (
    COMPONENTS,
    check_new_name,
    component_of,
    find_models,
    hub_name,
    lora_state_dict,
    unwrap,
    wrap,
)
from weights_convert.io import WeightsError, read_safetensors_header, read_weights, write_safetensors

# What save_lora writes and load_lora looks for in a folder, in order.
WEIGHT_NAMES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors", "adapter_model.bin",
                "pytorch_lora_weights.bin")
CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
# prefixes of pipeline-level files -> the model they name (a hint: the module paths decide)
PREFIXES = {PEFT_PREFIX: None, **{c.prefix + ".": c.prefix for c in COMPONENTS}, "decoder.": "unet"}
KOHYA_PREFIXES = {"lora_unet": "unet", "lora_prior": "prior", "lora_te": "text_encoder", "lora_te1": "text_encoder"}

# (format, key pattern): a key belongs to the first pattern that matches it. Groups: module (the
# layer's path), role (down / up / alpha, see ROLES), kohya (its prefix), proj (processor layer name)
_PROJ = r"(?P<proj>to_q|to_k|to_v|to_out|add_k_proj|add_v_proj)"
KEY_FORMATS = [
    ("kohya", re.compile(
        r"^(?P<kohya>lora_(?:unet|prior|te1?))_(?P<module>[^.]+)\.(?P<role>lora_down\.weight|lora_up\.weight|alpha)$")),
    ("attention processors", re.compile(
        rf"^(?P<module>.+?)(?:\.processor)?\.{_PROJ}_lora\.(?P<role>down\.weight|up\.weight)$")),
    ("diffusers", re.compile(r"^(?P<module>.+)\.lora\.(?P<role>down\.weight|up\.weight)$")),
    ("PEFT", re.compile(r"^(?P<module>.+)\.(?P<role>lora_A\.weight|lora_B\.weight)$")),
    ("alpha", re.compile(r"^(?P<module>.+)\.(?P<role>alpha)$")),
]
ROLES = {"lora_down.weight": "down", "down.weight": "down", "lora_A.weight": "down",
         "lora_up.weight": "up", "up.weight": "up", "lora_B.weight": "up", "alpha": "alpha"}
# attention-processor layer names -> module names inside the attention
PROCESSOR_MODULES = {"to_out": "to_out.0"}


# --------------------------------------------------------------------------- saving
def save_lora(model: nn.Module, path, name: str = "default", overwrite: bool = False) -> Path:
    """Write adapter ``name`` of ``model`` as PEFT does: ``adapter_model.safetensors`` (tensor names
    ``base_model.model.<reference module path>.lora_A.weight`` / ``lora_B``) and ``adapter_config.json``.

    ``path``: a folder (created), or a ``.safetensors`` file (adapter_config.json goes beside it).
    Returns the weights file. Existing files are kept unless ``overwrite=True``.
    """
    model = unwrap(model)
    if component_of(model) is None:
        raise LoRAError(f"save_lora: pass the model the adapter is on (pipe.unet, pipe.prior, ...), "
                        f"not a {type(model).__name__}.")
    layers = lora_state_dict(model, name)
    if not layers:
        raise LoRAError(f"save_lora: the {type(model).__name__} has no adapter named {name!r}.")
    path = Path(path)
    weights = path if path.suffix == ".safetensors" else path / WEIGHT_NAMES[0]
    config_path = weights.parent / CONFIG_NAME
    if not overwrite:
        for p in (weights, config_path):
            if p.exists():
                raise FileExistsError(f"save_lora: {p} exists; pass overwrite=True or another path.")
    tensors, ranks, alphas = {}, {}, {}
    for layer_name, (down, up, alpha) in layers.items():
        hub = hub_name(model, layer_name)
        tensors[f"{PEFT_PREFIX}{hub}.lora_A.weight"] = down.detach()
        tensors[f"{PEFT_PREFIX}{hub}.lora_B.weight"] = up.detach()
        ranks[hub], alphas[hub] = down.shape[0], alpha
    config = peft_config(ranks, alphas)
    write_safetensors(tensors, weights, metadata={"format": "pt"})
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return weights


def _number(x: float):
    return int(x) if float(x).is_integer() else x


def peft_config(ranks: dict[str, int], alphas: dict[str, float]) -> dict:
    """PEFT's LoraConfig as JSON: the most common rank / alpha, the other layers in rank/alpha_pattern."""
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": _number(alpha),
        "target_modules": sorted(ranks),
        "rank_pattern": {k: v for k, v in ranks.items() if v != r},
        "alpha_pattern": {k: _number(v) for k, v in alphas.items() if v != alpha},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "task_type": None,
        "base_model_name_or_path": None,
    }


# --------------------------------------------------------------------------- reading
def find_lora_file(path) -> Path:
    """The weights file ``path`` names (itself, or the one in a folder), checked by its first bytes
    (``check_lora_file``)."""
    path = Path(path)
    if path.is_file():
        check_lora_file(path)
        return path
    if path.is_dir():
        for name in WEIGHT_NAMES:
            if (path / name).is_file():
                return find_lora_file(path / name)
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return find_lora_file(found[0])
        also = f"; found {len(found)} .safetensors files: pass one" if found else " and a single .safetensors file"
        raise LoRAError(f"{path}: no LoRA weights in this folder (looked for {', '.join(WEIGHT_NAMES)}{also}).")
    raise LoRAError(f"{path}: no such LoRA file or folder.")


def read_config(weights: Path) -> dict | None:
    """adapter_config.json beside the weights, else diffusers' metadata in the safetensors header
    (keys such as "unet.lora_alpha"), as {prefix or "": config}."""
    path = weights.parent / CONFIG_NAME
    if path.is_file():
        try:
            return {"": json.loads(path.read_text())}
        except ValueError as e:
            raise LoRAError(f"{path}: not valid JSON ({e}).") from None
    if weights.suffix == ".safetensors":
        header, _ = read_safetensors_header(weights)
        raw = (header.get("__metadata__") or {}).get("lora_adapter_metadata")
        if raw:
            try:
                packed = json.loads(raw)
            except ValueError as e:
                raise LoRAError(f"{weights}: its header's lora_adapter_metadata is not valid JSON ({e}).") from None
            out: dict[str, dict] = {}
            for key, value in packed.items():
                prefix, _, field = key.partition(".")
                out.setdefault(prefix, {})[field] = value
            return out
    return None


def parse_keys(tensors: dict, where) -> tuple[str, dict]:
    """Group a file's tensors by layer: (format, {(hint, module, kohya): {"down"|"up"|"alpha": (key, tensor)}})."""
    layers: dict[tuple, dict] = {}
    formats, unknown = collections.Counter(), []
    for key, tensor in tensors.items():
        fmt, m = next(((f, p.match(key)) for f, p in KEY_FORMATS if p.match(key)), (None, None))
        if m is None:
            unknown.append(key)
            continue
        formats[fmt] += 1
        module, hint, kohya = m["module"], None, m.groupdict().get("kohya")
        if kohya:
            hint = KOHYA_PREFIXES[kohya]
        else:
            for prefix, component in PREFIXES.items():
                if module.startswith(prefix):
                    module, hint = module[len(prefix):], component
                    break
        if m.groupdict().get("proj"):
            module = f"{module}.{PROCESSOR_MODULES.get(m['proj'], m['proj'])}"
        layers.setdefault((hint, module, kohya), {})[ROLES[m["role"]]] = (key, tensor)
    if unknown:
        raise LoRAError(
            f"{where}: {len(unknown)} tensor(s) are not LoRA weights of a format kandinsky reads "
            f"({', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}); it reads PEFT (lora_A/lora_B), "
            "diffusers (lora.down/lora.up), attention processors (to_q_lora.down) and kohya (lora_down/lora_up/alpha). "
            "DoRA, LoHa and LoKr files are not supported."
        )
    formats.pop("alpha", None)
    if not formats:
        raise LoRAError(f"{where}: holds no LoRA weights ({len(tensors)} tensors).")
    return "+".join(sorted(formats)), layers


class Index:
    """Every module of the models, found by the reference's module path (or kohya's, dots as _)."""

    def __init__(self, models: list[tuple[str, nn.Module]]):
        self.models = [model for _, model in models]
        self.by_path: dict[int, dict[str, tuple[str, str]]] = {}  # id(model) -> hub path -> (our name, type)
        self.by_kohya: dict[int, dict[str, str]] = {}  # id(model) -> hub path with _ -> hub path
        for model in self.models:
            paths = {hub_name(model, n): (n, type(m).__name__) for n, m in model.named_modules() if n}
            self.by_path[id(model)] = paths
            self.by_kohya[id(model)] = {p.replace(".", "_"): p for p in paths}

    def resolve(self, hint: str | None, module: str, kohya: str | None):
        """(model, our name, module type) or None; the model the key's prefix names is tried first."""
        for model in sorted(self.models, key=lambda m: component_of(m).prefix != hint):
            path = self.by_kohya[id(model)].get(module) if kohya else module
            if path in self.by_path[id(model)]:
                name, kind = self.by_path[id(model)][path]
                return model, name, kind
        return None


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module path ending in it."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def layer_alpha(roles: dict, config: dict | None, hint, module: str, rank: int, where) -> float:
    if "alpha" in roles:
        return float(roles["alpha"][1].float().item())
    cfg = (config or {}).get("") or (config or {}).get(hint or "")
    if not cfg:
        return float(rank)
    for flag in ("use_dora", "fan_in_fan_out"):
        if cfg.get(flag):
            raise LoRAError(f"{where}: adapter config sets {flag}=true, which kandinsky does not support.")
    r = pattern_value(cfg.get("rank_pattern"), module, cfg.get("r", rank))
    if r != rank:
        raise LoRAError(f"{where}: {roles['down'][0]} has rank {rank} but the adapter config says r={r} "
                        "for this layer; the config does not belong to these weights.")
    alpha = float(pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", rank)))
    return alpha * math.sqrt(rank) if cfg.get("use_rslora") else alpha  # rsLoRA: alpha / sqrt(r)


def plan(obj, tensors: dict, config, where) -> tuple[str, list]:
    """Check everything before touching the model: [(model, our name, down, up, alpha), ...]."""
    fmt, layers = parse_keys(tensors, where)
    models = find_models(obj, "load_lora's target")
    index = Index(models)
    out, unmatched = [], []
    for (hint, module, kohya), roles in layers.items():
        found = index.resolve(hint, module, kohya)
        first_key = next(iter(roles.values()))[0]
        if found is None:
            unmatched.append(first_key)
            continue
        model, name, kind = found
        if not isinstance(model.get_submodule(name), nn.Linear):
            raise LoRAError(f"{where}: {first_key} adapts {name} ({kind}); kandinsky's LoRA adapts linear layers only.")
        for role in ("down", "up"):
            if role not in roles:
                raise LoRAError(f"{where}: {first_key} has no matching '{role}' tensor; the file is incomplete.")
        (down_key, down), (up_key, up) = roles["down"], roles["up"]
        layer = model.get_submodule(name)
        down, up = squeeze_1x1(down), squeeze_1x1(up)
        rank = down.shape[0]
        if down.ndim != 2 or down.shape[1] != layer.in_features:
            raise LoRAError(f"{where}: {down_key} has shape {tuple(down.shape)}, expected (rank, "
                            f"{layer.in_features}) for {name}; is this LoRA for a model of another size?")
        if tuple(up.shape) != (layer.out_features, rank):
            raise LoRAError(f"{where}: {up_key} has shape {tuple(up.shape)}, expected ({layer.out_features}, "
                            f"{rank}) for {name} (rank {rank} from {down_key}).")
        out.append((model, name, down, up, layer_alpha(roles, config, hint, module, rank, where)))
    if unmatched:
        names = ", ".join(f"{type(m).__name__}" for _, m in models)
        raise LoRAError(
            f"{where}: {len(unmatched)} of {len(layers)} LoRA layer(s) match no module of the {names} "
            f"({', '.join(unmatched[:5])}{', ...' if len(unmatched) > 5 else ''}); is this LoRA for another "
            "model, or for a model this object does not hold (load a prior LoRA into the prior pipeline)?"
        )
    return fmt, out


def squeeze_1x1(t: torch.Tensor) -> torch.Tensor:
    """kohya stores some linear LoRAs as (r, in, 1, 1) convolution weights."""
    return t.reshape(t.shape[:2]) if t.ndim == 4 and t.shape[2:] == (1, 1) else t


def default_name(weights: Path) -> str:
    stem = weights.parent.name if weights.name in WEIGHT_NAMES else weights.stem
    return re.sub(r"[^\w-]", "_", stem) or "lora"


@torch.no_grad()
def load_lora(obj, path, scale: float = 1.0, name: str | None = None) -> str:
    """Load a LoRA file (or a folder holding one) into a model or pipeline; returns the adapter's name.

    Every tensor must find its layer (a file for another model is refused, naming the keys);
    several adapters add up, each with its own ``scale`` (``set_scale`` changes it later; a finite
    number within +-MAX_SCALE, ``check_scale``).
    ``name`` defaults to the file's stem (the folder's name for adapter_model.safetensors).
    """
    scale = check_scale(scale, "load_lora")
    weights = find_lora_file(path)
    name = name if name is not None else default_name(weights)
    check_new_name(obj, name)
    try:
        tensors = read_weights([weights])
        config = read_config(weights)
    except WeightsError as e:
        raise LoRAError(str(e)) from None
    _, layers = plan(obj, tensors, config, weights)
    for model, layer_name, down, up, alpha in layers:
        adapter = wrap(model, layer_name).add(name, down.shape[0], alpha, scale)
        adapter.down.weight.copy_(down)
        adapter.up.weight.copy_(up)
        adapter.requires_grad_(False)
    return name


def lora_format(path) -> str:
    """Which format a LoRA file is in ("PEFT", "diffusers", "attention processors", "kohya")."""
    weights = find_lora_file(path)
    try:
        tensors = read_weights([weights])
    except WeightsError as e:
        raise LoRAError(str(e)) from None
    return parse_keys(tensors, weights)[0]
