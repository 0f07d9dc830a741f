"""Adversarial review of the components and the loader, as a researcher would use them.

Every test compares with the reference library (diffusers / transformers) or asserts a
property that could fail:

* load_component on every file form the hub (and old torch) writes: legacy non-zip ``.bin``,
  sharded ``.bin``, variant shard indexes as diffusers 0.42 / transformers 5 name them, folders
  holding several forms (which one wins), fp16 kandinsky-layout folders, ``device="meta"``,
  argument and path errors;
* half-precision forwards (fp16, bf16) against the reference in the same dtype;
* the real hub configs build on the meta device with the documented parameter counts;
* ``torch.compile(fullgraph=True)`` of every component against the reference;
* fine-tuning: loaded models come back frozen in eval mode; after ``train().requires_grad_()``
  the gradients equal the reference's and an optimizer step leaves the file untouched;
* clear errors for the common input mistakes (dtype, device, layout) of every component;
* the module tree documented in docs/architecture.md is exactly the code's.
"""
from __future__ import annotations

import copy
import json
import re
import struct
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_close, randomize_, rel_err
from tests.refs.clip import TINY_TEXT_CONFIG, TINY_VISION_CONFIG, make_text_reference, make_vision_reference
from tests.refs.movq import MOVQ_TINY_CONFIG, make_reference_movq
from tests.refs.prior import PRIOR_TINY_CONFIG, make_reference_prior, prior_inputs
from tests.refs.unet import make_reference_unet, tiny_unet_config
from weights_convert import (
    ConfigError,
    WeightsError,
    build_model,
    convert_state_dict,
    load_component,
    read_config,
    save_component,
)
from weights_convert.io import read_safetensors_header

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"


def _saved(ref, folder: Path, **kwargs) -> Path:
    ref.save_pretrained(folder, **kwargs)
    return folder


def _expected_state(ref, folder: Path) -> dict:
    """The reference's tensors under our names."""
    return convert_state_dict(read_config(folder), dict(ref.state_dict()))


def _same_tensors(model, expected: dict, tol: float = 0.0) -> None:
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        err = (got[k].double() - v.double()).abs().max().item()
        assert err <= tol * v.double().abs().max().item(), f"{k}: differs by {err}"


# ============================================================================ loader: file forms
@pytest.fixture(scope="module")
def movq_ref():
    return make_reference_movq(seed=11)


@pytest.fixture(scope="module")
def text_ref():
    return make_text_reference(dict(TINY_TEXT_CONFIG, vocab_size=1000), seed=12)


def test_variant_shard_indexes_as_the_libraries_name_them(movq_ref, text_ref, tmp_path):
    """diffusers 0.42 and transformers 5 write a sharded fp16 variant as
    ``<stem>.fp16-0000k-of-0000n.<ext>`` + ``<stem>.<ext>.index.fp16.json``; both load, with and
    without ``variant="fp16"``, to the reference's weights rounded to fp16."""
    forms = {
        "diffusers safetensors": (movq_ref, dict(), "diffusion_pytorch_model.safetensors.index.fp16.json"),
        "diffusers bin": (movq_ref, dict(safe_serialization=False), "diffusion_pytorch_model.bin.index.fp16.json"),
        "transformers safetensors": (text_ref, dict(), "model.safetensors.index.fp16.json"),
    }
    for name, (ref, kwargs, index) in forms.items():
        half = copy.deepcopy(ref).half()
        folder = _saved(half, tmp_path / name.replace(" ", "-"), variant="fp16", max_shard_size="50KB", **kwargs)
        assert (folder / index).is_file(), sorted(p.name for p in folder.iterdir())
        assert len(list(folder.glob("*.fp16-0000*"))) > 1, name
        expected = _expected_state(half, folder)
        for variant in (None, "fp16"):
            model = load_component(folder, variant=variant)
            assert {p.dtype for p in model.parameters()} == {torch.float32}
            _same_tensors(model, expected)


def test_legacy_non_zip_bin(movq_ref, tmp_path):
    """torch.save(..., _use_new_zipfile_serialization=False): the pre-1.6 format, not mmap-able."""
    folder = tmp_path / "movq"
    movq_ref.save_config(folder)
    torch.save(movq_ref.state_dict(), folder / "diffusion_pytorch_model.bin", _use_new_zipfile_serialization=False)
    _same_tensors(load_component(folder), _expected_state(movq_ref, folder))


def test_sharded_bin_both_libraries(movq_ref, text_ref, tmp_path):
    """diffusers' sharded .bin (save_pretrained) and transformers 4's pytorch_model.bin.index.json
    (written by hand: transformers 5 no longer writes .bin)."""
    folder = _saved(movq_ref, tmp_path / "movq", safe_serialization=False, max_shard_size="100KB")
    assert (folder / "diffusion_pytorch_model.bin.index.json").is_file()
    _same_tensors(load_component(folder), _expected_state(movq_ref, folder))

    folder = _saved(text_ref, tmp_path / "text")
    (folder / "model.safetensors").unlink()
    state = text_ref.state_dict()
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, keys in halves.items():
        torch.save({k: state[k].clone() for k in keys}, folder / file)
    index = {"metadata": {}, "weight_map": {k: f for f, keys in halves.items() for k in keys}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    _same_tensors(load_component(folder), _expected_state(text_ref, folder))


def test_which_file_wins(tmp_path):
    """safetensors beat .bin of the same precision; full precision beats a half variant whatever
    the formats (an fp32 .bin next to an fp16 safetensors loads the fp32 weights); an explicit
    variant wins."""
    a, b = make_reference_movq(seed=1), make_reference_movq(seed=2)  # tell the files apart
    folder = tmp_path / "movq"
    a.save_pretrained(folder, safe_serialization=False)  # diffusion_pytorch_model.bin     (a, fp32)
    b.save_pretrained(folder)  # diffusion_pytorch_model.safetensors                     (b, fp32)
    copy.deepcopy(b).half().save_pretrained(folder, variant="fp16")  # .fp16.safetensors (b, fp16)
    _same_tensors(load_component(folder), _expected_state(b, folder))

    (folder / "diffusion_pytorch_model.safetensors").unlink()
    _same_tensors(load_component(folder), _expected_state(a, folder))  # fp32 .bin, not the fp16 file
    half = load_component(folder, variant="fp16", dtype=torch.float16)
    _same_tensors(half, _expected_state(copy.deepcopy(b).half(), folder))


def test_kandinsky_layout_saved_in_fp16(movq_ref, tmp_path):
    """A kandinsky-layout folder written in fp16 loads as float32 by default (like the hub's fp16
    files), as fp16 when asked, and still loads in diffusers after conversion back."""
    ours = load_component(_saved(movq_ref, tmp_path / "hub"))
    save_component(ours, tmp_path / "k16", layout="kandinsky", dtype=torch.float16)
    header, _ = read_safetensors_header(tmp_path / "k16" / "kandinsky.safetensors")
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}
    expected = _expected_state(copy.deepcopy(movq_ref).half(), tmp_path / "hub")
    model = load_component(tmp_path / "k16")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    _same_tensors(model, expected)
    assert {p.dtype for p in load_component(tmp_path / "k16", dtype=torch.float16).parameters()} == {torch.float16}


def test_device_meta(text_ref, tmp_path):
    folder = _saved(text_ref, tmp_path / "text")
    model = load_component(folder, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        k: tuple(v.shape) for k, v in _expected_state(text_ref, folder).items()
    }


def test_loader_argument_and_path_errors(movq_ref, tmp_path):
    folder = _saved(movq_ref, tmp_path / "repo" / "movq")
    for bad in ("float16", torch.int8, torch.bool):
        with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype"):
            load_component(folder, dtype=bad)
    model = load_component(folder)
    with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype"):
        save_component(model, tmp_path / "out", dtype=torch.int32)
    # a file instead of its folder; a whole checkpoint instead of one component
    with pytest.raises(WeightsError, match=r"is a file; pass the component folder"):
        load_component(folder / "config.json")
    (tmp_path / "repo" / "model_index.json").write_text("{}")
    with pytest.raises(WeightsError, match=r"whole checkpoint.*movq/"):
        load_component(tmp_path / "repo")


def test_unreadable_safetensors_dtype_is_named(movq_ref, tmp_path):
    folder = _saved(movq_ref, tmp_path / "movq")
    path = folder / "diffusion_pytorch_model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = "C64"
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new))  # same length: offsets stay valid
    assert len(new) == n
    path.write_bytes(raw[:8] + new + raw[8 + n :])
    with pytest.raises(WeightsError, match=rf"{re.escape(name)}.*C64.*cannot read"):
        load_component(folder)


# ============================================================================ real configs
DOCUMENTED_PARAMS = {  # docs/architecture.md, section 1
    "kandinsky-2-2-prior/text_encoder": 694_659_840,
    "kandinsky-2-2-prior/image_encoder": 1_844_907_264,
    "kandinsky-2-2-prior/prior": 1_026_225_920,
    "kandinsky-2-2-decoder/unet": 1_253_057_288,
    "kandinsky-2-2-decoder-inpaint/unet": 1_253_074_568,
    "kandinsky-2-2-controlnet-depth/unet": 1_253_429_212,
    "kandinsky-2-2-decoder/movq": 67_832_495,
    "kandinsky-2-2-decoder-inpaint/movq": 67_832_495,
    "kandinsky-2-2-controlnet-depth/movq": 67_832_495,
}


def test_every_real_hub_config_builds_on_meta():
    found = {str(p.parent.relative_to(DATA)) for p in DATA.glob("*/*/config.json")}
    assert found == set(DOCUMENTED_PARAMS)
    arch = (ROOT / "docs" / "architecture.md").read_text()
    for name, count in DOCUMENTED_PARAMS.items():
        config = json.loads((DATA / name / "config.json").read_text())
        with torch.device("meta"):
            model = build_model(config)
        assert sum(p.numel() for p in model.parameters()) == count, name
        assert f"{count:,}" in arch
        # the written config describes the same network
        assert type(model.config).from_dict(model.config.to_dict()) == model.config


# ============================================================================ tiny models for the rest
def _unet_ref(variant="controlnet", scale=0.2, **overrides):
    ref = make_reference_unet(variant, seed=3, layers_per_block=1, **overrides)
    return randomize_(ref, seed=3, scale=scale).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (reference, folder) for one tiny model of each component."""
    root = tmp_path_factory.mktemp("review")
    refs = {
        "text": make_text_reference(seed=4),
        "vision": make_vision_reference(seed=5),
        "prior": make_reference_prior(seed=6),
        "unet": _unet_ref(),
        "movq": make_reference_movq(seed=7),
    }
    return {name: (ref, _saved(ref, root / name)) for name, ref in refs.items()}


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(300, 40000, (2, 77), generator=g)
    ids[0, 9], ids[1, 30] = 49407, 49407  # end-of-text, then "padding" ids below it
    mask = torch.arange(77)[None] <= torch.tensor([[9], [30]])
    return {
        "ids": ids,
        "mask": mask,
        "pixels": torch.randn(2, 3, 32, 32, generator=g),
        "images": torch.rand(2, 3, 32, 48, generator=g) * 2 - 1,
        "latents": torch.randn(2, 4, 4, 6, generator=g),
        "sample": torch.randn(2, 4, 8, 16, generator=g),
        "image_embeds": torch.randn(2, 32, generator=g),
        "hint": torch.rand(2, 3, 64, 128, generator=g),
        "t": torch.tensor([17, 640]),
        "prior": prior_inputs(2, seed=seed),
    }


def _run(name, model, x, ours: bool, dtype=torch.float32):
    """One forward of a component (ours or the reference) -> one output tensor."""
    c = lambda v: v.to(dtype)  # noqa: E731
    if name == "text":
        out = model(x["ids"], attention_mask=x["mask"])
        return torch.cat([out.text_embeds.flatten(), out.last_hidden_state.flatten()])
    if name == "vision":
        return model(c(x["pixels"])) if ours else model(c(x["pixels"])).image_embeds
    if name == "prior":
        hidden, proj, text, mask = x["prior"]
        args = (c(hidden), x["t"], c(proj), c(text))
        return model(*args, mask) if ours else model(*args, attention_mask=mask).predicted_image_embedding
    if name == "unet":
        if ours:
            return model(c(x["sample"]), x["t"], c(x["image_embeds"]), hint=c(x["hint"]))
        cond = {"image_embeds": c(x["image_embeds"]), "hint": c(x["hint"])}
        return model(c(x["sample"]), x["t"], None, added_cond_kwargs=cond).sample
    if name == "movq":  # encode, decode the continuous latents (the pipelines' path)
        if ours:
            return model.decode(model.encode(c(x["images"])), force_not_quantize=True)
        return model.decode(model.encode(c(x["images"])).latents, force_not_quantize=True).sample
    raise KeyError(name)


# ============================================================================ half precision
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 1e-2), (torch.bfloat16, 6e-2)])
@pytest.mark.parametrize("name", ["text", "vision", "unet", "movq"])
def test_half_precision_matches_reference_in_same_dtype(tiny, name, dtype, tol, tmp_path):
    """load_component(dtype=...) then a forward in that dtype, against the reference cast to
    the same dtype (the prior has its own test in test_prior.py)."""
    ref, folder = tiny[name]
    if name == "unet":  # smaller weights: the 0.2-scale tiny UNet overflows fp16 (in both libraries)
        ref = _unet_ref(scale=0.05)
        folder = _saved(ref, tmp_path / "unet")
    x = _inputs()
    ours = load_component(folder, dtype=dtype)
    assert {p.dtype for p in ours.parameters()} == {dtype} and ours.dtype == dtype
    with torch.no_grad():
        got = _run(name, ours, x, ours=True, dtype=dtype)
        want = _run(name, copy.deepcopy(ref).to(dtype), x, ours=False, dtype=dtype)
        full = _run(name, ref, x, ours=False)
    assert got.dtype == dtype and torch.isfinite(got).all()
    err = rel_err(got, want)
    assert err < tol, f"{name} {dtype}: {err:.2e}"
    # and no further from float32 than the reference is (plus rounding noise)
    assert rel_err(got, full) < 2 * rel_err(want, full) + tol / 4


# ============================================================================ torch.compile
@pytest.mark.parametrize("name", ["text", "vision", "unet", "movq"])
def test_compiles_fullgraph_and_matches_reference(tiny, name):
    """One graph, no breaks (fullgraph=True), same numbers as the reference. MoVQ: encode, and
    decode both through the codebook and not (the pipelines' path). The prior: test_prior.py."""
    ref, folder = tiny[name]
    ours = load_component(folder)
    x = _inputs(seed=1)
    torch._dynamo.reset()
    with torch.no_grad():
        if name == "movq":
            latents = torch.compile(ours.encode, fullgraph=True, backend="eager")(x["images"])
            assert_close(latents, ref.encode(x["images"]).latents)
            for quantize in (False, True):
                fn = torch.compile(lambda z: ours.decode(z, force_not_quantize=not quantize), fullgraph=True,
                                   backend="eager")
                want = ref.decode(x["latents"], force_not_quantize=not quantize).sample
                assert_close(fn(x["latents"]), want)
        else:
            compiled = torch.compile(ours, fullgraph=True, backend="eager")
            assert_close(_run(name, compiled, x, ours=True), _run(name, ref, x, ours=False))
            if name == "text":  # and without a mask (the prior pipeline's call)
                assert_close(compiled(x["ids"]).text_embeds, ref(x["ids"]).text_embeds)


# ============================================================================ fine-tuning
# (name, parameters whose gradients are compared: a deep one and an early one)
GRAD_CHECKS = {
    "text": ("blocks.1.attn.q_proj.weight", "token_embedding.weight"),
    "vision": ("blocks.0.mlp.fc1.weight", "class_embedding"),
    "prior": ("blocks.0.attn.k.weight", "prd_token"),
    "unet": ("down.1.attn.0.add_k_proj.weight", "hint_encoder.convs.0.weight"),
    "movq": ("encoder.down.0.res.0.conv1.weight", "decoder.up.1.res.0.norm1.conv_y.weight"),
}


@pytest.mark.parametrize("name", sorted(GRAD_CHECKS))
def test_gradients_match_reference_and_step_leaves_file_untouched(tiny, name):
    ref, folder = tiny[name]
    ours = load_component(folder)
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    ours.train().requires_grad_(True)
    ref = copy.deepcopy(ref).train().requires_grad_(True)
    x = _inputs(seed=2)
    _run(name, ours, x, ours=True).square().mean().backward()
    _run(name, ref, x, ours=False).square().mean().backward()

    ref_grads = convert_state_dict(read_config(folder), {k: p.grad for k, p in ref.named_parameters()})
    ours_grads = {k: p.grad for k, p in ours.named_parameters()}
    # the same parameters get gradients (MoVQ's codebook and the prior's clip_mean / clip_std: none)
    assert {k for k, g in ours_grads.items() if g is None} == {k for k, g in ref_grads.items() if g is None}
    assert any(g is not None and g.abs().max() > 0 for g in ours_grads.values())
    for k in GRAD_CHECKS[name]:
        assert ref_grads[k].abs().max() > 0, k
        err = rel_err(ours_grads[k], ref_grads[k])
        assert err < 1e-4, f"{name} {k}: gradient relative error {err:.2e}"

    # an optimizer step changes the weights in memory, not the checkpoint file
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    torch.optim.AdamW(ours.parameters(), lr=1e-2).step()
    changed = [k for k, v in ours.state_dict().items() if not torch.equal(v, before[k])]
    assert GRAD_CHECKS[name][0] in changed
    _same_tensors(load_component(folder), _expected_state(tiny[name][0], folder))
    _run(name, ours, x, ours=True).sum().backward()  # and training goes on


# ============================================================================ input errors
@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {
        "text": build_model(TINY_TEXT_CONFIG),
        "vision": build_model(TINY_VISION_CONFIG),
        "prior": build_model({"_class_name": "PriorTransformer", **PRIOR_TINY_CONFIG}),
        "unet": build_model({"_class_name": "UNet2DConditionModel", **tiny_unet_config("decoder", layers_per_block=1)}),
        "controlnet": build_model({"_class_name": "UNet2DConditionModel",
                                   **tiny_unet_config("controlnet", layers_per_block=1)}),
        "movq": build_model({"_class_name": "VQModel", **MOVQ_TINY_CONFIG}),
    }


def _prior_args(dtype=torch.float32, batch=2):
    hidden, proj, text, mask = prior_inputs(batch)
    return hidden.to(dtype), 10, proj.to(dtype), text.to(dtype), mask


S, E = torch.randn(1, 4, 8, 8), torch.randn(1, 32)
IMG = torch.rand(1, 3, 32, 32) * 2 - 1
INPUT_MISTAKES = {
    # MoVQ
    "movq uint8 images": ("movq", lambda m: m.encode((IMG * 127 + 127).to(torch.uint8)), TypeError, r"x / 127.5 - 1"),
    "movq HWC images": ("movq", lambda m: m.encode(IMG.permute(0, 2, 3, 1)), ValueError, r"\(B, 3, H, W\)"),
    "movq numpy images": ("movq", lambda m: m.encode(IMG.numpy()), TypeError, "torch.Tensor"),
    "movq fp32 into fp16": ("movq", lambda m: m.half().encode(IMG), TypeError, r"float32.*float16.*movq.dtype"),
    "movq fp64 latents": ("movq", lambda m: m.decode(torch.randn(1, 4, 4, 4, dtype=torch.float64)), TypeError,
                          "latents is torch.float64"),
    "movq long latents": ("movq", lambda m: m.quantize(torch.zeros(1, 4, 4, 4, dtype=torch.long)), TypeError,
                          "floating-point"),
    # UNet
    "unet embeds too wide": ("unet", lambda m: m(S, 5, torch.randn(1, 1280)), ValueError, r"image_embeds must be.*1280"),
    "unet embeds 1-d": ("unet", lambda m: m(S, 5, torch.randn(32)), ValueError, r"image_embeds must be \(B"),
    "unet fp32 into fp16": ("unet", lambda m: m.half()(S, 5, E), TypeError, r"sample is torch.float32.*unet.dtype"),
    "unet long sample": ("unet", lambda m: m(S.long(), 5, E), TypeError, "sample must be a floating-point"),
    "unet uint8 hint": ("controlnet", lambda m: m(S, 5, E, hint=torch.zeros(1, 3, 64, 64, dtype=torch.uint8)),
                        TypeError, r"hint must be a floating-point tensor in \[0, 1\]"),
    "unet missing hint": ("controlnet", lambda m: m(S, 5, E), ValueError, "needs a `hint`"),
    "unet 2-d timestep": ("unet", lambda m: m(S, torch.ones(1, 1, 2), E), ValueError, "timestep must be"),
    # prior
    "prior fp32 into fp16": ("prior", lambda m: m.half()(*_prior_args()), TypeError,
                             r"hidden_states is torch.float32.*prior.dtype"),
    "prior 1-d embedding": ("prior", lambda m: m(torch.randn(16), 1, *_prior_args()[2:]), ValueError,
                            r"hidden_states \(noisy image embedding\) must be \(B, 16\)"),
    "prior no mask": ("prior", lambda m: m(*_prior_args()[:4], None), ValueError, "attention_mask must be"),
    "prior mask list": ("prior", lambda m: m(*_prior_args()[:4], [[True] * 77] * 2), TypeError,
                        "attention_mask must be a torch.Tensor"),
    "prior numpy": ("prior", lambda m: m(torch.randn(2, 16).numpy(), 1, *_prior_args()[2:]), TypeError,
                    "hidden_states must be a torch.Tensor"),
    # CLIP
    "text float ids": ("text", lambda m: m(torch.rand(1, 77)), TypeError, "integer tensor of token ids"),
    "text list ids": ("text", lambda m: m([[49406, 49407]]), TypeError, "input_ids must be a torch.Tensor of token ids"),
    "text 1-d ids": ("text", lambda m: m(torch.zeros(77, dtype=torch.long)), ValueError, r"input_ids must be \(B, L\)"),
    "text too long": ("text", lambda m: m(torch.zeros(1, 78, dtype=torch.long)), ValueError, "77 positions"),
    "vision uint8 pixels": ("vision", lambda m: m(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)), TypeError,
                            "ImagePreprocessor"),
    "vision HWC pixels": ("vision", lambda m: m(torch.zeros(1, 32, 32, 3)), ValueError, r"\(B, 3, 32, 32\)"),
    "vision 224px pixels": ("vision", lambda m: m(torch.zeros(1, 3, 224, 224)), ValueError, r"\(B, 3, 32, 32\)"),
    "vision 3-d pixels": ("vision", lambda m: m(torch.zeros(3, 32, 32)), ValueError, r"\(B, 3, 32, 32\)"),
}


@pytest.mark.parametrize("case", sorted(INPUT_MISTAKES))
def test_input_mistakes_get_clear_errors(models, case):
    """The error is raised by our check (not deep inside torch) and says what to pass."""
    which, call, exc, message = INPUT_MISTAKES[case]
    model = copy.deepcopy(models[which])
    with torch.no_grad(), pytest.raises(exc, match=message) as info:
        call(model)
    assert "/kandinsky/" in info.traceback[-1].path.as_posix(), f"raised in {info.traceback[-1].path}"


@pytest.mark.parametrize("which", ["text", "vision", "prior", "unet", "movq"])
def test_input_on_another_device_is_named(models, which):
    """Weights on one device, inputs on another (meta vs cpu here; cuda vs cpu in real life)."""
    with torch.device("meta"):
        model = copy.deepcopy(models[which]).to("meta")
    calls = {
        "text": (lambda m: m(torch.zeros(1, 77, dtype=torch.long)), "input_ids is on cpu"),
        "vision": (lambda m: m(torch.zeros(1, 3, 32, 32)), "pixel_values is on cpu"),
        "prior": (lambda m: m(*_prior_args()), "hidden_states is on cpu"),
        "unet": (lambda m: m(S, 5, E), "sample is on cpu"),
        "movq": (lambda m: m.encode(IMG), "images is on cpu"),
    }
    call, message = calls[which]
    with pytest.raises((ValueError, TypeError), match=message + ".*meta"):
        call(model)
    assert model.device == torch.device("meta")


def test_autocast_inputs_are_not_refused(models):
    """Under autocast the weights' and inputs' dtypes legitimately differ: no dtype refusal."""
    movq, unet = copy.deepcopy(models["movq"]).bfloat16(), copy.deepcopy(models["unet"]).bfloat16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert movq.decode(torch.randn(1, 4, 4, 4), force_not_quantize=True).shape == (1, 3, 32, 32)
        assert unet(S, 5, E).shape == (1, 8, 8, 8)


# ============================================================================ module tree vs docs
def _documented_tree() -> dict[str, list[tuple[str, set[str], bool]]]:
    """class -> [(child name, allowed types, optional)] from docs/architecture.md's module-tree table."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("<!-- module-tree -->")[1].split("<!-- /module-tree -->")[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `([\w.]+)` \| (.*) \|$", line)
        if not m:
            continue
        children = []
        for item in re.findall(r"`([^`]+)`", m.group(2)):
            names, types = item.replace("\\|", "|").split(": ")
            optional = names.endswith("?")
            names = names.rstrip("?")
            expanded = names.strip("{}").split(",") if names.startswith("{") else [names]
            for child in expanded:
                children.append((child, {t.strip() for t in types.split("|")}, optional))
        rows[m.group(1)] = children
    return rows


def _type_name(module: torch.nn.Module) -> str:
    cls = type(module)
    if isinstance(module, torch.nn.ModuleList):
        kinds = {_type_name(m) for m in module}
        assert len(kinds) == 1, kinds
        return f"[{kinds.pop()}]"
    if cls.__module__.startswith("kandinsky."):
        return f"{cls.__module__.split('.')[1]}.{cls.__name__}"
    return cls.__name__


def test_module_tree_is_the_documented_one(models):
    """Every kandinsky module's children (names, order, types) are the documented ones, for every
    variant (CLIP with gelu and quick_gelu, UNet with and without hint encoder)."""
    doc = _documented_tree()
    assert len(doc) > 25
    quick = build_model(dict(TINY_TEXT_CONFIG, hidden_act="quick_gelu"))
    seen = set()
    for model in (*models.values(), quick):
        for path, module in model.named_modules():
            if isinstance(module, torch.nn.ModuleList) or not type(module).__module__.startswith("kandinsky."):
                continue
            children = list(module.named_children())
            key = _type_name(module)
            if not children and key not in doc:
                continue  # weightless leaves (unet.Downsample, clip.QuickGELU, ...)
            assert key in doc, f"{path or 'root'} ({key}) is not in the documented module tree"
            seen.add(key)
            present = [(n, _type_name(c)) for n, c in children]
            expected = [(n, types) for n, types, optional in doc[key] if not optional or n in dict(children)]
            assert [n for n, _ in present] == [n for n, _ in expected], f"{path or 'root'} ({key})"
            for (n, t), (_, allowed) in zip(present, expected):
                assert t in allowed, f"{path}.{n}: {t} not in documented {allowed}"
    assert seen == set(doc), f"documented but never built: {set(doc) - seen}"


# ============================================================================ memory format
@pytest.mark.parametrize("name", ["unet", "movq"])
def test_channels_last_matches_reference(tiny, name):
    """``model.to(memory_format=torch.channels_last)`` (the documented fix for slow NCHW half
    convolutions on CPU) computes the same numbers, with channels-last inputs or not."""
    ref, folder = tiny[name]
    ours = load_component(folder).to(memory_format=torch.channels_last)
    assert ours.conv_out.weight.is_contiguous(memory_format=torch.channels_last) if name == "unet" else \
        ours.decoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    x = _inputs(seed=3)
    cl = {k: v.to(memory_format=torch.channels_last) if isinstance(v, torch.Tensor) and v.ndim == 4 else v
          for k, v in x.items()}
    with torch.no_grad():
        want = _run(name, ref, x, ours=False)
        assert_close(_run(name, ours, cl, ours=True), want)
        assert_close(_run(name, ours, x, ours=True), want)


# ============================================================================ configs
@pytest.mark.parametrize("config", [TINY_TEXT_CONFIG, TINY_VISION_CONFIG])
def test_clip_attention_dropout_is_refused(config):
    """The reference drops attention weights in train mode when attention_dropout > 0; we
    implement no dropout, so such a config is refused instead of silently trained without."""
    assert build_model(dict(config, attention_dropout=0.0, dropout=0.3))  # `dropout`: read by no CLIP layer
    with pytest.raises(ConfigError, match=r"attention_dropout=0.1.*0.0"):
        build_model(dict(config, attention_dropout=0.1))


def test_config_without_class_names_the_fix():
    config = {k: v for k, v in TINY_TEXT_CONFIG.items() if k != "architectures"}
    with pytest.raises(ConfigError, match=r"'clip_text_model'.*add the class.*CLIPTextModelWithProjection"):
        build_model(config)


def test_gradient_checkpointing_the_pure_blocks_keeps_gradients(tiny):
    """docs/architecture.md (fine-tuning): checkpointing ResBlocks / attention blocks changes
    no gradient (compared with the reference's)."""
    from torch.utils.checkpoint import checkpoint

    from kandinsky.layers import ResBlock
    from kandinsky.unet.blocks import AddedKVAttention

    ref, folder = tiny["unet"]
    ours = load_component(folder).train().requires_grad_(True)
    for module in ours.modules():
        if isinstance(module, (ResBlock, AddedKVAttention)):
            module.forward = (lambda f: lambda *a: checkpoint(f, *a, use_reentrant=False))(module.forward)
    ref = copy.deepcopy(ref).train().requires_grad_(True)
    x = _inputs(seed=4)
    _run("unet", ours, x, ours=True).square().mean().backward()
    _run("unet", ref, x, ours=False).square().mean().backward()
    ref_grads = convert_state_dict(read_config(folder), {k: p.grad for k, p in ref.named_parameters()})
    for k in ("down.1.res.0.conv1.weight", "up.0.attn.0.to_q.weight", "time_embed.linear_1.weight"):
        assert rel_err(ours.get_parameter(k).grad, ref_grads[k]) < 1e-4, k


def test_dtype_auto_is_transformers_default(text_ref, movq_ref, tmp_path):
    """``dtype="auto"``: what transformers 5's from_pretrained does by default (the config's
    dtype, else the stored one), for both libraries' folders; an fp16 file then loads as fp16
    without a copy (windows of the mapping)."""
    import transformers

    for name, model in (("fp32", text_ref), ("fp16", copy.deepcopy(text_ref).half())):
        folder = _saved(model, tmp_path / f"text-{name}")
        reference = transformers.CLIPTextModelWithProjection.from_pretrained(folder)  # dtype "auto"
        ours = load_component(folder, dtype="auto")
        assert ours.dtype == reference.dtype == model.dtype
        _same_tensors(ours, _expected_state(reference, folder))
    folder = _saved(copy.deepcopy(movq_ref).half(), tmp_path / "movq-fp16", variant="fp16")
    ours = load_component(folder, dtype="auto")
    assert {p.dtype for p in ours.parameters()} == {torch.float16}
    ptrs = sorted(p.data_ptr() for p in ours.parameters())
    assert ptrs[-1] - ptrs[0] < (folder / "diffusion_pytorch_model.fp16.safetensors").stat().st_size


def test_every_key_the_reference_configs_write_is_known(tmp_path):
    """The reference classes' configs with default arguments, written in full (diffusers'
    save_config; transformers' to_json_string(use_diff=False)): every key is known. Configs that
    are not Kandinsky's network are refused for a value, never for an unknown key."""
    import diffusers
    import transformers

    written = {}
    for cls in (diffusers.UNet2DConditionModel, diffusers.VQModel, diffusers.PriorTransformer):
        with torch.device("meta"):
            cls().save_config(tmp_path / cls.__name__)
        written[cls.__name__] = json.loads((tmp_path / cls.__name__ / "config.json").read_text())
    for config_cls, arch in ((transformers.CLIPTextConfig, "CLIPTextModelWithProjection"),
                             (transformers.CLIPVisionConfig, "CLIPVisionModelWithProjection")):
        config = config_cls()
        config.architectures = [arch]
        written[arch] = json.loads(config.to_json_string(use_diff=False))
    refused = {}
    for name, config in written.items():
        try:
            with torch.device("meta"):
                build_model(config)
        except ConfigError as e:
            assert "unknown key" not in str(e), str(e)
            refused[name] = str(e)
    assert set(refused) == {"UNet2DConditionModel", "VQModel"}  # defaults: SD-style UNet, plain VQ-GAN
    assert "Kandinsky 2.2 uses" in refused["UNet2DConditionModel"] and "norm_type='group'" in refused["VQModel"]
