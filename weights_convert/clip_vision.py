"""CLIPVisionModelWithProjection (hub ``image_encoder/``) <-> kandinsky.clip.ImageEncoder.

Hub checkpoints written by transformers < 4.31 also hold the non-persistent buffer
``vision_model.embeddings.position_ids``; it is not a weight and is dropped on load,
as transformers does.
"""

# (hub prefix, our prefix); `visual_projection` keeps its name. (`pre_layrnorm` is the hub's spelling.)
TABLE = [
    ("vision_model.embeddings.patch_embedding", "patch_embedding"),
    ("vision_model.embeddings.class_embedding", "class_embedding"),
    ("vision_model.embeddings.position_embedding", "position_embedding"),
    ("vision_model.pre_layrnorm", "pre_norm"),
    ("vision_model.encoder.layers.{i}.layer_norm1", "blocks.{i}.norm1"),
    ("vision_model.encoder.layers.{i}.self_attn", "blocks.{i}.attn"),
    ("vision_model.encoder.layers.{i}.layer_norm2", "blocks.{i}.norm2"),
    ("vision_model.encoder.layers.{i}.mlp", "blocks.{i}.mlp"),
    ("vision_model.post_layernorm", "post_norm"),
]

# hub tensors that are not weights (old persistent buffers): dropped by convert_state_dict
DROP_KEYS = ("vision_model.embeddings.position_ids",)
