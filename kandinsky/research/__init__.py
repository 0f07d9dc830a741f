"""Research instruments. ``kandinsky.capture`` / ``intervene`` / ``module_names`` (in
kandinsky.research.capture) read and edit intermediate tensors by module name; the ready-made
edits are re-exported here. Attention pictures: kandinsky.research.viz; CLIP embedding tools:
kandinsky.research.embeddings; the module tree: kandinsky.research.inspect."""
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
