"""CLIPTextModelWithProjection (hub ``text_encoder/``) <-> kandinsky.clip.TextEncoder.

Hub checkpoints written by transformers < 4.31 also hold the non-persistent buffer
``text_model.embeddings.position_ids``; it is not a weight (positions are computed on
the fly) and is dropped on load, as transformers does.
"""

# (hub prefix, our prefix); `text_projection` keeps its name.
TABLE = [
    ("text_model.embeddings.token_embedding", "token_embedding"),
    ("text_model.embeddings.position_embedding", "position_embedding"),
    ("text_model.encoder.layers.{i}.layer_norm1", "blocks.{i}.norm1"),
    ("text_model.encoder.layers.{i}.self_attn", "blocks.{i}.attn"),
    ("text_model.encoder.layers.{i}.layer_norm2", "blocks.{i}.norm2"),
    ("text_model.encoder.layers.{i}.mlp", "blocks.{i}.mlp"),
    ("text_model.final_layer_norm", "final_norm"),
]

# hub tensors that are not weights (old persistent buffers): dropped by convert_state_dict
DROP_KEYS = ("text_model.embeddings.position_ids",)
