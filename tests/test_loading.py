"""load_component / save_component at the edges, against what diffusers and transformers do:

* ``variant="fp16"`` / ``"bf16"`` with no such files raises (diffusers and transformers raise
  OSError) instead of silently loading the full-precision weights;
* every problem with a checkpoint file is an ``OSError`` (``except OSError`` catches it, as with the
  reference loaders), a missing one a ``FileNotFoundError``, with our messages kept;
* ``dtype="keep"`` keeps each stored dtype (a file mixing dtypes stays mixed);
* ``save_component`` into a folder holding other weight files is refused (a loader would read
  either), re-saving over the same file is not.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from kandinsky.demo import TINY
from weights_convert import (
    WeightsError,
    WeightsNotFoundError,
    build_model,
    convert_state_dict,
    load_component,
    save_component,
)
from weights_convert.io import read_safetensors, write_safetensors

diffusers = pytest.importorskip("diffusers")
HUB_FILE = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def movq():
    torch.manual_seed(0)
    model = build_model(TINY["movq"])
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


@pytest.fixture
def fp32_folder(movq, tmp_path):
    """Full-precision weights only (diffusers' layout)."""
    return save_component(movq, tmp_path / "movq")


@pytest.mark.parametrize("variant", ["fp16", "bf16"])
def test_a_missing_variant_raises_as_in_diffusers(fp32_folder, variant):
    with pytest.raises(OSError):  # the reference
        diffusers.VQModel.from_pretrained(fp32_folder, variant=variant)
    with pytest.raises(WeightsNotFoundError, match=rf"no '{variant}' variant.*{HUB_FILE}.*variant=None") as e:
        load_component(fp32_folder, variant=variant)
    assert isinstance(e.value, FileNotFoundError)


def test_an_existing_variant_is_the_one_loaded(movq, fp32_folder):
    """fp32 file + fp16 variant: variant="fp16" reads the fp16 file (the rounded values, as diffusers
    does), None the fp32 one."""
    half = copy.deepcopy(movq).half()
    state = convert_state_dict(movq.config.to_dict(), half.state_dict(), reverse=True)
    write_safetensors(state, fp32_folder / "diffusion_pytorch_model.fp16.safetensors")
    reference = diffusers.VQModel.from_pretrained(fp32_folder, variant="fp16")
    ours = load_component(fp32_folder, variant="fp16")
    want = convert_state_dict(json.loads((fp32_folder / "config.json").read_text()), reference.state_dict())
    assert all(torch.equal(ours.state_dict()[k], v.float()) for k, v in want.items())
    full = load_component(fp32_folder)
    assert all(torch.equal(full.state_dict()[k], v) for k, v in movq.state_dict().items())
    assert not all(torch.equal(ours.state_dict()[k], v) for k, v in movq.state_dict().items())


@pytest.mark.parametrize("bad", ["fp16/../x", "", 16])
def test_a_malformed_variant_names_the_argument(fp32_folder, bad):
    with pytest.raises(ValueError, match="variant must be None or a variant name like 'fp16'"):
        load_component(fp32_folder, variant=bad)


def test_missing_files_are_file_not_found_errors(fp32_folder, tmp_path):
    """As diffusers: a missing folder / config.json / weights file is an OSError (ours a
    FileNotFoundError too); the messages still say what is missing."""
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OSError):
        diffusers.VQModel.from_pretrained(empty)  # the reference: no config.json
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((fp32_folder / "config.json").read_text())
    cases = [(tmp_path / "nope", "no such component folder"), (empty, "no config.json"),
             (no_weights, "no weights file found")]
    for folder, message in cases:
        with pytest.raises(FileNotFoundError, match=message) as e:
            load_component(folder)
        assert isinstance(e.value, WeightsError)


def test_corrupt_files_are_os_errors_not_file_not_found(fp32_folder):
    path = fp32_folder / HUB_FILE
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(OSError, match="truncated or corrupt") as e:
        load_component(fp32_folder)
    assert isinstance(e.value, WeightsError) and not isinstance(e.value, FileNotFoundError)


def test_dtype_keep_keeps_each_stored_dtype(movq, tmp_path):
    folder = save_component(movq, tmp_path / "mixed")
    stored = read_safetensors(folder / HUB_FILE)
    mixed = {k: (v.half() if i % 2 else v.clone()) for i, (k, v) in enumerate(sorted(stored.items()))}
    write_safetensors(mixed, folder / HUB_FILE)
    ours = convert_state_dict(json.loads((folder / "config.json").read_text()), mixed)
    model = load_component(folder, dtype="keep")
    got = model.state_dict()
    assert {v.dtype for v in got.values()} == {torch.float16, torch.float32}
    assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in ours.items())
    assert {p.dtype for p in load_component(folder).parameters()} == {torch.float32}  # default unchanged


def test_save_refuses_a_folder_holding_other_weights(movq, tmp_path):
    folder = save_component(movq, tmp_path / "movq", layout="hub")
    save_component(movq, folder, layout="hub")  # the same file again: fine
    with pytest.raises(FileExistsError, match=rf"already holds weight files \['{HUB_FILE}'\].*kandinsky.safetensors"):
        save_component(movq, folder, layout="kandinsky")
    assert not (folder / "kandinsky.safetensors").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        save_component(movq, tmp_path / "file")
