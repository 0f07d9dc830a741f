"""weights_convert: every file form the hub uses, our own layout, round trips, the CLI, errors.

Forward-pass parity of each component is tested in its own test file; here we check
that load_component reads exactly the reference's tensors from every kind of folder
and that what save_component writes loads back into the reference library.
"""
import copy
import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_close, randomize_, unit
from tests.refs import tiny_kwargs
from tests.refs.clip import TINY_TEXT_CONFIG
from tests.refs.movq import make_reference_movq
from weights_convert import (
    ConfigError,
    WeightsError,
    build_model,
    convert_state_dict,
    load_component,
    read_config,
    save_component,
)
from weights_convert.__main__ import main as cli_main
from weights_convert.io import read_safetensors, read_safetensors_header

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

# kandinsky.demo's tiny MoVQ and text tower (tests/refs.tiny_kwargs), with a smaller codebook and vocabulary
TINY_MOVQ = tiny_kwargs("movq", num_vq_embeddings=32, sample_size=32)
TINY_TEXT = {k: v for k, v in tiny_kwargs("text_encoder", vocab_size=1000, projection_dim=16, bos_token_id=0,
                                          pad_token_id=1).items() if k not in ("architectures", "model_type")}


def _hub_forms(model, root, name):
    """Save a reference model in every file form the hub uses; returns {form: folder}."""
    forms = {}
    is_diffusers = isinstance(model, diffusers.ModelMixin)
    for form, kwargs in {
        "safetensors": dict(),
        "bin": dict(safe_serialization=False) if is_diffusers else dict(),
        "fp16": dict(variant="fp16"),
        "sharded": dict(max_shard_size="20KB"),
    }.items():
        folder = root / f"{name}-{form}"
        if form == "fp16" and not is_diffusers:  # transformers writes the variant in the model's dtype
            copy.deepcopy(model).half().save_pretrained(folder, **kwargs)
        else:
            model.save_pretrained(folder, **kwargs)
        if form == "bin" and not is_diffusers:  # transformers 5 writes only safetensors
            st = folder / "model.safetensors"
            torch.save({k: v.clone() for k, v in read_safetensors(st).items()}, folder / "pytorch_model.bin")
            st.unlink()
        forms[form] = folder
    return forms


@pytest.fixture(scope="session")
def movq_forms(tmp_path_factory):
    torch.manual_seed(0)
    ref = randomize_(diffusers.VQModel(**TINY_MOVQ), seed=1).eval()
    return ref, _hub_forms(ref, tmp_path_factory.mktemp("wc"), "movq")


@pytest.fixture(scope="session")
def text_forms(tmp_path_factory):
    cfg = transformers.CLIPTextConfig(**TINY_TEXT)
    ref = randomize_(transformers.CLIPTextModelWithProjection(cfg), seed=2).eval()
    return ref, _hub_forms(ref, tmp_path_factory.mktemp("wc"), "text")


def _expected(ref, folder):
    config = read_config(folder)
    return convert_state_dict(config, dict(ref.state_dict()))


def _assert_same_tensors(model, expected, tol=0.0):
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        err = (got[k].float() - v.float()).abs().max().item() if v.numel() else 0.0
        assert err <= tol * max(v.float().abs().max().item(), 1e-12), f"{k}: differs by {err}"


@pytest.mark.parametrize("form", ["safetensors", "bin", "fp16", "sharded"])
@pytest.mark.parametrize("which", ["movq_forms", "text_forms"])
def test_every_file_form_loads_the_reference_tensors(which, form, request):
    ref, forms = request.getfixturevalue(which)
    folder = forms[form]
    if form == "sharded":
        assert list(folder.glob("*.index.json")), "the fixture should have written a shard index"
    model = load_component(folder)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # fp16 files hold rounded values: compare within half precision
    _assert_same_tensors(model, _expected(ref, folder), tol=1e-3 if form == "fp16" else 0.0)


def test_dtype_and_meta_build(movq_forms):
    ref, forms = movq_forms
    model = load_component(forms["fp16"], dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    with torch.device("meta"):
        meta = build_model(read_config(forms["safetensors"]))
    assert all(p.is_meta for p in meta.parameters())
    assert set(meta.state_dict()) == set(model.state_dict())


def test_safetensors_load_is_memory_mapped(movq_forms):
    """Loaded fp32 parameters are windows of one mapping of the file, at the file's offsets (no
    second copy), each with its own storage (saving one tensor does not write the whole file)."""
    import io

    from weights_convert.io import read_safetensors_header

    _, forms = movq_forms
    path = forms["safetensors"] / "diffusion_pytorch_model.safetensors"
    header, data_start = read_safetensors_header(path)
    offsets = {k: data_start + v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    config = read_config(forms["safetensors"])
    hub_name = {ours: hub for hub, ours in zip(offsets, convert_state_dict(config, dict.fromkeys(offsets)))}
    model = load_component(forms["safetensors"])
    sd = model.state_dict()
    base = {sd[k].data_ptr() - offsets[hub_name[k]] for k in sd}
    assert len(base) == 1  # every tensor sits at its file offset in the same mapping
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in sd.values())
    buf = io.BytesIO()
    torch.save({"bias": model.decoder.conv_out.bias}, buf)
    assert len(buf.getvalue()) < 10_000 < path.stat().st_size


@pytest.mark.parametrize("which", ["movq_forms", "text_forms"])
def test_hub_round_trip_loads_in_reference(which, request, tmp_path):
    ref, forms = request.getfixturevalue(which)
    model = load_component(forms["safetensors"])
    save_component(model, tmp_path / "hub", layout="hub")
    cls = type(ref)
    back = cls.from_pretrained(tmp_path / "hub").eval()
    ref_sd, back_sd = ref.state_dict(), back.state_dict()
    assert ref_sd.keys() == back_sd.keys()
    for k in ref_sd:
        assert torch.equal(ref_sd[k], back_sd[k]), k
    # and the same outputs from the reference class
    torch.manual_seed(0)
    if which == "movq_forms":
        x = torch.randn(2, 3, 32, 48)
        with torch.no_grad():
            assert_close(back.decode(back.encode(x).latents).sample, ref.decode(ref.encode(x).latents).sample, 1e-6)
    else:
        ids = torch.randint(3, 900, (2, 77))
        with torch.no_grad():
            assert_close(back(ids).text_embeds, ref(ids).text_embeds, 1e-6)


def test_kandinsky_layout_round_trip(movq_forms, tmp_path):
    ref, forms = movq_forms
    model = load_component(forms["safetensors"])
    save_component(model, tmp_path / "ours", layout="kandinsky")
    assert (tmp_path / "ours" / "kandinsky.safetensors").is_file()
    again = load_component(tmp_path / "ours")
    _assert_same_tensors(again, _expected(ref, forms["safetensors"]))


def test_cli_converts_a_checkpoint_folder_both_ways(movq_forms, text_forms, tmp_path):
    movq_ref, movq_folders = movq_forms
    text_ref, text_folders = text_forms
    repo = tmp_path / "repo"
    shutil.copytree(movq_folders["bin"], repo / "movq")
    shutil.copytree(text_folders["sharded"], repo / "text_encoder")
    (repo / "scheduler").mkdir()
    (repo / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "DDPMScheduler"}')
    (repo / "model_index.json").write_text("{}")

    assert cli_main([str(repo), str(tmp_path / "ours"), "--to", "kandinsky"]) == 0
    assert (tmp_path / "ours" / "scheduler" / "scheduler_config.json").is_file()
    assert (tmp_path / "ours" / "model_index.json").is_file()
    assert (tmp_path / "ours" / "movq" / "kandinsky.safetensors").is_file()

    assert cli_main([str(tmp_path / "ours"), str(tmp_path / "hub"), "--to", "hub", "--dtype", "fp16"]) == 0
    movq_back = diffusers.VQModel.from_pretrained(tmp_path / "hub" / "movq")
    text_back = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path / "hub" / "text_encoder")
    for ref, back in ((movq_ref, movq_back), (text_ref, text_back)):
        for k, v in ref.state_dict().items():
            assert torch.allclose(back.state_dict()[k].float(), v.half().float()), k


# ----------------------------------------------------------------------------- errors
def _copy(folder, tmp_path):
    dst = tmp_path / folder.name
    shutil.copytree(folder, dst)
    return dst


def test_error_no_weights_file(movq_forms, tmp_path):
    folder = _copy(movq_forms[1]["safetensors"], tmp_path)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no weights file"):
        load_component(folder)


def test_error_no_folder_or_config(tmp_path):
    with pytest.raises(WeightsError, match="no such component folder"):
        load_component(tmp_path / "nope")
    with pytest.raises(WeightsError, match="no config.json"):
        load_component(tmp_path)


@pytest.mark.parametrize("key, value, error, match", [
    ("_class_name", "AutoencoderKL", ConfigError, "AutoencoderKL"),  # a class kandinsky does not build
    ("act_fn", "relu", ConfigError, "act_fn"),  # a value kandinsky does not implement
    ("num_vq_embeddings", 48, WeightsError, "misshapen.*quantize"),  # codebook shape no longer matches
])
def test_error_config_value(movq_forms, tmp_path, key, value, error, match):
    folder = _copy(movq_forms[1]["safetensors"], tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(error, match=match):
        load_component(folder)


def test_error_missing_and_unexpected_tensors(movq_forms, tmp_path):
    from weights_convert.io import read_safetensors, write_safetensors

    folder = _copy(movq_forms[1]["safetensors"], tmp_path)
    path = folder / "diffusion_pytorch_model.safetensors"
    tensors = {k: v.clone() for k, v in read_safetensors(path).items()}
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    tensors["extra.weight"] = torch.zeros(3)
    write_safetensors(tensors, path)
    with pytest.raises(WeightsError) as e:
        load_component(folder)
    assert "1 missing" in str(e.value) and "1 unexpected" in str(e.value) and "extra.weight" in str(e.value)


@pytest.mark.parametrize("cut", [4, 100, -10])
def test_error_truncated_safetensors(movq_forms, tmp_path, cut):
    folder = _copy(movq_forms[1]["safetensors"], tmp_path)
    path = folder / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut > 0 else data[:cut])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        load_component(folder)


def test_error_corrupt_safetensors_header(movq_forms, tmp_path):
    folder = _copy(movq_forms[1]["safetensors"], tmp_path)
    path = folder / "diffusion_pytorch_model.safetensors"
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8:12] = b"\xff\xfe{["
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="corrupt"):
        load_component(folder)


def test_error_truncated_bin(movq_forms, tmp_path):
    folder = _copy(movq_forms[1]["bin"], tmp_path)
    path = next(folder.glob("*.bin"))
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        load_component(folder)


def _objects_message(path) -> str:
    return (f"{path}: the file holds Python objects other than tensors (the first: argparse.Namespace); kandinsky "
            "never unpickles those, as unpickling them could run any code the file carries. Pass a real weights "
            "file (.safetensors, or a .bin / .pt holding only tensors), or convert this one to safetensors where it "
            "came from, with the code that wrote it.")


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_error_bin_of_python_objects(movq_forms, tmp_path, capsys, zipped):
    """A .bin pickle holding an object that is not a tensor is refused with our message (never torch's advice
    to rerun with weights_only=False), torch's error chained for debugging; the same through the converter's CLI."""
    import argparse
    import pickle

    folder = _copy(movq_forms[1]["bin"], tmp_path)
    path = next(folder.glob("*.bin"))
    torch.save({"weight": argparse.Namespace(x=1)}, path, _use_new_zipfile_serialization=zipped)
    with pytest.raises(WeightsError) as e:
        load_component(folder)
    assert str(e.value) == _objects_message(path) and "weights_only" not in str(e.value)
    assert isinstance(e.value.__cause__, pickle.UnpicklingError)
    assert cli_main([str(folder), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert _objects_message(path) in err and "weights_only" not in err


def test_bin_of_python_objects_at_every_door(random_demo, cli_demo, tmp_path, capsys):
    """The same message at every door that reads a torch file (weights_convert.io.load_torch): load_lora and
    --lora (a LoRA file), from_pretrained of a checkpoint folder, train's --checkpoint, train-demo's stage
    checkpoints; nothing trained, nothing written."""
    import argparse

    import PIL.Image

    from kandinsky.cli import main
    from kandinsky.lora import LoRAError, load_lora
    from kandinsky.pipelines.prior import PriorPipeline

    lora = tmp_path / "style.bin"
    torch.save({"unet.down.lora_A.weight": argparse.Namespace(x=1)}, lora)
    prior = shutil.copytree(random_demo["prior"], tmp_path / "prior")
    weights = prior / "prior" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    torch.save({"weight": argparse.Namespace(x=1)}, weights.with_suffix(".bin"))
    with pytest.raises(LoRAError, match=re.escape(_objects_message(lora))):
        load_lora(load_component(random_demo["prior"] / "prior"), lora)
    with pytest.raises(WeightsError, match=re.escape(_objects_message(weights.with_suffix(".bin")))):
        PriorPipeline.from_pretrained(prior)
    stage = tmp_path / "demo" / "stages" / "clip.pt"  # train-demo's stage checkpoint (kandinsky train-demo --write-only)
    stage.parent.mkdir(parents=True)
    torch.save({"state": {"text_encoder": argparse.Namespace(x=1)}, "done": True}, stage)
    data = tmp_path / "pics"
    data.mkdir()
    for i in range(2):
        PIL.Image.new("RGB", (64, 64), (40 * i, 0, 0)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"picture {i}")
    for argv, path in [(["text2img", "--random-demo", "a", "-o", str(tmp_path / "x.png"), "--lora", str(lora)], lora),
                       (["train", "prior", "--data", str(data), "--out", str(tmp_path / "run"), "--checkpoint",
                         str(prior), "--device", "cpu", "--steps", "1"], weights.with_suffix(".bin")),
                       (["train-demo", "--out", str(stage.parents[1]), "--write-only"], stage)]:
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
        err = capsys.readouterr().err
        assert code == 2 and _objects_message(path) in err and "weights_only" not in err, err
    assert not (tmp_path / "x.png").exists() and not list((tmp_path / "run").glob("checkpoints/*"))


def test_error_shard_index_outside_folder(text_forms, tmp_path):
    folder = _copy(text_forms[1]["sharded"], tmp_path)
    index = next(folder.glob("*.index.json"))
    data = json.loads(index.read_text())
    key = next(iter(data["weight_map"]))
    data["weight_map"][key] = "../../etc/passwd"
    index.write_text(json.dumps(data))
    with pytest.raises(WeightsError, match="outside the checkpoint folder"):
        load_component(folder)


def test_error_missing_shard(text_forms, tmp_path):
    folder = _copy(text_forms[1]["sharded"], tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(WeightsError, match="missing"):
        load_component(folder)


def test_cli_reports_errors(tmp_path, capsys):
    assert cli_main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_legacy_attention_names_load(movq_forms, tmp_path):
    """Old MoVQ files name attention projections query/key/value/proj_attn."""
    from weights_convert.io import read_safetensors, write_safetensors

    ref, forms = movq_forms
    folder = _copy(forms["safetensors"], tmp_path)
    path = folder / "diffusion_pytorch_model.safetensors"
    old = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    tensors = {}
    for k, v in read_safetensors(path).items():
        for new_name, old_name in old.items():
            k = k.replace(new_name, old_name)
        tensors[k] = v.clone()
    assert any(".proj_attn." in k for k in tensors)
    write_safetensors(tensors, path)
    _assert_same_tensors(load_component(folder), _expected(ref, forms["safetensors"]))


# ----------------------------------------------------------------------------- whole repos
@pytest.mark.parametrize("repo", ["prior_pipeline_folder", "inpaint_pipeline_folder"])
def test_cli_whole_repo_both_ways_and_pipelines_still_match(repo, request, tmp_path):
    """A whole tiny hub repo -> kandinsky layout -> hub layout: the reference pipeline loads
    the result and samples the same numbers; our pipeline runs from the kandinsky layout too."""
    from kandinsky import DecoderPipeline, PriorPipeline

    folder, ref = request.getfixturevalue(repo)
    ours_dir, hub_dir = tmp_path / "ours", tmp_path / "hub"
    assert cli_main([str(folder), str(ours_dir), "--to", "kandinsky"]) == 0
    assert cli_main([str(ours_dir), str(hub_dir), "--to", "hub"]) == 0
    components = [p.name for p in folder.iterdir() if (p / "config.json").is_file()]
    assert components  # unet/movq or prior/text_encoder/image_encoder
    for name in components:
        assert (ours_dir / name / "kandinsky.safetensors").is_file(), name
    back = type(ref).from_pretrained(hub_dir)
    back.set_progress_bar_config(disable=True)

    def run(pipe_like, ours: bool):
        g = torch.Generator().manual_seed(3)
        if repo == "prior_pipeline_folder":
            if ours:
                return pipe_like("a cat", num_inference_steps=3, generator=g, progress=False).image_embeds
            return pipe_like("a cat", num_inference_steps=3, generator=g).image_embeds
        emb = torch.randn(1, 32, generator=torch.Generator().manual_seed(4))
        image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
        mask = torch.zeros(64, 64)
        mask[16:48, 16:48] = 1
        kw = dict(height=64, width=64, num_inference_steps=2, generator=g, output_type="pt")
        if ours:
            return pipe_like.inpaint(emb, image, mask, -emb, progress=False, **kw).images
        return pipe_like(image_embeds=emb, image=image * 2 - 1, mask_image=mask[None].clone(),
                         negative_image_embeds=-emb, **kw).images

    with torch.no_grad():
        expected = run(ref, ours=False)
        # the same tensors, read back from a file: only kernel-level rounding differs (1.2e-6 measured here)
        assert_close(run(back, ours=False), expected, 1e-5)
        if repo == "prior_pipeline_folder":
            assert_close(run(PriorPipeline.from_pretrained(ours_dir), ours=True), expected, 1e-4)
        else:  # our "pt" is in [0, 1]; the reference inpaint pipeline returns the raw decoder output
            assert_close(run(DecoderPipeline.from_pretrained(ours_dir), ours=True), unit(expected), 1e-4)


def test_skip_init_restores_the_initialisers_even_on_error():
    from weights_convert import skip_init

    normal = torch.nn.init.normal_
    with skip_init():
        w = torch.zeros(3, 3)
        assert torch.nn.init.normal_(w) is w and not w.any()  # nothing drawn
        assert torch.nn.Linear(4, 4).weight.shape == (4, 4)  # modules still build
    assert torch.nn.init.normal_ is normal
    with pytest.raises(RuntimeError, match="boom"):
        with skip_init():
            raise RuntimeError("boom")
    assert torch.nn.init.normal_ is normal and torch.nn.init.normal_(torch.zeros(50)).any()


# ============================================================================ more file forms
# (the references of movq_forms / text_forms, saved in the forms the libraries write)
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"


def _saved(ref, folder: Path, **kwargs) -> Path:
    ref.save_pretrained(folder, **kwargs)
    return folder


@pytest.fixture
def movq_ref(movq_forms):
    return movq_forms[0]


@pytest.fixture
def text_ref(text_forms):
    return text_forms[0]


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
        expected = _expected(half, folder)
        for variant in (None, "fp16"):
            model = load_component(folder, variant=variant)
            assert {p.dtype for p in model.parameters()} == {torch.float32}
            _assert_same_tensors(model, expected)


def test_legacy_non_zip_bin(movq_ref, tmp_path):
    """torch.save(..., _use_new_zipfile_serialization=False): the pre-1.6 format, not mmap-able."""
    folder = tmp_path / "movq"
    movq_ref.save_config(folder)
    torch.save(movq_ref.state_dict(), folder / "diffusion_pytorch_model.bin", _use_new_zipfile_serialization=False)
    _assert_same_tensors(load_component(folder), _expected(movq_ref, folder))


def test_sharded_bin_both_libraries(movq_ref, text_ref, tmp_path):
    """diffusers' sharded .bin (save_pretrained) and transformers 4's pytorch_model.bin.index.json
    (written by hand: transformers 5 no longer writes .bin)."""
    folder = _saved(movq_ref, tmp_path / "movq", safe_serialization=False, max_shard_size="100KB")
    assert (folder / "diffusion_pytorch_model.bin.index.json").is_file()
    _assert_same_tensors(load_component(folder), _expected(movq_ref, folder))

    folder = _saved(text_ref, tmp_path / "text")
    (folder / "model.safetensors").unlink()
    state = text_ref.state_dict()
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, keys in halves.items():
        torch.save({k: state[k].clone() for k in keys}, folder / file)
    index = {"metadata": {}, "weight_map": {k: f for f, keys in halves.items() for k in keys}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    _assert_same_tensors(load_component(folder), _expected(text_ref, folder))


def test_which_file_wins(tmp_path):
    """safetensors beat .bin of the same precision; full precision beats a half variant whatever
    the formats (an fp32 .bin next to an fp16 safetensors loads the fp32 weights); an explicit
    variant wins."""
    a, b = make_reference_movq(seed=1), make_reference_movq(seed=2)  # tell the files apart
    folder = tmp_path / "movq"
    a.save_pretrained(folder, safe_serialization=False)  # diffusion_pytorch_model.bin     (a, fp32)
    b.save_pretrained(folder)  # diffusion_pytorch_model.safetensors                     (b, fp32)
    copy.deepcopy(b).half().save_pretrained(folder, variant="fp16")  # .fp16.safetensors (b, fp16)
    _assert_same_tensors(load_component(folder), _expected(b, folder))

    (folder / "diffusion_pytorch_model.safetensors").unlink()
    _assert_same_tensors(load_component(folder), _expected(a, folder))  # fp32 .bin, not the fp16 file
    half = load_component(folder, variant="fp16", dtype=torch.float16)
    _assert_same_tensors(half, _expected(copy.deepcopy(b).half(), folder))


def test_kandinsky_layout_saved_in_fp16(movq_ref, tmp_path):
    """A kandinsky-layout folder written in fp16 loads as float32 by default (like the hub's fp16
    files), as fp16 when asked, and still loads in diffusers after conversion back."""
    ours = load_component(_saved(movq_ref, tmp_path / "hub"))
    save_component(ours, tmp_path / "k16", layout="kandinsky", dtype=torch.float16)
    header, _ = read_safetensors_header(tmp_path / "k16" / "kandinsky.safetensors")
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}
    expected = _expected(copy.deepcopy(movq_ref).half(), tmp_path / "hub")
    model = load_component(tmp_path / "k16")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    _assert_same_tensors(model, expected)
    assert {p.dtype for p in load_component(tmp_path / "k16", dtype=torch.float16).parameters()} == {torch.float16}


def test_device_meta(text_ref, tmp_path):
    folder = _saved(text_ref, tmp_path / "text")
    model = load_component(folder, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        k: tuple(v.shape) for k, v in _expected(text_ref, folder).items()
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
        _assert_same_tensors(ours, _expected(reference, folder))
    folder = _saved(copy.deepcopy(movq_ref).half(), tmp_path / "movq-fp16", variant="fp16")
    ours = load_component(folder, dtype="auto")
    assert {p.dtype for p in ours.parameters()} == {torch.float16}
    ptrs = sorted(p.data_ptr() for p in ours.parameters())
    assert ptrs[-1] - ptrs[0] < (folder / "diffusion_pytorch_model.fp16.safetensors").stat().st_size


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


def test_config_without_class_names_the_fix():
    config = {k: v for k, v in TINY_TEXT_CONFIG.items() if k != "architectures"}
    with pytest.raises(ConfigError, match=r"'clip_text_model'.*add the class.*CLIPTextModelWithProjection"):
        build_model(config)


def test_kandinsky_layout_prior_of_older_versions_loads(tmp_path):
    """Our own layout written before the prior shared layers.TimestepEmbedding named its time MLP
    time_embed.fc1 / fc2 (now linear_1 / linear_2, the hub's names): such files still load."""
    from tests.refs.prior import PRIOR_TINY_CONFIG
    from weights_convert.io import write_safetensors

    torch.manual_seed(0)
    prior = build_model({"_class_name": "PriorTransformer", **PRIOR_TINY_CONFIG})
    folder = save_component(prior, tmp_path / "prior", layout="kandinsky")
    path = folder / "kandinsky.safetensors"
    old = {k.replace("time_embed.linear_1", "time_embed.fc1").replace("time_embed.linear_2", "time_embed.fc2"): v.clone()
           for k, v in read_safetensors(path).items()}
    assert "time_embed.fc1.weight" in old
    write_safetensors(old, path)
    _assert_same_tensors(load_component(folder), prior.state_dict())
