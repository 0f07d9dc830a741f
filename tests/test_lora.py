"""LoRA (kandinsky.lora) against the reference models.

The expected output of every adapted model is the reference (diffusers UNet2DConditionModel /
PriorTransformer, transformers CLIPTextModelWithProjection) with ``W + scale * (alpha / r) * up @ down``
added by hand into the weight the file names (the reference's module path), so the key -> layer
mapping, alpha and scale are all checked against an independent computation.
"""
from __future__ import annotations

import argparse
import copy
import json
import types

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kandinsky.lora import (
    LoRAError,
    LoRALinear,
    adapters,
    add_lora,
    apply_lora_args,
    load_lora,
    lora_format,
    merge,
    parse_lora_arg,
    remove_lora,
    save_lora,
    set_scale,
    unmerge,
)
from kandinsky.cli.common import add_lora_argument
from tests.helpers import assert_close, rel_err
from tests.refs.clip import make_text_reference
from tests.refs.prior import prior_inputs
from weights_convert import load_component, save_component

# Layers the hand-written files adapt (reference module paths): queries, values, outputs and the
# image-token keys / values of the UNet; attention and one MLP layer of the prior.
UNET_LAYERS = ["down_blocks.1.attentions.0.to_q", "down_blocks.2.attentions.1.to_v",
               "mid_block.attentions.0.add_k_proj", "mid_block.attentions.0.add_v_proj",
               "up_blocks.0.attentions.2.to_out.0", "up_blocks.2.attentions.0.to_k"]
PRIOR_LAYERS = ["transformer_blocks.0.attn1.to_q", "transformer_blocks.1.attn1.to_v",
                "transformer_blocks.1.attn1.to_out.0", "transformer_blocks.0.attn1.to_k"]
RANK = 3


# --------------------------------------------------------------------------- LoRA files, written by hand
def random_lora(ref: nn.Module, paths, rank=RANK, seed=0) -> dict:
    """{reference path: (down (r, in), up (out, r))}, random (up non-zero)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path in paths:
        w = ref.get_submodule(path).weight
        out[path] = (torch.randn(rank, w.shape[1], generator=g) * 0.3, torch.randn(w.shape[0], rank, generator=g) * 0.3)
    return out


@torch.no_grad()
def merged_reference(ref: nn.Module, *loras) -> nn.Module:
    """A copy of ``ref`` with each (layers, alpha, scale) merged: W += scale * alpha / r * up @ down."""
    ref = copy.deepcopy(ref)
    for layers, alpha, scale in loras:
        for path, (down, up) in layers.items():
            ref.get_submodule(path).weight += scale * alpha / down.shape[0] * (up @ down)
    return ref


def processor_key(path: str, role: str, processor: bool) -> str:
    """down_blocks.1.attentions.0.to_out.0 -> down_blocks.1.attentions.0.processor.to_out_lora.down.weight"""
    attn, proj = path.removesuffix(".0").rsplit(".", 1)
    return f"{attn}{'.processor' if processor else ''}.{proj}_lora.{role}.weight"


def write_lora(fmt: str, layers: dict, folder, prefix: str, alpha: float | None = None):
    """Write ``layers`` in format ``fmt``; returns (file, the alpha the file means)."""
    folder.mkdir(parents=True, exist_ok=True)
    rank = next(iter(layers.values()))[0].shape[0]
    sd, file = {}, folder / "lora.safetensors"
    for path, (down, up) in layers.items():
        if fmt in ("processor", "no-processor", "processor-bin"):  # the 2.2 example scripts, the authors' notebook
            sd[processor_key(path, "down", fmt != "no-processor")] = down
            sd[processor_key(path, "up", fmt != "no-processor")] = up
        elif fmt in ("peft", "peft-unet-prefix"):
            p = "base_model.model." if fmt == "peft" else f"{prefix}."
            sd[f"{p}{path}.lora_A.weight"], sd[f"{p}{path}.lora_B.weight"] = down, up
        elif fmt == "diffusers":
            sd[f"{prefix}.{path}.lora.down.weight"], sd[f"{prefix}.{path}.lora.up.weight"] = down, up
        elif fmt == "diffusers-metadata":  # today's save_lora_weights: PEFT names, config in the header
            sd[f"{prefix}.{path}.lora_A.weight"], sd[f"{prefix}.{path}.lora_B.weight"] = down, up
        elif fmt == "kohya":
            key = f"lora_{prefix}_{path.replace('.', '_')}"
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
            sd[f"{key}.alpha"] = torch.tensor(float(alpha))
    if fmt.startswith("peft"):
        (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": alpha, "peft_type": "LORA"}))
    # diffusers packs the LoraConfig of each model as "<model>.<field>" into the header
    metadata = {"format": "pt"}
    if fmt == "diffusers-metadata":
        metadata["lora_adapter_metadata"] = json.dumps({f"{prefix}.r": rank, f"{prefix}.lora_alpha": alpha})
    if fmt == "processor-bin":
        file = folder / "pytorch_lora_weights.bin"
        torch.save(sd, file)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, file, metadata=metadata)
    return file, (alpha if fmt.startswith("peft") or fmt in ("kohya", "diffusers-metadata") else rank)


FORMATS = {  # format -> (format name load_lora reports, alpha written)
    "processor": ("attention processors", None), "no-processor": ("attention processors", None),
    "processor-bin": ("attention processors", None), "peft": ("PEFT", 6.0), "peft-unet-prefix": ("PEFT", 1.5),
    "diffusers": ("diffusers", None), "diffusers-metadata": ("PEFT", 9.0), "kohya": ("kohya", 12.0),
}


# --------------------------------------------------------------------------- models and their outputs
def unet_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 32, generator=g)


@torch.no_grad()
def unet_out(model, reference: bool):
    sample, t, emb = unet_inputs()
    if reference:
        return model(sample, t, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": emb}).sample
    return model(sample, t, emb)


@torch.no_grad()
def prior_out(model, reference: bool):
    hidden, proj, text, mask = prior_inputs(batch=2)
    out = model(hidden, torch.tensor([5, 900]), proj, text, mask)
    return out.predicted_image_embedding if reference else out


MODELS = {  # name -> (checkpoint fixture, layers, prefix in pipeline-level files, output function)
    "unet": ("unet_checkpoint", UNET_LAYERS, "unet", unet_out),
    "prior": ("prior_checkpoint", PRIOR_LAYERS, "prior", prior_out),
}


@pytest.fixture(params=list(MODELS))
def model_case(request):
    fixture, layers, prefix, out = MODELS[request.param]
    folder, ref = request.getfixturevalue(fixture)
    return types.SimpleNamespace(kind=request.param, folder=folder, ref=ref, layers=layers, prefix=prefix, out=out,
                                 load=lambda: load_component(folder))


# --------------------------------------------------------------------------- every format
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_format_matches_merged_reference(model_case, fmt, tmp_path):
    c = model_case
    layers = random_lora(c.ref, c.layers, seed=1)
    file, alpha = write_lora(fmt, layers, tmp_path, c.prefix, FORMATS[fmt][1])
    assert lora_format(file) == FORMATS[fmt][0]
    ours = c.load()
    name = load_lora(ours, file, scale=0.7)
    assert adapters(ours)[name]["layers"] == len(layers)
    want = c.out(merged_reference(c.ref, (layers, alpha, 0.7)), reference=True)
    assert rel_err(want, c.out(c.ref, reference=True)) > 1e-3  # the LoRA changes the output
    assert_close(c.out(ours, reference=False), want)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_pipeline_file_reaches_unet_and_text_encoder(unet_checkpoint, tmp_path, fmt):
    """One file with unet. and text_encoder. keys (kohya: lora_unet_, lora_te_), loaded into a
    Kandinsky-shaped object (.prior.text_encoder, .decoder.unet): each part goes to its model."""
    folder, ref_unet = unet_checkpoint
    ref_text = make_text_reference()
    text_folder = tmp_path / "text_encoder"
    ref_text.save_pretrained(text_folder)
    unet, text = load_component(folder), load_component(text_folder)
    pipe = types.SimpleNamespace(prior=types.SimpleNamespace(text_encoder=text),
                                 decoder=types.SimpleNamespace(unet=unet))
    unet_layers = random_lora(ref_unet, UNET_LAYERS[:3], seed=2)
    text_layers = random_lora(ref_text, ["text_model.encoder.layers.0.self_attn.q_proj",
                                         "text_model.encoder.layers.1.self_attn.out_proj"], seed=3)
    sd, alpha = {}, (RANK if fmt == "diffusers" else 1.0)
    for prefix, kohya, layers in (("unet", "lora_unet", unet_layers), ("text_encoder", "lora_te", text_layers)):
        for path, (down, up) in layers.items():
            if fmt == "diffusers":
                sd[f"{prefix}.{path}.lora_A.weight"], sd[f"{prefix}.{path}.lora_B.weight"] = down, up
            else:
                key = f"{kohya}_{path.replace('.', '_')}"
                sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
                sd[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(sd, tmp_path / "pytorch_lora_weights.safetensors")
    load_lora(pipe, tmp_path / "pytorch_lora_weights.safetensors", scale=1.3)

    assert_close(unet_out(unet, False), unet_out(merged_reference(ref_unet, (unet_layers, alpha, 1.3)), True))
    ids = torch.randint(3, 1000, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = merged_reference(ref_text, (text_layers, alpha, 1.3))(ids)
        got = text(ids)
        assert rel_err(want.last_hidden_state, ref_text(ids).last_hidden_state) > 1e-3  # the LoRA matters
    assert_close(got.text_embeds, want.text_embeds)
    assert_close(got.last_hidden_state, want.last_hidden_state)


# --------------------------------------------------------------------------- add, train, save
def test_add_lora_defaults_save_and_reload(unet_checkpoint, tmp_path):
    folder, ref = unet_checkpoint
    unet = load_component(folder)
    params = add_lora(unet, rank=4, alpha=8)
    # every projection of every attention layer of the reference, image-token keys/values included
    expected = {f"{n}.{p}" for n, m in ref.named_modules() if type(m).__name__ == "Attention"
                for p in ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj")}
    assert len(expected) == 16 * 6 and len(params) == 2 * len(expected)
    assert all(p.requires_grad for p in params)
    assert {id(p) for p in unet.parameters() if p.requires_grad} == {id(p) for p in params}
    assert_close(unet_out(unet, False), unet_out(ref, True))  # up = 0: nothing changes yet
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.2)

    file = save_lora(unet, tmp_path / "adapter")
    saved, config = load_file(file), json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(saved) == {f"base_model.model.{p}.lora_{ab}.weight" for p in expected for ab in "AB"}
    assert config["r"] == 4 and config["lora_alpha"] == 8 and set(config["target_modules"]) == expected
    layers = {p: (saved[f"base_model.model.{p}.lora_A.weight"], saved[f"base_model.model.{p}.lora_B.weight"])
              for p in expected}
    want = unet_out(merged_reference(ref, (layers, 8, 1.0)), True)
    assert_close(unet_out(unet, False), want)
    fresh = load_component(folder)
    load_lora(fresh, tmp_path / "adapter")
    assert_close(unet_out(fresh, False), want)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_lora(unet, tmp_path / "adapter")


def test_add_lora_targets_prior(prior_checkpoint):
    folder, ref = prior_checkpoint
    prior = load_component(folder)
    add_lora(prior, 2, targets=["to_q", "blocks.1.mlp.fc1"])  # a reference name (suffix) and one of ours
    picked = {n for n, m in prior.named_modules() if isinstance(m, LoRALinear)}
    assert picked == {"blocks.0.attn.q", "blocks.1.attn.q", "blocks.1.mlp.fc1"}
    with pytest.raises(LoRAError, match="'nothing' matches no module"):
        add_lora(prior, 2, targets=["nothing"], name="b")
    with pytest.raises(LoRAError, match="not nn.Linear"):
        add_lora(prior, 2, targets=["blocks.0.norm1"], name="b")
    with pytest.raises(LoRAError, match="already loaded"):
        add_lora(prior, 2)
    with pytest.raises(LoRAError, match="rank must be a positive integer"):
        add_lora(prior, 0, name="c")
    assert list(adapters(prior)) == ["default"]  # failed calls added nothing


# --------------------------------------------------------------------------- merge, scales, several adapters
def test_merge_unmerge_and_remove(unet_checkpoint, tmp_path):
    folder, ref = unet_checkpoint
    layers = random_lora(ref, UNET_LAYERS, seed=4)
    file, alpha = write_lora("kohya", layers, tmp_path / "k", "unet", 5.0)
    unet = load_component(folder)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    load_lora(unet, file, scale=0.9, name="style")
    adapted = unet_out(unet, False)
    merge(unet)
    assert adapters(unet)["style"]["merged"]
    assert_close(unet_out(unet, False), adapted)  # merged: same output, the adapter is not applied twice
    assert (unet.mid.attn.add_k_proj.weight - before["mid.attn.add_k_proj.weight"]).abs().max() > 1e-3
    unmerge(unet)
    for k, v in before.items():
        torch.testing.assert_close(unet.state_dict()[k], v, rtol=0, atol=1e-6)
    set_scale(unet, "style", 0.0)
    assert_close(unet_out(unet, False), unet_out(ref, True))

    # merge + remove = the fine-tuned model, plain nn.Linear again, saved and loaded by the reference
    set_scale(unet, "style", 0.9)
    merge(unet, "style")
    remove_lora(unet)
    assert not any(isinstance(m, LoRALinear) for m in unet.modules())
    assert type(unet.mid.attn.add_k_proj) is nn.Linear
    assert set(unet.state_dict()) == set(before)
    from diffusers import UNet2DConditionModel

    save_component(unet, tmp_path / "merged")
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "merged").eval()
    assert_close(unet_out(reloaded, True), unet_out(merged_reference(ref, (layers, alpha, 0.9)), True))


def test_several_adapters_add_up(prior_checkpoint, tmp_path):
    folder, ref = prior_checkpoint
    a = random_lora(ref, PRIOR_LAYERS, seed=5)
    b = random_lora(ref, PRIOR_LAYERS[1:] + ["transformer_blocks.1.ff.net.2"], rank=2, seed=6)
    fa, _ = write_lora("processor", a, tmp_path / "a", "prior")
    fb, alpha_b = write_lora("peft", b, tmp_path / "b", "prior", 4.0)
    prior = load_component(folder)
    load_lora(prior, fa, scale=0.5, name="a")
    load_lora(prior, fb, scale=-1.2, name="b")
    assert_close(prior_out(prior, False), prior_out(merged_reference(ref, (a, RANK, 0.5), (b, alpha_b, -1.2)), True))
    set_scale(prior, "a", 0)
    assert_close(prior_out(prior, False), prior_out(merged_reference(ref, (b, alpha_b, -1.2)), True))
    merge(prior, "b")
    set_scale(prior, "b", 2.0)  # re-merged at the new scale
    set_scale(prior, "a", 1.0)
    assert_close(prior_out(prior, False), prior_out(merged_reference(ref, (a, RANK, 1.0), (b, alpha_b, 2.0)), True))
    remove_lora(prior, "a")
    assert list(adapters(prior)) == ["b"]
    assert_close(prior_out(prior, False), prior_out(merged_reference(ref, (b, alpha_b, 2.0)), True))
    with pytest.raises(LoRAError, match="no LoRA adapter named 'a'.*loaded: \\['b'\\]"):
        set_scale(prior, "a", 1.0)


# --------------------------------------------------------------------------- a strength's range, at every door
OUT_OF_RANGE = [1e9, -10.5, float("nan"), float("inf"), float("-inf")]


def _range_message(who: str, value: float) -> str:
    return (f"{who}: strength {value:g} is out of range: a LoRA's strength is a finite number from -10 to 10, "
            "about 0-2 in use")


def test_strength_range_at_every_python_door(prior_checkpoint, tmp_path):
    """load_lora, set_scale and parse_lora_arg take a strength within +-10 (the edges included, each equal
    to the reference with that scale merged by hand); beyond, NaN / inf or not a number: LoRAError naming
    the call, the value and the range, and nothing changes."""
    import re

    import numpy as np

    from kandinsky.lora import MAX_SCALE

    assert MAX_SCALE == 10
    folder, ref = prior_checkpoint
    a = random_lora(ref, PRIOR_LAYERS, seed=11)
    file, _ = write_lora("processor", a, tmp_path, "prior")
    prior = load_component(folder)
    for value in OUT_OF_RANGE:
        with pytest.raises(LoRAError, match=re.escape(_range_message("load_lora", value))):
            load_lora(prior, file, scale=value)
    for value in (True, "0.8", None, torch.tensor(0.5)):
        with pytest.raises(LoRAError, match="load_lora: a LoRA's strength must be a number"):
            load_lora(prior, file, scale=value)
    assert adapters(prior) == {}
    load_lora(prior, file, scale=-10, name="edge")
    assert_close(prior_out(prior, False), prior_out(merged_reference(ref, (a, RANK, -10.0)), True))
    for value in OUT_OF_RANGE:
        with pytest.raises(LoRAError, match=re.escape(_range_message("set_scale", value))):
            set_scale(prior, "edge", value)
    assert adapters(prior)["edge"]["scale"] == -10.0
    merge(prior, "edge")  # fusing: the merged weights follow set_scale, within the range
    set_scale(prior, "edge", np.float32(10.0))  # numpy numbers are numbers
    assert adapters(prior)["edge"]["scale"] == 10.0 and type(adapters(prior)["edge"]["scale"]) is float
    assert_close(prior_out(prior, False), prior_out(merged_reference(ref, (a, RANK, 10.0)), True))
    for value, text in [(1e9, "1e9"), (float("nan"), "nan"), (float("inf"), "inf"), (-11.0, "-11")]:
        with pytest.raises(LoRAError, match=re.escape(_range_message(f"--lora style.safetensors:{text}", value))):
            parse_lora_arg(f"style.safetensors:{text}")
    assert parse_lora_arg("style.safetensors:-10") == ("style.safetensors", -10.0)


def test_not_weights_refused_by_first_bytes_at_every_python_door(prior_checkpoint, tmp_path):
    """A picture named as a LoRA (as a file, or as a folder's adapter_model.safetensors / .bin) is refused
    by its first bytes: no torch advice to unpickle it with weights_only=False."""
    import PIL.Image

    from kandinsky.lora import check_lora_file

    prior = load_component(prior_checkpoint[0])
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "cat.png")
    (tmp_path / "folder").mkdir()
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "folder" / "adapter_model.bin", format="PNG")
    for path, named in [(tmp_path / "cat.png", tmp_path / "cat.png"),
                        (tmp_path / "folder", tmp_path / "folder" / "adapter_model.bin")]:
        for door in (lambda: load_lora(prior, path), lambda: lora_format(path)):
            with pytest.raises(LoRAError) as e:
                door()
            assert str(e.value).startswith(f"{named}: not a LoRA weights file (a .safetensors file, a torch "
                                           ".bin / .pt file, or a PEFT adapter folder); nothing was loaded")
            assert "weights_only" not in str(e.value)
    assert adapters(prior) == {}
    # the three kinds of weights file pass: safetensors, a torch zip archive, a legacy pickle
    save_file({"x": torch.zeros(1)}, tmp_path / "a.safetensors")
    torch.save({"x": torch.zeros(1)}, tmp_path / "b.bin")
    torch.save({"x": torch.zeros(1)}, tmp_path / "c.bin", _use_new_zipfile_serialization=False)
    for name in ("a.safetensors", "b.bin", "c.bin"):
        check_lora_file(tmp_path / name)


# --------------------------------------------------------------------------- refusals
def test_bad_files_raise_and_change_nothing(unet_checkpoint, prior_checkpoint, tmp_path):
    folder, ref = unet_checkpoint
    unet = load_component(folder)
    good = random_lora(ref, UNET_LAYERS[:2], seed=7)

    def file_with(extra: dict, name: str):
        sd = {f"unet.{p}.lora_A.weight": d for p, (d, u) in good.items()}
        sd.update({f"unet.{p}.lora_B.weight": u for p, (d, u) in good.items()})
        sd.update(extra)
        save_file(sd, tmp_path / name)
        return tmp_path / name

    # a Stable Diffusion LoRA (transformer_blocks inside the attentions): no such module here
    sd_key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    bad = file_with({f"{sd_key}.lora_A.weight": torch.zeros(3, 64), f"{sd_key}.lora_B.weight": torch.zeros(64, 3)},
                    "sd.safetensors")
    with pytest.raises(LoRAError, match=r"1 of 3 LoRA layer\(s\) match no module.*transformer_blocks\.0\.attn1"):
        load_lora(unet, bad)
    with pytest.raises(LoRAError, match="not LoRA weights.*unet.conv_in.weight"):
        load_lora(unet, file_with({"unet.conv_in.weight": torch.zeros(3)}, "plain.safetensors"))
    path = "unet.down_blocks.1.attentions.0.to_q"
    with pytest.raises(LoRAError, match=rf"{path}\.lora_B\.weight has shape \(5, 3\), expected \(64, 3\)"):
        load_lora(unet, file_with({f"{path}.lora_B.weight": torch.zeros(5, 3)}, "shape.safetensors"))
    with pytest.raises(LoRAError, match="no matching 'up' tensor"):
        load_lora(unet, file_with({"unet.mid_block.attentions.0.to_q.lora_A.weight": torch.zeros(3, 96)},
                                  "half.safetensors"))
    with pytest.raises(LoRAError, match="adapts .*conv_in \\(Conv2d\\)"):
        load_lora(unet, file_with({"unet.conv_in.lora_A.weight": torch.zeros(3, 4),
                                   "unet.conv_in.lora_B.weight": torch.zeros(32, 3)}, "conv.safetensors"))
    # a prior LoRA into a decoder-only object
    prior_lora, _ = write_lora("processor", random_lora(prior_checkpoint[1], PRIOR_LAYERS), tmp_path / "p", "prior")
    with pytest.raises(LoRAError, match="match no module of the UNet"):
        load_lora(types.SimpleNamespace(unet=unet), prior_lora)
    # a config that does not belong to the weights
    peft, _ = write_lora("peft", good, tmp_path / "peft", "unet", 4.0)
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 8}))
    with pytest.raises(LoRAError, match="has rank 3 but the adapter config says r=8"):
        load_lora(unet, peft)
    assert adapters(unet) == {} and not any(isinstance(m, LoRALinear) for m in unet.modules())
    assert_close(unet_out(unet, False), unet_out(ref, True))
    with pytest.raises(LoRAError, match="holds no model LoRA can adapt"):
        load_lora(object(), peft)


# --------------------------------------------------------------------------- the CLI helpers
def test_parse_lora_arg(tmp_path):
    assert parse_lora_arg("style.safetensors:0.8") == ("style.safetensors", 0.8)
    assert parse_lora_arg("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora_arg("dir:odd/style.safetensors:-0.5") == ("dir:odd/style.safetensors", -0.5)
    odd = tmp_path / "a:b"
    odd.write_bytes(b"")
    assert parse_lora_arg(str(odd)) == (str(odd), 1.0)  # an existing file wins over the ':' rule
    with pytest.raises(LoRAError, match="'strong' after the last ':' is not a number"):
        parse_lora_arg("style.safetensors:strong")
    with pytest.raises(LoRAError, match="finite"):
        parse_lora_arg("style.safetensors:nan")


def test_apply_lora_args(prior_checkpoint, tmp_path, capsys):
    folder, ref = prior_checkpoint
    a = random_lora(ref, PRIOR_LAYERS, seed=8)
    file, _ = write_lora("processor", a, tmp_path, "prior")
    pipe = types.SimpleNamespace(prior=load_component(folder))
    parser = argparse.ArgumentParser()
    add_lora_argument(parser)
    assert parser.parse_args([]).lora == []
    with pytest.raises(SystemExit):  # a usage error (exit status 2) before anything loads
        parser.parse_args(["--lora", "missing.safetensors"])
    assert "missing.safetensors: no such file or folder" in capsys.readouterr().err
    args = parser.parse_args(["--lora", f"{file}:0.25", "--lora", f"{file}:0.5"])
    names = apply_lora_args(pipe, args.lora)
    assert names == ["lora", "lora_2"]
    assert_close(prior_out(pipe.prior, False), prior_out(merged_reference(ref, (a, RANK, 0.75)), True))
    with pytest.raises(LoRAError, match="--lora missing.safetensors:0.5: missing.safetensors: no such file"):
        apply_lora_args(pipe, ["missing.safetensors:0.5"])


def test_half_precision_model_and_wrappers(prior_checkpoint, tmp_path):
    """fp32 adapters train on a bf16 model; a DDP-style ``.module`` wrapper is looked through."""
    folder, ref = prior_checkpoint
    prior = load_component(folder, dtype=torch.bfloat16)
    wrapper = nn.Module()
    wrapper.module = prior  # what DistributedDataParallel looks like from outside
    params = add_lora(wrapper, 4)
    assert {p.dtype for p in params} == {torch.float32} and prior.blocks[0].attn.q.weight.dtype == torch.bfloat16
    hidden, proj, text, mask = (x.bfloat16() if x.is_floating_point() else x for x in prior_inputs(batch=2))
    out = prior(hidden, 3, proj, text, mask)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert params[-1].grad is not None and params[-1].grad.abs().max() > 0  # up gets a gradient at once
    file = save_lora(wrapper, tmp_path / "lora.safetensors")
    assert (tmp_path / "adapter_config.json").is_file() and file.is_file()


def test_peft_itself_reads_and_writes_our_files(unet_checkpoint, tmp_path):
    """With PEFT installed (not a dependency): our file on the reference UNet through PEFT gives our
    output, and a PEFT adapter saved from the reference loads into ours."""
    peft = pytest.importorskip("peft")
    folder, ref = unet_checkpoint
    ours = load_component(folder)
    with torch.no_grad():
        for p in add_lora(ours, 4, alpha=7):
            p.normal_(0, 0.3)
    save_lora(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(ref), tmp_path / "ours").eval()
    assert_close(unet_out(ours, False), unet_out(theirs.base_model.model, True))

    config = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["to_q", "add_v_proj"], init_lora_weights=False)
    trained = peft.get_peft_model(copy.deepcopy(ref), config).eval()
    trained.save_pretrained(tmp_path / "theirs")
    fresh = load_component(folder)
    load_lora(fresh, tmp_path / "theirs")
    assert_close(unet_out(fresh, False), unet_out(trained.base_model.model, True))
