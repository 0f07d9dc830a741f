"""kandinsky/config.py: configs whose fields are the config.json keys. Values are checked against
the fields' declared types once (check_field_types), FIXED keys against their one value, unknown
keys refused; every key the reference libraries write is known."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from kandinsky.clip.model import CLIPTextConfig, CLIPVisionConfig
from kandinsky.clip.preprocess import ImageProcessorConfig
from kandinsky.config import ComponentConfig, ConfigError, any_sign, check_field_types
from kandinsky.movq.model import MoVQConfig
from kandinsky.prior.model import PriorConfig
from kandinsky.unet.model import UNetConfig
from tests.refs.clip import TINY_TEXT_CONFIG, TINY_VISION_CONFIG
from weights_convert import build_model


@pytest.mark.parametrize("config", [TINY_TEXT_CONFIG, TINY_VISION_CONFIG])
def test_clip_attention_dropout_is_refused(config):
    """The reference drops attention weights in train mode when attention_dropout > 0; we
    implement no dropout, so such a config is refused instead of silently trained without."""
    assert build_model(dict(config, attention_dropout=0.0, dropout=0.3))  # `dropout`: read by no CLIP layer
    with pytest.raises(ConfigError, match=r"attention_dropout=0.1.*0.0"):
        build_model(dict(config, attention_dropout=0.1))


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


# ============================================================================ field types, checked once
@dataclasses.dataclass
class _Example(ComponentConfig):
    width: int = 8
    optional_width: int | None = None
    token: int = any_sign(-1)
    eps: float = 1e-5
    mean: tuple[float, ...] = any_sign((0.0, -0.5))
    widths: tuple[int, ...] = (8, 16)
    names: tuple[str, ...] = ("a",)
    flag: bool = False
    act: str = "silu"


@pytest.mark.parametrize("key, value, must", [
    ("width", 0, "a positive integer"),
    ("width", True, "a positive integer"),
    ("width", 8.0, "a positive integer"),
    ("width", [8, 8], "a positive integer"),
    ("optional_width", -3, "null or a positive integer"),
    ("token", 1.5, "a single integer"),
    ("eps", 0, "a positive number"),
    ("eps", "1e-5", "a positive number"),
    ("mean", (0.0, "x"), "a non-empty list of numbers"),
    ("widths", (), "a non-empty list of positive integers"),
    ("widths", (8, 0), "a non-empty list of positive integers"),
    ("names", ("a", 1), "a non-empty list of strings"),
    ("flag", 1, "true or false"),
    ("act", None, "a string"),
])
def test_a_value_of_the_wrong_type_names_key_value_and_file(key, value, must):
    with pytest.raises(ConfigError) as info:
        _Example.from_dict({key: value}, source="x/config.json")
    shown = tuple(value) if isinstance(value, list) else value
    assert str(info.value) == f"x/config.json: {key}={shown!r} must be {must}."


def test_values_of_the_declared_types_pass():
    cfg = _Example.from_dict({"width": 1, "optional_width": 4, "token": -7, "eps": 2, "mean": [0, -1.5],
                              "widths": [1], "names": ["b", "c"], "flag": True, "act": "gelu"})
    check_field_types(cfg, "x")
    assert cfg.widths == (1,) and cfg.mean == (0, -1.5)


@pytest.mark.parametrize("cls", [CLIPTextConfig, CLIPVisionConfig, ImageProcessorConfig, PriorConfig, UNetConfig,
                                 MoVQConfig])
def test_every_component_config_declares_checkable_types(cls):
    """Each field's declared type has a rule (no bare ``tuple``); the defaults pass; a zero int is refused."""
    cfg = cls()
    check_field_types(cfg, "defaults")
    key = next(f.name for f in dataclasses.fields(cls) if f.type == "int" and not f.metadata)
    with pytest.raises(ConfigError, match=rf"^defaults: {key}=0 must be a positive integer\.$"):
        check_field_types(dataclasses.replace(cfg, **{key: 0}), "defaults")
