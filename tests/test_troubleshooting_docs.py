"""docs/troubleshooting.md quotes the messages the code really gives, and documents each of them.

Every error and warning of the hub resolver, the loader, the converter and the tokenizer covered
by that page is triggered here (in-process, on tiny folders), and its text collected; then every
bold `quoted` fragment on the page must occur in one of them (``...`` stands for a part that
varies) and every collected message must contain one of the fragments.
"""
from __future__ import annotations

import re
import socket
import warnings
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants

import weights_convert.__main__ as convert_cli
from kandinsky.clip import Tokenizer
from kandinsky.demo import TINY, write_tokenizer
from kandinsky.hub import resolve
from weights_convert import build_model, load_component, save_component

DOC = Path(__file__).resolve().parents[1] / "docs" / "troubleshooting.md"


def fragments() -> list[str]:
    return re.findall(r"\*\*`(.+?)`\*\*", DOC.read_text())


def _message(call) -> str:
    """The text of the exception ``call()`` raises (it must raise)."""
    try:
        call()
    except Exception as e:  # noqa: BLE001 - any error class: we collect its text
        return str(e)
    raise AssertionError(f"{call} did not raise")


def _hub_messages(tmp_path, monkeypatch) -> list[str]:
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def refuse(*args, **kwargs):
        raise OSError(101, "Network is unreachable (blocked by the test)")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    out = [_message(lambda: resolve("org/x", local_files_only=True)),  # not cached, offline
           _message(lambda: resolve("org/x"))]  # unreachable, not cached
    snap = cache / "models--org--cached" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (cache / "models--org--cached" / "refs").mkdir()
    (cache / "models--org--cached" / "refs" / "main").write_text("a" * 40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resolve("org/cached")  # unreachable, cached: a warning
    out += [str(w.message) for w in caught]
    for name in ("GatedRepoError", "RepositoryNotFoundError", "RevisionNotFoundError"):
        cls = getattr(huggingface_hub.errors, name)

        def model_info(self, *args, _cls=cls, **kwargs):
            error = _cls.__new__(_cls)
            error.args = ("from the hub",)
            raise error

        monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
        out.append(_message(lambda: resolve("org/x", revision="v9")))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model_index.json").write_text("{}")
    out.append(_message(lambda: resolve(tmp_path / "ckpt" / "model_index.json")))
    out.append(_message(lambda: resolve(tmp_path / "nope")))
    return out


def _loader_messages(tmp_path) -> list[str]:
    torch.manual_seed(0)
    movq = build_model(TINY["movq"])
    folder = save_component(movq, tmp_path / "repo" / "movq")
    out = [_message(lambda: load_component(folder, variant="bf16")),
           _message(lambda: load_component(folder / "config.json")),
           _message(lambda: load_component(tmp_path / "repo")),
           _message(lambda: save_component(movq, folder, layout="kandinsky"))]
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((folder / "config.json").read_text())
    out.append(_message(lambda: load_component(bare)))
    other = save_component(build_model({**TINY["movq"], "num_vq_embeddings": 32}), tmp_path / "other")
    (bare / "config.json").write_text((other / "config.json").read_text())
    (bare / "diffusion_pytorch_model.safetensors").write_bytes((folder / "diffusion_pytorch_model.safetensors").read_bytes())
    out.append(_message(lambda: load_component(bare)))  # config of another checkpoint
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    out.append(_message(lambda: load_component(folder)))
    return out


def _converter_messages(tmp_path, capsys, monkeypatch) -> list[str]:
    torch.manual_seed(0)
    src = save_component(build_model(TINY["movq"]), tmp_path / "src" / "movq").parent
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    (tmp_path / "file").write_text("x")
    cases = [(src, tmp_path / "full"), (src, tmp_path / "file"), (src, tmp_path / "file" / "sub"),
             (tmp_path / "nope", tmp_path / "o1"), (src / "movq" / "config.json", tmp_path / "o2"),
             (tmp_path / "full", tmp_path / "o3")]
    out = []
    for a, b in cases:
        assert convert_cli.main([str(a), str(b)]) == 2
        out.append(capsys.readouterr().err.removeprefix("error: "))
    monkeypatch.setattr(convert_cli.os, "access", lambda *args: False)  # a read-only parent
    assert convert_cli.main([str(src), str(tmp_path / "o4")]) == 2
    out.append(capsys.readouterr().err.removeprefix("error: "))
    return out


def _tokenizer_messages(tmp_path) -> list[str]:
    write_tokenizer(tmp_path / "tokenizer")  # byte-level: one token per character
    tokenizer = Tokenizer.from_folder(tmp_path / "tokenizer")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokenizer("x" * 80)
    return [str(w.message) for w in caught if "dropped" in str(w.message)]


@pytest.fixture
def messages(tmp_path, capsys, monkeypatch) -> list[str]:
    for name in ("loader", "convert"):
        (tmp_path / name).mkdir()
    out = _loader_messages(tmp_path / "loader") + _tokenizer_messages(tmp_path)
    out += _converter_messages(tmp_path / "convert", capsys, monkeypatch)  # patches os.access: after the loader
    return out + _hub_messages(tmp_path, monkeypatch)


def _pattern(fragment: str) -> re.Pattern:
    return re.compile(".*?".join(map(re.escape, fragment.split("..."))), re.S)


def test_troubleshooting_quotes_real_messages_and_documents_each(messages):
    quoted = fragments()
    assert len(quoted) >= 20
    assert len(messages) >= 23  # 7 loader, 1 tokenizer, 7 converter, 8 hub
    for fragment in quoted:
        assert any(_pattern(fragment).search(m) for m in messages), f"docs/troubleshooting.md quotes {fragment!r}, which no message contains"
    for message in messages:
        assert any(_pattern(f).search(message) for f in quoted), f"not in docs/troubleshooting.md: {message}"
