"""Session fixtures of tiny random reference models (diffusers / transformers), one module per component.

Their configs start from kandinsky.demo.TINY, the one declaration of the tiny configs, and say what
they change (``tiny_kwargs``)."""
from __future__ import annotations

import copy
from pathlib import Path

from kandinsky.demo import TINY


def tiny_kwargs(component: str, **changes) -> dict:
    """``TINY[component]`` with ``changes``, as keyword arguments of the reference class (no "_class_name")."""
    return {**{k: v for k, v in TINY[component].items() if k != "_class_name"}, **changes}


def saved_pretrained(tmp_path_factory, name: str, model, sub: str) -> tuple[Path, object]:
    """``model`` written by its ``save_pretrained`` into a new session folder ``<name>.../<sub>`` (the
    component folder of a hub repo). -> (folder, model)."""
    folder = tmp_path_factory.mktemp(name) / sub
    model.save_pretrained(folder)
    return folder, model


def save_diffusers_forms(model, root: Path, shard_size: str, sub: str = "") -> dict[str, Path]:
    """A diffusers ``model`` in the hub's other file forms, {form: root/form/sub}:

        "bin"      diffusion_pytorch_model.bin (safe_serialization=False)
        "fp16"     only diffusion_pytorch_model.fp16.safetensors (variant="fp16"): the weights rounded to float16
        "sharded"  diffusion_pytorch_model-0000k-of-0000n.safetensors (``shard_size`` each) + .index.json
    """
    folders = {form: root / form / sub if sub else root / form for form in ("bin", "fp16", "sharded")}
    model.save_pretrained(folders["bin"], safe_serialization=False)
    copy.deepcopy(model).half().save_pretrained(folders["fp16"], variant="fp16")
    model.save_pretrained(folders["sharded"], max_shard_size=shard_size)
    return folders
