"""The key-renaming engine that every component table goes through."""
import pytest

from weights_convert.naming import rename, rename_all

TABLE = [
    ("text_model.encoder.layers.{i}.self_attn", "blocks.{i}.attn"),
    ("text_model.encoder.layers.{i}", "blocks.{i}"),
    ("down_blocks.{i}.resnets.{j}", "down.{i}.res.{j}"),
]


@pytest.mark.parametrize(
    "hub, ours",
    [
        ("text_model.encoder.layers.3.self_attn.q_proj.weight", "blocks.3.attn.q_proj.weight"),
        ("text_model.encoder.layers.12.mlp.fc1.bias", "blocks.12.mlp.fc1.bias"),
        ("down_blocks.1.resnets.0.conv1.weight", "down.1.res.0.conv1.weight"),
        ("unrelated.weight", "unrelated.weight"),
    ],
)
def test_rename_both_ways(hub, ours):
    assert rename(hub, TABLE) == ours
    assert rename(ours, TABLE, reverse=True) == hub


def test_prefix_matches_whole_components_only():
    # "layers.1" must not match inside "layers.10"; "layers.{i}" needs digits
    assert rename("text_model.encoder.layers.10.x", [("text_model.encoder.layers.1", "a")]) == "text_model.encoder.layers.10.x"
    assert rename("text_model.encoder.layers.x.y", TABLE) == "text_model.encoder.layers.x.y"


def test_collisions_are_refused():
    with pytest.raises(ValueError, match="maps both"):
        rename_all(["a.weight", "b.weight"], [("a", "c"), ("b", "c")])


def test_placeholder_mismatch_is_refused():
    with pytest.raises(ValueError, match="placeholders differ"):
        rename("x.1", [("x.{i}", "y")])
