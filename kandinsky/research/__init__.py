"""Research instruments. ``kandinsky.capture`` / ``intervene`` (kandinsky.research.capture) read
and edit intermediate tensors by module name; the ready-made edits are re-exported here. What
names mean (models, pipelines, attention layouts): kandinsky.research.targets; the module tree and
``kandinsky.module_names``: kandinsky.research.inspect; attention pictures: kandinsky.research.viz;
CLIP embedding tools: kandinsky.research.embeddings; the image embedding's routes into the decoder
(``kandinsky.patch_routes``, ``route_map``): kandinsky.research.routes; pictures from each CLIP text
layer (``kandinsky.research.text_lens``): kandinsky.research.lens."""
from kandinsky.research.capture import (  # noqa: F401
    AttentionEdit,
    Context,
    Record,
    ablate_heads,
    add_direction,
    drop_image_tokens,
    patch_from,
    scale_image_tokens,
)

_SUBMODULES = ("viz", "embeddings", "inspect", "routes", "directions", "lens")
_NAMES = {"route_map": "routes",  # kandinsky.research.route_map: the causal maps of kandinsky.research.routes
          "text_lens": "lens"}  # kandinsky.research.text_lens: the lens on the text encoder


def __getattr__(name):  # kandinsky.research.viz etc. on first use (they import pillow / numpy)
    if name in _SUBMODULES or name in _NAMES:
        import importlib

        module = importlib.import_module(f"kandinsky.research.{_NAMES.get(name, name)}")
        return getattr(module, name) if name in _NAMES else module
    raise AttributeError(f"module 'kandinsky.research' has no attribute {name!r}")
