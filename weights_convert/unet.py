"""diffusers UNet2DConditionModel (Kandinsky 2.2 decoder, inpaint, ControlNet-depth) <-> kandinsky.unet.UNet.

Inside ResBlocks (norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut) and attention
layers (group_norm, to_q/k/v, add_k_proj, add_v_proj) the names are the hub's; only the
containers and the top-level embeddings are renamed.
"""

TABLE = [
    # conditioning
    ("time_embedding", "time_embed"),
    ("add_embedding.image_proj", "image_embed.proj"),
    ("add_embedding.image_norm", "image_embed.norm"),
    ("encoder_hid_proj.image_embeds", "image_tokens.proj"),
    ("encoder_hid_proj.norm", "image_tokens.norm"),
    # ControlNet hint encoder: a Sequential with SiLUs at the odd indices -> 8 convs
    *[(f"add_embedding.input_hint_block.{2 * k}", f"hint_encoder.convs.{k}") for k in range(8)],
    # encoder
    ("down_blocks.{i}.resnets.{j}", "down.{i}.res.{j}"),
    ("down_blocks.{i}.attentions.{j}", "down.{i}.attn.{j}"),
    ("down_blocks.{i}.attentions.{j}.to_out.0", "down.{i}.attn.{j}.to_out"),
    ("down_blocks.{i}.downsamplers.0", "down.{i}.downsample"),
    # middle
    ("mid_block.resnets.0", "mid.res_in"),
    ("mid_block.attentions.0", "mid.attn"),
    ("mid_block.attentions.0.to_out.0", "mid.attn.to_out"),
    ("mid_block.resnets.1", "mid.res_out"),
    # decoder
    ("up_blocks.{i}.resnets.{j}", "up.{i}.res.{j}"),
    ("up_blocks.{i}.attentions.{j}", "up.{i}.attn.{j}"),
    ("up_blocks.{i}.attentions.{j}.to_out.0", "up.{i}.attn.{j}.to_out"),
    ("up_blocks.{i}.upsamplers.0", "up.{i}.upsample"),
    # output
    ("conv_norm_out", "norm_out"),
]
