"""Checkpoint resolution: folders, hub ids offline, the decoder card's `prior:` entry."""
import pytest

from kandinsky.hub import CheckpointNotFound, prior_from_model_card, resolve


def test_local_folder_is_returned(tmp_path):
    assert resolve(tmp_path) == tmp_path


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointNotFound, match="no such folder"):
        resolve(tmp_path / "a" / "b" / "c")


def test_hub_id_offline_names_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointNotFound, match="huggingface-cli download kandinsky-community/nope"):
        resolve("kandinsky-community/nope")


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
