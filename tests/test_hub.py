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
