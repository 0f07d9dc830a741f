"""MoVQ (diffusers ``VQModel``) <-> kandinsky.movq.MoVQ: config class, model and key renames.

Hub names that differ from ours:
    {encoder.down_blocks|decoder.up_blocks}.{i}.resnets.{j}     -> {encoder.down|decoder.up}.{i}.res.{j}
    ....attentions.{j}                                           -> ....attn.{j}
    ....attentions.{j}.group_norm | spatial_norm                 -> ....attn.{j}.norm
    ....attentions.{j}.to_out.0                                  -> ....attn.{j}.to_out
    encoder.down_blocks.{i}.downsamplers.0                       -> encoder.down.{i}.downsample
    decoder.up_blocks.{i}.upsamplers.0                           -> decoder.up.{i}.upsample
    {encoder|decoder}.mid_block.resnets.0 / attentions.0 / resnets.1 -> {...}.mid.res1 / attn / res2
    {encoder|decoder}.conv_norm_out                              -> {...}.norm_out
    quantize.embedding                                           -> quantizer.codebook
"""


def _attention(hub: str, ours: str, norm: str) -> list[tuple[str, str]]:
    return [
        (hub, ours),
        (f"{hub}.{norm}", f"{ours}.norm"),
        (f"{hub}.to_out.0", f"{ours}.to_out"),
    ]


TABLE = [
    # encoder
    ("encoder.down_blocks.{i}.resnets.{j}", "encoder.down.{i}.res.{j}"),
    *_attention("encoder.down_blocks.{i}.attentions.{j}", "encoder.down.{i}.attn.{j}", "group_norm"),
    ("encoder.down_blocks.{i}.downsamplers.0", "encoder.down.{i}.downsample"),
    ("encoder.mid_block.resnets.0", "encoder.mid.res1"),
    *_attention("encoder.mid_block.attentions.0", "encoder.mid.attn", "group_norm"),
    ("encoder.mid_block.resnets.1", "encoder.mid.res2"),
    ("encoder.conv_norm_out", "encoder.norm_out"),
    # codebook
    ("quantize.embedding", "quantizer.codebook"),
    # decoder
    ("decoder.mid_block.resnets.0", "decoder.mid.res1"),
    *_attention("decoder.mid_block.attentions.0", "decoder.mid.attn", "spatial_norm"),
    ("decoder.mid_block.resnets.1", "decoder.mid.res2"),
    ("decoder.up_blocks.{i}.resnets.{j}", "decoder.up.{i}.res.{j}"),
    *_attention("decoder.up_blocks.{i}.attentions.{j}", "decoder.up.{i}.attn.{j}", "spatial_norm"),
    ("decoder.up_blocks.{i}.upsamplers.0", "decoder.up.{i}.upsample"),
    ("decoder.conv_norm_out", "decoder.norm_out"),
]

# Files saved before diffusers' attention refactor name the attention projections
# query/key/value/proj_attn; the reference renames them on load, and so do we
# (hub -> ours only; we always write the current names).
_ATTENTION_SITES = (
    "encoder.down_blocks.{i}.attentions.{j}",
    "encoder.mid_block.attentions.{j}",
    "decoder.mid_block.attentions.{j}",
    "decoder.up_blocks.{i}.attentions.{j}",
)
LEGACY_TABLE = [
    (f"{site}.{old}", f"{site}.{new}")
    for site in _ATTENTION_SITES
    for old, new in (("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0"))
]
