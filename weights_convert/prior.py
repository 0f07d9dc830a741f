"""diffusers PriorTransformer (kandinsky-2-2-prior/prior) <-> kandinsky.prior.DiffusionPrior."""

# (hub prefix, our prefix); positional_embedding, norm_out, clip_mean, clip_std keep their names.
TABLE = [
    ("time_embedding", "time_embed"),
    ("encoder_hidden_states_proj", "text_hidden_proj"),
    ("embedding_proj", "text_embed_proj"),
    ("proj_in", "image_embed_proj"),
    ("prd_embedding", "prd_token"),
    ("transformer_blocks.{i}.norm1", "blocks.{i}.norm1"),
    ("transformer_blocks.{i}.attn1.to_q", "blocks.{i}.attn.q"),
    ("transformer_blocks.{i}.attn1.to_k", "blocks.{i}.attn.k"),
    ("transformer_blocks.{i}.attn1.to_v", "blocks.{i}.attn.v"),
    ("transformer_blocks.{i}.attn1.to_out.0", "blocks.{i}.attn.out"),
    ("transformer_blocks.{i}.norm3", "blocks.{i}.norm2"),
    ("transformer_blocks.{i}.ff.net.0.proj", "blocks.{i}.mlp.fc1"),
    ("transformer_blocks.{i}.ff.net.2", "blocks.{i}.mlp.fc2"),
    ("proj_to_clip_embeddings", "proj_out"),
]

# Files in kandinsky's own layout (save_component(layout="kandinsky")) written before the prior's
# time embedding became kandinsky.layers.TimestepEmbedding (ours -> ours, read only).
LEGACY_OURS = [
    ("time_embed.fc1", "time_embed.linear_1"),
    ("time_embed.fc2", "time_embed.linear_2"),
]
