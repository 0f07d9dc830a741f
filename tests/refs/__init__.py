"""Session fixtures of tiny random reference models (diffusers / transformers), one module per component.

Their configs start from kandinsky.demo.TINY, the one declaration of the tiny configs, and say what
they change (``tiny_kwargs``)."""
from __future__ import annotations

from kandinsky.demo import TINY


def tiny_kwargs(component: str, **changes) -> dict:
    """``TINY[component]`` with ``changes``, as keyword arguments of the reference class (no "_class_name")."""
    return {**{k: v for k, v in TINY[component].items() if k != "_class_name"}, **changes}
