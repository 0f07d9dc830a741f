"""Sampling pipelines: ``PriorPipeline`` (text -> CLIP image embeddings, kandinsky.pipelines.prior)
and ``DecoderPipeline`` (image embeddings -> images, kandinsky.pipelines.decoder).

Each pipeline reads a checkpoint folder in the hub layout with ``from_pretrained`` and
knows nothing about weight names (``weights_convert.load_component`` does the loading).
"""
