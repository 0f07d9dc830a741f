"""Low-rank adapters (LoRA) on the linear layers of the prior, the UNet and the CLIP text tower.

An adapted layer computes

    y = x W^T + b  +  sum over adapters n of  scale_n * (alpha_n / r_n) * up_n(down_n(x))

with down_n: (r_n, in) and up_n: (out, r_n) (PEFT's lora_A and lora_B). ``up`` starts at zero,
so a fresh adapter changes nothing. ``scale`` is the strength chosen when using the adapter
(``--lora FILE:0.8``), ``alpha / r`` the one chosen when training it.

The adapted layer is a ``LoRALinear``: an ``nn.Linear`` that keeps the base layer's own
``weight`` and ``bias`` tensors (so ``to_q.weight`` keeps its name in the state dict) and holds
its adapters in ``lora``: ``to_q.lora.<name>.down.weight``. ``merge`` adds the adapters into
``weight``; ``remove_lora`` takes them away and gives the plain ``nn.Linear`` back.

Every function here takes a model, or a pipeline holding models (``.unet``, ``.prior``,
``.decoder.unet``, ``.prior.prior``, ``.text_encoder``, ...).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math

import torch
import torch.nn.functional as F
from torch import nn

from kandinsky.clip.model import TextEncoder
from kandinsky.prior import DiffusionPrior
from kandinsky.unet import UNet
from kandinsky.lora import LoRAError, check_scale
from weights_convert.naming import rename
from weights_convert.registry import component_for_model


@dataclasses.dataclass(frozen=True)
class LoRAComponent:
    """One model kandinsky can adapt."""

    model: type  # our model class
    prefix: str  # its name in pipeline-level LoRA files ("unet.down_blocks...") and in pipelines
    kohya: str  # kohya's key prefix ("lora_unet_down_blocks_...")
    targets: tuple[str, ...]  # add_lora's default targets (globs over our module names)


# Defaults: every attention projection (the published LoRA recipes adapt these).
COMPONENTS = (
    LoRAComponent(UNet, "unet", "lora_unet",
                  ("*.to_q", "*.to_k", "*.to_v", "*.to_out", "*.add_k_proj", "*.add_v_proj")),
    LoRAComponent(DiffusionPrior, "prior", "lora_prior",
                  ("blocks.*.attn.q", "blocks.*.attn.k", "blocks.*.attn.v", "blocks.*.attn.out")),
    LoRAComponent(TextEncoder, "text_encoder", "lora_te",
                  ("blocks.*.attn.q_proj", "blocks.*.attn.k_proj", "blocks.*.attn.v_proj", "blocks.*.attn.out_proj")),
)

# Where pipelines keep their models (Kandinsky.prior.prior, Kandinsky.decoder.unet, ...).
PIPELINE_ATTRIBUTES = ("unet", "prior", "text_encoder", "decoder")


# --------------------------------------------------------------------------- the layer
class LoRAAdapter(nn.Module):
    """One adapter of one layer: x -> scale * (alpha / r) * up(down(x))."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, scale: float = 1.0,
                 device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)  # (r, in)
        self.up = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)  # (out, r)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))  # PEFT's lora_A init
        nn.init.zeros_(self.up.weight)
        self.rank, self.alpha, self.scale = rank, float(alpha), float(scale)
        self.merged = False

    @property
    def factor(self) -> float:
        return self.scale * self.alpha / self.rank

    def delta_weight(self) -> torch.Tensor:
        """factor * up @ down: what merging adds to the base weight, (out, in) float32."""
        return self.factor * (self.up.weight.float() @ self.down.weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.down.weight.dtype
        return (self.up(self.down(x.to(dtype))) * self.factor).to(x.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}, merged={self.merged}"


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus named adapters. Shares (does not copy) the base layer's tensors."""

    holds_adapters = True  # weights_convert.save_component refuses a model with adapters (it cannot import this)

    def __init__(self, base: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.lora = nn.ModuleDict()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        for adapter in self.lora.values():
            if not adapter.merged and adapter.scale != 0:
                y = y + adapter(x).to(y.dtype)  # (under autocast y may be lower precision than x)
        return y

    def add(self, name: str, rank: int, alpha: float, scale: float = 1.0, dtype=None) -> LoRAAdapter:
        w = self.weight
        self.lora[name] = LoRAAdapter(self.in_features, self.out_features, rank, alpha, scale,
                                      device=w.device, dtype=dtype or w.dtype)
        return self.lora[name]

    @torch.no_grad()
    def merge(self, name: str) -> None:
        adapter = self.lora[name]
        if not adapter.merged:
            self.weight.copy_((self.weight.float() + adapter.delta_weight()).to(self.weight.dtype))
            adapter.merged = True

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        adapter = self.lora[name]
        if adapter.merged:
            self.weight.copy_((self.weight.float() - adapter.delta_weight()).to(self.weight.dtype))
            adapter.merged = False

    def to_linear(self) -> nn.Linear:
        """The plain layer (same tensors; merged adapters stay in the weight)."""
        with torch.device("meta"):
            plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        plain.weight = self.weight
        plain.register_parameter("bias", self.bias)
        return plain


# --------------------------------------------------------------------------- models in a model / pipeline
def component_of(model: nn.Module) -> LoRAComponent | None:
    return next((c for c in COMPONENTS if type(model) is c.model), None)


def unwrap(model):
    """The model inside a DistributedDataParallel (``.module``) or torch.compile (``._orig_mod``) wrapper."""
    while isinstance(model, nn.Module) and component_of(model) is None:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def find_models(obj, what: str = "the object") -> list[tuple[str, nn.Module]]:
    """(path, model) of every adaptable model in a model or pipeline: [("prior.prior", prior), ...]."""
    found: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def visit(x, path: str, depth: int) -> None:
        if id(x) in seen or depth > 3:
            return
        seen.add(id(x))
        x = unwrap(x)
        if isinstance(x, nn.Module):
            if component_of(x) is not None:
                found.append((path, x))
            return
        for attr in PIPELINE_ATTRIBUTES:
            child = getattr(x, attr, None)
            if child is not None:
                visit(child, f"{path}.{attr}" if path else attr, depth + 1)

    visit(obj, "", 0)
    if not found:
        raise LoRAError(
            f"{what} ({type(obj).__name__}) holds no model LoRA can adapt: pass a UNet, a DiffusionPrior, a "
            "TextEncoder or a pipeline holding them (.unet, .prior, .text_encoder, .decoder)."
        )
    return found


def hub_name(model: nn.Module, name: str) -> str:
    """Our module name -> the reference library's (weights_convert's renaming table, reversed)."""
    return rename(name, component_for_model(model).table, reverse=True)


def lora_layers(obj) -> dict[str, LoRALinear]:
    """Every adapted layer: {"decoder.unet.down.1.attn.0.to_q": layer, ...} (model paths prefixed)."""
    out = {}
    for path, model in find_models(obj):
        for name, module in model.named_modules():
            if isinstance(module, LoRALinear):
                out[f"{path}.{name}" if path else name] = module
    return out


def has_lora(module: nn.Module) -> bool:
    """Does any layer of ``module`` (any nn.Module) hold adapters?"""
    return any(isinstance(m, LoRALinear) for m in module.modules())


def adapters(obj) -> dict[str, dict]:
    """The adapters loaded: {name: {"layers": n, "rank": r, "alpha": a, "scale": s, "merged": bool}}."""
    out: dict[str, dict] = {}
    for layer in lora_layers(obj).values():
        for name, a in layer.lora.items():
            info = out.setdefault(name, {"layers": 0, "rank": a.rank, "alpha": a.alpha, "scale": a.scale,
                                         "merged": a.merged})
            info["layers"] += 1
    return out


def _layers_with(obj, name: str | None) -> list[tuple[LoRALinear, str]]:
    """(layer, adapter name) pairs for adapter ``name`` (None: every adapter); raises if there is none."""
    pairs = [(layer, n) for layer in lora_layers(obj).values() for n in layer.lora if name in (None, n)]
    if name is not None and not pairs:
        have = sorted(adapters(obj))
        raise LoRAError(f"no LoRA adapter named {name!r} is loaded; loaded: {have or 'none'}.")
    return pairs


# --------------------------------------------------------------------------- adding
def matches(name: str, hub: str, pattern: str) -> bool:
    """Does a target pattern pick this module? Globs over our name or the hub's, whole or as a
    dotted suffix (PEFT's rule): "to_q", "*.attn.q", "down.1.*", "transformer_blocks.0.attn1.to_q"."""
    return any(fnmatch.fnmatchcase(n, p) for n in (name, hub) for p in (pattern, "*." + pattern))


def select_layers(model: nn.Module, targets) -> dict[str, nn.Linear]:
    """The linear layers ``targets`` picks (each pattern must pick at least one, and only linear layers)."""
    comp = component_of(model)
    targets = [targets] if isinstance(targets, str) else list(targets or comp.targets)
    picked: dict[str, nn.Linear] = {}
    for pattern in targets:
        hits = {n: m for n, m in model.named_modules() if n and matches(n, hub_name(model, n), pattern)}
        if not hits:
            raise LoRAError(
                f"targets: {pattern!r} matches no module of the {type(model).__name__}; patterns are globs over "
                f"module names (ours or the reference's), e.g. {', '.join(repr(t) for t in comp.targets[:3])}."
            )
        wrong = [f"{n} ({type(m).__name__})" for n, m in hits.items() if not isinstance(m, nn.Linear)]
        if wrong:
            raise LoRAError(
                f"targets: {pattern!r} matches modules that are not nn.Linear: {', '.join(wrong[:4])}; LoRA "
                "adapts linear layers only: narrow the pattern (e.g. '*.to_q')."
            )
        picked.update(hits)
    return picked


def wrap(model: nn.Module, name: str) -> LoRALinear:
    """Replace the nn.Linear at ``name`` by a LoRALinear (kept if it already is one)."""
    layer = model.get_submodule(name)
    if isinstance(layer, LoRALinear):
        return layer
    parent, _, child = name.rpartition(".")
    wrapped = LoRALinear(layer)
    setattr(model.get_submodule(parent) if parent else model, child, wrapped)
    return wrapped


def check_new_name(obj, name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise LoRAError(f"adapter name must be a non-empty string without dots, not {name!r}.")
    if name in adapters(obj):
        raise LoRAError(f"an adapter named {name!r} is already loaded; pass another name= or remove_lora(..., "
                        f"{name!r}) first.")


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, targets=None,
             name: str = "default", dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    """Add a fresh adapter (``up`` zero, so the model's output is unchanged) to the layers that
    ``targets`` picks (default: the attention projections of ``model``'s kind, see COMPONENTS).

    Freezes every weight of ``model`` and returns the new adapter's parameters (the ones to train).
    ``alpha`` defaults to ``rank`` (scaling 1). The adapters are float32 whatever the model's dtype
    (train them on a bf16 / fp16 model without rounding their updates away), on the model's device.
    """
    model = unwrap(model)
    if component_of(model) is None:
        raise LoRAError(
            f"add_lora: model must be a UNet, a DiffusionPrior or a TextEncoder, not {type(model).__name__}; "
            "for a pipeline pass one of its models (pipe.unet, pipe.prior, pipe.text_encoder)."
        )
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise LoRAError(f"add_lora: rank must be a positive integer (4, 8, 16, ...), not {rank!r}.")
    if alpha is not None and (not isinstance(alpha, (int, float)) or alpha <= 0):
        raise LoRAError(f"add_lora: alpha must be a positive number or None (= rank), not {alpha!r}.")
    check_new_name(model, name)
    layers = select_layers(model, targets)
    model.requires_grad_(False)
    params: list[nn.Parameter] = []
    for layer_name in layers:
        adapter = wrap(model, layer_name).add(name, rank, alpha if alpha is not None else rank, dtype=dtype)
        params += list(adapter.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def lora_parameters(obj, name: str | None = None) -> list[nn.Parameter]:
    """The parameters of adapter ``name`` (None: of every adapter), e.g. to train a loaded adapter further."""
    return [p for layer, n in _layers_with(obj, name) for p in layer.lora[n].parameters()]


def lora_state_dict(model: nn.Module, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{our module name: (down (r, in), up (out, r), alpha)} of adapter ``name`` in one model."""
    out = {}
    for layer_name, module in model.named_modules():
        if isinstance(module, LoRALinear) and name in module.lora:
            a = module.lora[name]
            out[layer_name] = (a.down.weight, a.up.weight, a.alpha)
    return out


# --------------------------------------------------------------------------- using
def set_scale(obj, name: str, scale: float) -> None:
    """Change adapter ``name``'s strength (re-merges it if it is merged; a finite number within
    +-MAX_SCALE, ``check_scale``)."""
    scale = check_scale(scale, "set_scale")
    for layer, n in _layers_with(obj, name):
        merged = layer.lora[n].merged
        layer.unmerge(n)
        layer.lora[n].scale = float(scale)
        if merged:
            layer.merge(n)


def merge(obj, name: str | None = None) -> None:
    """Add adapter ``name`` (None: every adapter) into the base weights: same output, no extra cost.
    In fp16 / bf16 the sum is rounded to the weight's dtype; ``unmerge`` then restores it only approximately."""
    for layer, n in _layers_with(obj, name):
        layer.merge(n)


def unmerge(obj, name: str | None = None) -> None:
    """Subtract merged adapter ``name`` (None: every merged adapter) from the base weights again."""
    for layer, n in _layers_with(obj, name):
        layer.unmerge(n)


def remove_lora(obj, name: str | None = None) -> None:
    """Remove adapter ``name`` (None: every adapter). Unmerged adapters simply go; merged ones stay
    in the weights (merge + remove = the fine-tuned model). Layers left with no adapter become plain nn.Linear."""
    pairs = _layers_with(obj, name)
    for layer, n in pairs:
        del layer.lora[n]
    for _, model in find_models(obj):
        for layer_name, module in list(model.named_modules()):
            if isinstance(module, LoRALinear) and not len(module.lora):
                parent, _, child = layer_name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, module.to_linear())
