"""kandinsky: a readable, from-scratch PyTorch implementation of Kandinsky 2.2.

Components live in kandinsky.clip, kandinsky.prior, kandinsky.unet, kandinsky.movq;
the noise schedule and the samplers in kandinsky.sampling; pipelines in kandinsky.pipelines. Weights are
read from Hugging Face checkpoint folders by the sibling package ``weights_convert``.
"""
__version__ = "0.1.0"

_LAZY = {
    "PriorPipeline": "kandinsky.pipelines.prior",
    "DecoderPipeline": "kandinsky.pipelines.decoder",
    "Kandinsky": "kandinsky.pipelines.combined",
    "capture": "kandinsky.research.capture",
    "intervene": "kandinsky.research.capture",
    "patch_routes": "kandinsky.research.routes",
    "text_lens": "kandinsky.research.lens",
    "module_names": "kandinsky.research.inspect",
    "viz": "kandinsky.research",  # kandinsky.viz.attention_pictures, ...
    "embeddings": "kandinsky.research",  # kandinsky.embeddings.similarity, slerp, ...
}


def __getattr__(name):  # lazy, so `import kandinsky` stays cheap
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kandinsky' has no attribute {name!r}")


__all__ = list(_LAZY)
