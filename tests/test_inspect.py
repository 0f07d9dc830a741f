"""kandinsky/research/inspect.py (`kandinsky inspect`, `kandinsky.module_names`): parameter counts
and shapes from the shipped real configs on the meta device, checked against the published counts,
the reference library's own model, a real forward, and the shape listings of docs/architecture.md
(a test fails when the doc drifts)."""
from __future__ import annotations

import argparse
import json
import pathlib
import re

import pytest
import torch

import kandinsky
from kandinsky.cli import main
from kandinsky.demo import TINY
from kandinsky.research import inspect as ki
from weights_convert import build_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARCH = ROOT / "docs" / "architecture.md"

# Published parameter counts (model cards; /work/shared/reference-configs/README.md).
PUBLISHED = {"text_encoder": 694_659_840, "image_encoder": 1_844_907_264, "prior": 1_026_225_920,
             "unet": 1_253_057_288, "unet-inpaint": 1_253_074_568, "unet-controlnet": 1_253_429_212,
             "movq": 67_832_495}


@pytest.fixture(scope="module")
def unet_rows():
    return {r.name: r for r in ki.tree(ki.meta_model(ki.shipped_config("unet")), "512x512", depth=None)}


def test_shipped_configs_are_the_reference_ones(reference_configs):
    for component, (checkpoint, folder) in ki.COMPONENTS.items():
        shipped = json.loads((ki.CONFIGS / checkpoint / folder / "config.json").read_text())
        reference = json.loads((reference_configs / checkpoint / folder / "config.json").read_text())
        assert shipped == reference, component


@pytest.mark.parametrize("component", list(PUBLISHED))
def test_parameter_counts_equal_the_published_ones(component):
    model = ki.meta_model(ki.shipped_config(component))
    rows = ki.tree(model, "512x512", depth=1)
    assert rows[0].params == PUBLISHED[component]
    own = sum(p.numel() for p in model.parameters(recurse=False))  # class_embedding, prd_token, ...
    assert rows[0].params == own + sum(r.params for r in rows[1:])  # the children add up


def test_unet_shapes_equal_the_reference_unet_on_meta(unet_rows):
    """Our level outputs at 512 px equal diffusers' UNet2DConditionModel block outputs for the
    same config (both on the meta device)."""
    from diffusers import UNet2DConditionModel

    config = ki.shipped_config("unet")
    with torch.device("meta"):
        ref = UNet2DConditionModel.from_config(config)
    seen = {}
    for i, block in enumerate(ref.down_blocks):
        block.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(f"down.{i}", tuple(o[0].shape)))
    for i, block in enumerate(ref.up_blocks):
        block.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(f"up.{i}", tuple(o.shape)))
    ref.mid_block.register_forward_hook(lambda m, a, o: seen.__setitem__("mid", tuple(o.shape)))
    with torch.no_grad():
        ref(torch.empty(1, 4, 64, 64, device="meta"), 999, None,
            added_cond_kwargs={"image_embeds": torch.empty(1, 1280, device="meta")})
    for name, shape in seen.items():
        assert unet_rows[name].shape == shape, name


def test_module_names_shapes_equal_a_real_forward():
    unet = build_model(TINY["unet"]).eval()
    names = kandinsky.module_names(unet, "*", size=(64, 128), batch=2)
    sample = torch.randn(2, 4, 16, 8)  # latents of a 64 wide, 128 high image
    seen = {}
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: seen.__setitem__(n, tuple(o.shape)))
               for n, m in unet.named_modules() if n]
    with torch.no_grad():
        unet(sample, 10, torch.randn(2, 32))
    for hd in handles:
        hd.remove()
    assert set(names) == {n for n, _ in unet.named_modules() if n}
    for n, shape in names.items():
        assert shape == seen.get(n), n
    assert kandinsky.module_names(unet, "mid.attn") == {"mid.attn": (1, 64, 8, 8)}  # 512 px: 64 / 8



def test_architecture_doc_unet_listing_is_current(unet_rows):
    """docs/architecture.md 2.4 lists each level's output at 64 x 64 latents (512 px)."""
    text = ARCH.read_text()
    block = text.split("### 2.4", 1)[1].split("```", 2)[1]
    listed = dict(re.findall(r"^((?:down|up)\.\d|mid)\s.*?(\(B, [\d, ]+\))", block, flags=re.M))
    assert len(listed) == 9
    for name, shape in listed.items():
        assert ki._fmt_shape(unet_rows[name].shape) == shape, f"docs/architecture.md lists {name} as {shape}"


def test_architecture_doc_parameter_counts_are_current():
    """The chain table of docs/architecture.md section 1 carries inspect's counts."""
    text = ARCH.read_text()
    for component, label in (("text_encoder", "text encoder"), ("image_encoder", "image encoder"),
                             ("prior", "prior"), ("unet", "UNet"), ("movq", "MoVQ")):
        row = re.search(rf"^\| {label} \|.*$", text, flags=re.M).group(0)
        count = ki.tree(ki.meta_model(ki.shipped_config(component)), "512x512", depth=0)[0].params
        assert f"{count:,}" in row, f"{label}: {count:,} not in {row}"
        if component == "unet":
            for variant in ("unet-inpaint", "unet-controlnet"):
                assert f"{PUBLISHED[variant]:,}" in row


def test_architecture_doc_generated_tables_are_current(capsys):
    """Every table under a `<!-- kandinsky inspect ARGS -->` comment is the output of
    `kandinsky inspect ARGS --format markdown`."""
    text = ARCH.read_text()
    blocks = re.findall(r"<!-- kandinsky inspect (.*?) -->\n+((?:\|.*\n)+)", text)
    if not blocks:
        pytest.skip("docs/architecture.md has no generated inspect tables yet")
    for args, table in blocks:
        assert main(["inspect", *args.split(), "--format", "markdown"]) == 0
        generated = capsys.readouterr().out.split("\n\n", 1)[1]
        assert table.strip() == generated.strip(), f"regenerate with: kandinsky inspect {args} --format markdown"


@pytest.mark.parametrize("size, expected", [("512x768", (512, 768)), ("64", (64, 64)), ("128X64", (128, 64)),
                                            (96, (96, 96)), ((128, 64), (128, 64))])
def test_read_size(size, expected):
    assert ki.read_size(size) == expected


def test_one_size_reader_for_the_api_and_the_cli():
    """--size's argparse type is read_size (same result, same message); parse_size adds the UNet's
    multiple of 64."""
    from kandinsky.cli import common

    assert common.size("128X64") == ki.read_size("128X64") == ki.parse_size("128x64") == (128, 64)
    for bad in ("64x", "x64", "0x64", "64x64x64", "big", "-64"):
        with pytest.raises(ValueError, match="is not a size: give WIDTHxHEIGHT") as api:
            ki.read_size(bad)
        with pytest.raises(argparse.ArgumentTypeError) as cli:
            common.size(bad)
        assert str(cli.value) == str(api.value)
    with pytest.raises(ValueError, match=r"^size 96x64: width and height must be positive multiples of 64"):
        ki.parse_size("96x64")
    with pytest.raises(ValueError, match=r"^size 0x64: width and height must be positive"):
        ki.parse_size((0, 64))
