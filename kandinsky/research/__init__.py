"""Research instruments: capture / edit intermediate tensors by name (``capture``), attention
pictures (``viz``), CLIP embedding tools (``embeddings``), the module tree (``inspect``)."""
from kandinsky.research.capture import (  # noqa: F401
    Context,
    Record,
    ablate_heads,
    add_direction,
    capture,
    drop_image_tokens,
    intervene,
    module_names,
    patch_from,
    scale_image_tokens,
)
