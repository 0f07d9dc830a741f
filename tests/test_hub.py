"""Checkpoint resolution: folders, hub ids from the Hugging Face cache (offline, pinned revisions)
or the hub (fast failure, revision and token passed on), the decoder card's `prior:` entry.

The cache is a fake one in a temporary folder with huggingface_hub's layout
(``models--org--name/snapshots/<commit>/...`` + ``refs/<branch>``); the network is replaced by a
socket that records every attempt and fails at once, so "no network call" is asserted, not assumed.
"""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants

from kandinsky.hub import CheckpointNotFound, prior_from_model_card, resolve

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40
ROOT = Path(__file__).resolve().parents[1]


def add_snapshot(cache: Path, repo: str, commit: str, refs=("main",), files=("model_index.json", "unet/config.json")):
    """One cached snapshot of ``repo`` in huggingface_hub's cache layout."""
    storage = cache / ("models--" + repo.replace("/", "--"))
    snap = storage / "snapshots" / commit
    for name in files:
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_text("{}")
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (storage / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache (HF_HUB_CACHE), online unless a test sets HF_HUB_OFFLINE."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read by huggingface_hub at import
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return cache


@pytest.fixture
def network(monkeypatch):
    """Every connection attempt is recorded and fails at once (like an unplugged cable); every
    sleep (a retry loop's back-off) is recorded and skipped."""
    log = {"connect": [], "sleep": []}

    def refuse(*args, **kwargs):
        log["connect"].append(args[:1])
        raise OSError(101, "Network is unreachable (blocked by the test)")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(time, "sleep", lambda seconds: log["sleep"].append(seconds))
    return log


# ----------------------------------------------------------------------------- local paths
def test_local_folder_is_returned(tmp_path):
    assert resolve(tmp_path) == tmp_path


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointNotFound, match="no such folder"):
        resolve(tmp_path / "a" / "b" / "c")


def test_a_file_inside_the_folder_names_the_folder(tmp_path, monkeypatch):
    """A config.json / model_index.json path where the folder is expected (relative, so it also
    looks like a hub id 'decoder/model_index.json')."""
    (tmp_path / "decoder").mkdir()
    (tmp_path / "decoder" / "model_index.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointNotFound, match=r"is a file; pass the checkpoint folder that holds it \(decoder\)"):
        resolve("decoder/model_index.json", "decoder checkpoint")


# ----------------------------------------------------------------------------- the cache, offline
@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "local_files_only"])
def test_cached_snapshot_loads_offline_without_any_network_call(hf_cache, network, monkeypatch, how):
    snap = add_snapshot(hf_cache, "org/decoder", COMMIT_A)
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after huggingface_hub was imported, as a script may
        assert resolve("org/decoder") == snap
    else:
        assert resolve("org/decoder", local_files_only=True) == snap
    assert network == {"connect": [], "sleep": []}


def test_revision_pins_the_cached_snapshot(hf_cache, network):
    add_snapshot(hf_cache, "org/decoder", COMMIT_A, refs=("main",))
    pinned = add_snapshot(hf_cache, "org/decoder", COMMIT_B, refs=("v1",))
    assert resolve("org/decoder", revision="v1", local_files_only=True) == pinned  # a tag / branch
    assert resolve("org/decoder", revision=COMMIT_A, local_files_only=True).name == COMMIT_A  # a commit
    with pytest.raises(CheckpointNotFound, match=r"revision 'v2'.*hf download org/decoder --revision v2"):
        resolve("org/decoder", revision="v2", local_files_only=True)
    assert network["connect"] == []


def test_offline_and_not_cached_names_the_fix(hf_cache, network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointNotFound) as e:
        resolve("kandinsky-community/nope", "prior checkpoint")
    message = str(e.value)
    assert "prior checkpoint 'kandinsky-community/nope' is not a local folder and is not in the Hugging Face cache" in message
    assert "HF_HUB_OFFLINE=1" in message and "hf download kandinsky-community/nope" in message
    assert network["connect"] == []


def test_real_environment_variables_in_a_fresh_process(hf_cache):
    """HF_HUB_CACHE and HF_HUB_OFFLINE set before anything is imported, as a user sets them."""
    snap = add_snapshot(hf_cache, "org/prior", COMMIT_A)
    env = {**os.environ, "HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1"}
    code = "from kandinsky.hub import resolve; print(resolve('org/prior'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(snap)


# ----------------------------------------------------------------------------- the hub, online
def test_unreachable_hub_fails_fast_with_one_message(hf_cache, network):
    """No retry loop: the old file listing tried 6 times, sleeping 1 + 2 + 4 + 8 + 8 s in between."""
    with pytest.raises(CheckpointNotFound) as e:
        resolve("kandinsky-community/nope", "decoder checkpoint")
    assert network["sleep"] == []
    assert 1 <= len(network["connect"]) <= 2  # one request (resolving the host name failed at once)
    assert "the hub could not be reached" in str(e.value) and "hf download kandinsky-community/nope" in str(e.value)


def test_unreachable_hub_falls_back_to_the_cache(hf_cache, network):
    snap = add_snapshot(hf_cache, "org/decoder", COMMIT_A)
    with pytest.warns(UserWarning, match="could not be reached.*using the cached snapshot"):
        assert resolve("org/decoder") == snap
    assert network["sleep"] == []


def test_revision_and_token_reach_the_hub(hf_cache, monkeypatch):
    calls = {}

    class FakeApi:
        def __init__(self, token=None, **kwargs):
            calls["api_token"] = token

        def model_info(self, repo, revision=None, timeout=None, **kwargs):
            calls["info"] = (repo, revision, timeout)
            names = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                     "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.bin"]
            return type("Info", (), {"siblings": [type("S", (), {"rfilename": n}) for n in names]})

    def fake_snapshot_download(repo, **kwargs):
        calls["download"] = (repo, kwargs)
        return str(hf_cache / "somewhere")

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve("org/private", revision="v1.1", token="hf_secret") == hf_cache / "somewhere"
    assert calls["api_token"] == "hf_secret"
    assert calls["info"][:2] == ("org/private", "v1.1") and calls["info"][2] > 0  # a timeout is set
    repo, kwargs = calls["download"]
    assert repo == "org/private" and kwargs["revision"] == "v1.1" and kwargs["token"] == "hf_secret"
    assert sorted(kwargs["allow_patterns"]) == [
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]


def _hub_error(name: str):
    cls = getattr(huggingface_hub.errors, name)
    error = cls.__new__(cls)  # the real class (its constructor wants an HTTP response object)
    error.args = (f"{name} from the hub",)
    return error


@pytest.mark.parametrize(
    "error, expected",
    [
        ("RepositoryNotFoundError", r"is not a local folder, and there is no such repo on the hub, or it is private.*token=.*hf auth login"),
        ("GatedRepoError", r"is gated: accept its conditions on https://huggingface.co/org/x.*token="),
        ("RevisionNotFoundError", r"has no revision 'nope': pass a branch, tag or commit hash"),
    ],
)
def test_hub_errors_name_the_fix(hf_cache, monkeypatch, error, expected):
    def model_info(self, *args, **kwargs):
        raise _hub_error(error)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    with pytest.raises(CheckpointNotFound, match=expected):
        resolve("org/x", revision="nope")


# ----------------------------------------------------------------------------- the decoder's model card
@pytest.mark.parametrize(
    "front, expected",
    [
        ("prior:\n- kandinsky-community/kandinsky-2-2-prior\ntags:\n- x", "kandinsky-community/kandinsky-2-2-prior"),
        ("license: apache-2.0\nprior: org/my-prior", "org/my-prior"),
        ("prior: ['org/p1', 'org/p2']", "org/p1"),
        ("license: apache-2.0", None),
    ],
)
def test_prior_from_model_card(tmp_path, front, expected):
    (tmp_path / "README.md").write_text(f"---\n{front}\n---\n# card\nprior: not-front-matter\n")
    assert prior_from_model_card(tmp_path) == expected


def test_no_card(tmp_path):
    assert prior_from_model_card(tmp_path) is None


def test_card_paths_are_relative_to_the_card(tmp_path, monkeypatch):
    (tmp_path / "set" / "decoder").mkdir(parents=True)
    (tmp_path / "set" / "prior").mkdir()
    for value in ("../prior", "./../prior", str(tmp_path / "set" / "prior")):
        (tmp_path / "set" / "decoder" / "README.md").write_text(f"---\nprior:\n- {value}\n---\n")
        monkeypatch.chdir(tmp_path / "set" / "decoder")
        assert prior_from_model_card(".") == str(tmp_path / "set" / "prior")
        monkeypatch.chdir("/")
        assert prior_from_model_card(tmp_path / "set" / "decoder") == str(tmp_path / "set" / "prior")


def test_demo_checkpoints_built_at_a_relative_path_work_from_anywhere(tmp_path, monkeypatch):
    """build_demo_checkpoints("demo") used from another directory, and after the set was moved:
    the decoder card's prior reference still names the set's prior folder."""
    import torch

    from kandinsky.demo import build_demo_checkpoints

    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    build_demo_checkpoints("demo")
    (tmp_path / "demo").rename(tmp_path / "moved")
    monkeypatch.chdir("/")
    for name in ("decoder", "decoder-inpaint", "controlnet-depth"):
        prior = prior_from_model_card(tmp_path / "moved" / name)
        assert prior == str(tmp_path / "moved" / "prior"), name
        assert resolve(prior) == tmp_path / "moved" / "prior"


def test_files_to_download_takes_one_weight_form_per_folder():
    from kandinsky.hub import files_to_download

    repo = [
        "README.md", "model_index.json", "scheduler/scheduler_config.json",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "movq/config.json", "movq/diffusion_pytorch_model.bin", "movq/diffusion_pytorch_model.fp16.bin",
        "text_encoder/config.json", "text_encoder/model.fp16.safetensors", "text_encoder/pytorch_model.bin",
        "image_encoder/config.json", "image_encoder/model-00001-of-00002.safetensors",
        "image_encoder/model-00002-of-00002.safetensors", "image_encoder/model.safetensors.index.json",
        "image_encoder/model.safetensors.index.fp16.json", "image_encoder/model.fp16-00001-of-00001.safetensors",
        "tokenizer/vocab.json", "tokenizer/merges.txt", ".gitattributes", "sample.png",
    ]
    got = files_to_download(repo)
    assert "unet/diffusion_pytorch_model.safetensors" in got
    assert not any(n.startswith("unet/") and (n.endswith(".bin") or ".fp16." in n) for n in got)
    assert "movq/diffusion_pytorch_model.bin" in got and "movq/diffusion_pytorch_model.fp16.bin" not in got
    assert "text_encoder/model.fp16.safetensors" in got and "text_encoder/pytorch_model.bin" not in got
    assert {"image_encoder/model-00001-of-00002.safetensors", "image_encoder/model-00002-of-00002.safetensors",
            "image_encoder/model.safetensors.index.json"} <= set(got)
    assert "image_encoder/model.safetensors.index.fp16.json" not in got
    assert "image_encoder/model.fp16-00001-of-00001.safetensors" not in got
    assert {"README.md", "tokenizer/vocab.json", "tokenizer/merges.txt", "unet/config.json"} <= set(got)
    assert "sample.png" not in got and ".gitattributes" not in got
