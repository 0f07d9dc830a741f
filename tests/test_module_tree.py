"""The module tree documented in docs/architecture.md (section 3) is exactly the code's: names,
order and types of every kandinsky module's children, for every variant."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from tests.refs.clip import TINY_TEXT_CONFIG
from weights_convert import build_model

ROOT = Path(__file__).resolve().parents[1]


def _documented_tree() -> dict[str, list[tuple[str, set[str], bool]]]:
    """class -> [(child name, allowed types, optional)] from docs/architecture.md's module-tree table."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("<!-- module-tree -->")[1].split("<!-- /module-tree -->")[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `([\w.]+)` \| (.*) \|$", line)
        if not m:
            continue
        children = []
        for item in re.findall(r"`([^`]+)`", m.group(2)):
            names, types = item.replace("\\|", "|").split(": ")
            optional = names.endswith("?")
            names = names.rstrip("?")
            expanded = names.strip("{}").split(",") if names.startswith("{") else [names]
            for child in expanded:
                children.append((child, {t.strip() for t in types.split("|")}, optional))
        rows[m.group(1)] = children
    return rows


def _type_name(module: torch.nn.Module) -> str:
    cls = type(module)
    if isinstance(module, torch.nn.ModuleList):
        kinds = {_type_name(m) for m in module}
        assert len(kinds) == 1, kinds
        return f"[{kinds.pop()}]"
    if cls.__module__.startswith("kandinsky."):
        return f"{cls.__module__.split('.')[1]}.{cls.__name__}"
    return cls.__name__


def test_module_tree_is_the_documented_one(tiny_models):
    """Every kandinsky module's children (names, order, types) are the documented ones, for every
    variant (CLIP with gelu and quick_gelu, UNet with and without hint encoder)."""
    doc = _documented_tree()
    assert len(doc) > 25
    quick = build_model(dict(TINY_TEXT_CONFIG, hidden_act="quick_gelu"))
    seen = set()
    for model in (*tiny_models.values(), quick):
        for path, module in model.named_modules():
            if isinstance(module, torch.nn.ModuleList) or not type(module).__module__.startswith("kandinsky."):
                continue
            children = list(module.named_children())
            key = _type_name(module)
            if not children and key not in doc:
                continue  # weightless leaves (unet.Downsample, clip.QuickGELU, ...)
            assert key in doc, f"{path or 'root'} ({key}) is not in the documented module tree"
            seen.add(key)
            present = [(n, _type_name(c)) for n, c in children]
            expected = [(n, types) for n, types, optional in doc[key] if not optional or n in dict(children)]
            assert [n for n, _ in present] == [n for n, _ in expected], f"{path or 'root'} ({key})"
            for (n, t), (_, allowed) in zip(present, expected):
                assert t in allowed, f"{path}.{n}: {t} not in documented {allowed}"
    assert seen == set(doc), f"documented but never built: {set(doc) - seen}"


