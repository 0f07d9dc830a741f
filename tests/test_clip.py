"""CLIP text / image encoders and image preprocessing against transformers (the reference)."""
from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from kandinsky.clip import (
    CLIPTextConfig,
    CLIPVisionConfig,
    ImageEncoder,
    ImagePreprocessor,
    ImageProcessorConfig,
    TextEncoder,
    Tokenizer,
)
from kandinsky.config import ConfigError
from tests.conftest import DATA
from tests.helpers import assert_close
from tests.refs.clip import TINY_TEXT_CONFIG, TINY_VISION_CONFIG, make_text_reference, make_vision_reference
from weights_convert import build_model, clip_text, clip_vision, convert_state_dict, load_component
from weights_convert.naming import rename

PRIOR = DATA / "kandinsky-2-2-prior"
FORMS = ("safetensors", "bin", "fp16", "sharded")


def _ours_from_reference(ref, config: dict):
    """Our model with the reference's weights, through the converter (no file)."""
    model = (TextEncoder(CLIPTextConfig.from_dict(config)) if "text_model" in dict(ref.named_children())
             else ImageEncoder(CLIPVisionConfig.from_dict(config)))
    model.load_state_dict(convert_state_dict(config, ref.state_dict()), strict=True)
    return model.eval()


def _prompts_ids(clip_tokenizer_folder):
    prompts = [
        "a photo of a cat",
        "",
        "an oil painting of a lighthouse in a storm, dramatic light, trending on artstation",
        "red " * 90,  # truncated to 77
    ]
    return Tokenizer.from_folder(clip_tokenizer_folder)(prompts)


# --------------------------------------------------------------------------- text tower
@pytest.mark.parametrize("form", FORMS)
def test_text_parity_every_file_form(clip_text_checkpoint_forms, clip_tokenizer_folder, form):
    folder, ref = clip_text_checkpoint_forms[form]
    ours = load_component(folder)
    assert isinstance(ours, TextEncoder)
    ids, mask = _prompts_ids(clip_tokenizer_folder)
    with torch.no_grad():
        got = ours(ids)  # as the prior pipeline calls it: no mask
        want = ref(ids)
    assert got.last_hidden_state.shape == (4, 77, TINY_TEXT_CONFIG["hidden_size"])
    assert_close(got.text_embeds, want.text_embeds)
    assert_close(got.last_hidden_state, want.last_hidden_state)


def test_text_parity_with_padding_mask(clip_text_checkpoint, clip_tokenizer_folder):
    folder, ref = clip_text_checkpoint
    ours = load_component(folder)
    ids, mask = _prompts_ids(clip_tokenizer_folder)
    assert not mask.all() and mask.any(dim=1).all()
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
        want = ref(ids, attention_mask=mask.long())
        unmasked = ref(ids)
    # the mask changes the padded positions (they no longer see padding), so the test is not vacuous
    assert (want.last_hidden_state - unmasked.last_hidden_state).abs().max() > 1e-3
    assert_close(got.text_embeds, want.text_embeds)
    assert_close(got.last_hidden_state, want.last_hidden_state)
    # bool and 0/1 integer masks are the same thing
    with torch.no_grad():
        assert_close(ours(ids, attention_mask=mask.long()).last_hidden_state, want.last_hidden_state)


# A second tiny tower exercising the other config branches: quick_gelu, projection_dim !=
# hidden_size, and the non-legacy pooling rule (first occurrence of eos_token_id).
VARIANT_TEXT = dict(
    TINY_TEXT_CONFIG, hidden_size=40, intermediate_size=56, projection_dim=24, num_attention_heads=5,
    num_hidden_layers=3, hidden_act="quick_gelu", eos_token_id=5000, max_position_embeddings=20, vocab_size=6000,
)


def test_text_parity_variant_config():
    ref = make_text_reference(VARIANT_TEXT, seed=3)
    ours = _ours_from_reference(ref, VARIANT_TEXT)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4999, (3, 20), generator=g)
    ids[0, 7] = ids[0, 12] = 5000  # pooled at the first 5000, not at the argmax
    ids[1, 19] = 5000
    ids[2, 3] = 5000
    ids[2, 5] = 5999  # the largest id is not the end-of-text token here
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[0, 13:] = False
    mask[2, 4:] = False
    with torch.no_grad():
        for m in (None, mask):
            got = ours(ids, attention_mask=m)
            want = ref(ids, attention_mask=None if m is None else m.long())
            assert got.text_embeds.shape == (3, 24)
            assert_close(got.text_embeds, want.text_embeds)
            assert_close(got.last_hidden_state, want.last_hidden_state)
        # shorter sequences than max_position_embeddings work like the reference
        assert_close(ours(ids[:, :9]).last_hidden_state, ref(ids[:, :9]).last_hidden_state)


def test_text_legacy_pooling_takes_the_largest_id(clip_text_checkpoint):
    """eos_token_id == 2 (the real config): pooled at the argmax id, even without any 49407."""
    folder, ref = clip_text_checkpoint
    ours = load_component(folder)
    assert ours.config.eos_token_id == 2
    ids = torch.randint(0, 40000, (3, 77), generator=torch.Generator().manual_seed(4))
    ids[:, 10] = 2  # id 2 is NOT where it pools
    ids[0, 30] = 45000
    with torch.no_grad():
        assert_close(ours(ids).text_embeds, ref(ids).text_embeds)


def test_text_errors(clip_text_checkpoint):
    ours = load_component(clip_text_checkpoint[0])
    with pytest.raises(ValueError, match="positions"):
        ours(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        ours(torch.zeros(2, 77, dtype=torch.long), attention_mask=torch.ones(2, 76))


# --------------------------------------------------------------------------- image tower
@pytest.mark.parametrize("form", FORMS)
def test_vision_parity_every_file_form(clip_vision_checkpoint_forms, form):
    folder, ref = clip_vision_checkpoint_forms[form]
    ours = load_component(folder)
    assert isinstance(ours, ImageEncoder)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = ours(pixels)
        want = ref(pixels).image_embeds
    assert got.shape == (3, TINY_VISION_CONFIG["projection_dim"])
    assert_close(got, want)


def test_vision_parity_variant_config():
    cfg = dict(TINY_VISION_CONFIG, image_size=28, patch_size=7, hidden_act="quick_gelu", projection_dim=24,
               hidden_size=40, num_attention_heads=5, num_hidden_layers=3)
    ref = make_vision_reference(cfg, seed=5)
    ours = _ours_from_reference(ref, cfg)
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close(ours(pixels), ref(pixels).image_embeds)
        with pytest.raises(ValueError, match=r"\(B, 3, 28, 28\)"):
            ours(torch.zeros(1, 3, 32, 32))


def test_vision_zero_image_like_prior_pipeline(clip_vision_checkpoint):
    """The prior pipeline's `get_zero_embed`: an all-zero image."""
    folder, ref = clip_vision_checkpoint
    ours = load_component(folder)
    zero = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        assert_close(ours(zero), ref(zero).image_embeds)


@pytest.mark.parametrize("make, config", [(make_text_reference, TINY_TEXT_CONFIG), (make_vision_reference, TINY_VISION_CONFIG)])
def test_old_checkpoints_position_ids_are_dropped(make, config):
    """transformers < 4.31 saved `*.embeddings.position_ids` (a buffer, not a weight)."""
    ref = make()
    state = dict(ref.state_dict())
    prefix = "text_model" if "text_model" in dict(ref.named_children()) else "vision_model"
    state[f"{prefix}.embeddings.position_ids"] = torch.arange(77 if prefix == "text_model" else 17)[None]
    ours = (TextEncoder(CLIPTextConfig.from_dict(config)) if prefix == "text_model"
            else ImageEncoder(CLIPVisionConfig.from_dict(config)))
    ours.load_state_dict(convert_state_dict(config, state), strict=True)


# --------------------------------------------------------------------------- full size (meta)
@pytest.mark.parametrize(
    "component, module, count",
    [("text_encoder", clip_text, 694_659_840), ("image_encoder", clip_vision, 1_844_907_264)],
)
def test_full_size_tensor_table(component, module, count):
    from transformers import AutoConfig, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    config = json.loads((PRIOR / component / "config.json").read_text())
    ref_cls = {"text_encoder": CLIPTextModelWithProjection, "image_encoder": CLIPVisionModelWithProjection}[component]
    with torch.device("meta"):
        ref = ref_cls(AutoConfig.from_pretrained(PRIOR / component))
        ours = build_model(config)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    # hub -> ours: every reference tensor maps to exactly one of ours, same shape, none left over
    forward = {k: rename(k, module.TABLE) for k in ref_shapes}
    assert len(set(forward.values())) == len(forward)
    assert set(forward.values()) == set(our_shapes)
    assert all(our_shapes[forward[k]] == shape for k, shape in ref_shapes.items())
    # ours -> hub
    backward = {k: rename(k, module.TABLE, reverse=True) for k in our_shapes}
    assert set(backward.values()) == set(ref_shapes)
    assert all(ref_shapes[backward[k]] == shape for k, shape in our_shapes.items())
    assert sum(p.numel() for p in ours.parameters()) == count
    assert sum(p.numel() for p in ref.parameters()) == count
    assert not list(ours.buffers())  # nothing outside the checkpoint (built on meta, loaded by assign)


# --------------------------------------------------------------------------- configs
@pytest.mark.parametrize("cls, component", [(CLIPTextConfig, "text_encoder"), (CLIPVisionConfig, "image_encoder")])
def test_config_round_trip_through_transformers(cls, component, tmp_path):
    from transformers import AutoConfig

    cfg = cls.from_dict(json.loads((PRIOR / component / "config.json").read_text()))
    assert cfg.hidden_act == "gelu"
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    loaded = AutoConfig.from_pretrained(tmp_path)
    real = AutoConfig.from_pretrained(PRIOR / component)
    assert type(loaded) is type(real) and loaded.architectures == [cls.CLASS_NAME]
    for field in cfg.to_dict():
        if field not in ("architectures", "model_type"):
            assert getattr(loaded, field) == getattr(real, field), field
    # and what transformers writes back is accepted and gives the same config
    loaded.save_pretrained(tmp_path / "again")
    assert cls.from_dict(json.loads((tmp_path / "again" / "config.json").read_text())) == cfg


@pytest.mark.parametrize("cls, ref_name", [(CLIPTextConfig, "CLIPTextConfig"), (CLIPVisionConfig, "CLIPVisionConfig")])
def test_config_defaults_match_transformers(cls, ref_name):
    """A config.json that omits keys means the same network here as in transformers."""
    import transformers

    ref = getattr(transformers, ref_name)()
    ours = cls.from_dict({"architectures": [cls.CLASS_NAME]})
    for field, value in ours.to_dict().items():
        if field != "architectures":
            assert getattr(ref, field) == value, field


def test_saved_fixture_configs_are_accepted(clip_text_checkpoint, clip_vision_checkpoint):
    for (folder, _), cls in ((clip_text_checkpoint, CLIPTextConfig), (clip_vision_checkpoint, CLIPVisionConfig)):
        written = json.loads((folder / "config.json").read_text())
        assert "transformers_version" in written  # written by transformers' save_pretrained
        cls.from_dict(written)


@pytest.mark.parametrize(
    "cls, key, value, match",
    [
        (CLIPTextConfig, "hidden_act", "gelu_new", "hidden_act='gelu_new'"),
        (CLIPVisionConfig, "hidden_act", "relu", "hidden_act='relu'"),
        (CLIPTextConfig, "eos_token_id", [2, 49407], "eos_token_id"),
        (CLIPTextConfig, "num_attention_heads", 7, "not a multiple"),
        (CLIPVisionConfig, "image_size", [224, 224], "image_size"),
        (CLIPTextConfig, "model_type", "clip", "model_type='clip'"),
        (CLIPTextConfig, "use_cache", True, "unknown key 'use_cache'"),
        (CLIPVisionConfig, "num_positions", 257, "unknown key 'num_positions'"),
    ],
)
def test_config_refusals(cls, key, value, match):
    component = "text_encoder" if cls is CLIPTextConfig else "image_encoder"
    config = json.loads((PRIOR / component / "config.json").read_text())
    config[key] = value
    with pytest.raises(ConfigError, match=match.replace("[", r"\[").replace("(", r"\(")):
        cls.from_dict(config)


def test_meta_construction_has_no_buffers():
    with torch.device("meta"):
        text = TextEncoder(CLIPTextConfig.from_dict(TINY_TEXT_CONFIG))
        image = ImageEncoder(CLIPVisionConfig.from_dict(TINY_VISION_CONFIG))
    for model in (text, image):
        assert not list(model.buffers())
        assert all(p.device.type == "meta" for p in model.parameters())


# --------------------------------------------------------------------------- image preprocessing
@pytest.fixture(scope="module")
def reference_processor():
    """transformers' processor exactly as diffusers loads it from the checkpoint folder."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor.from_pretrained(PRIOR / "image_processor")


@pytest.fixture(scope="module")
def ours_processor():
    return ImagePreprocessor.from_folder(PRIOR / "image_processor")


def _ref(processor, images, **kw):
    return processor(images, return_tensors="pt", **kw).pixel_values


def _image(h, w, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    # smooth structure plus noise so that the bicubic filter has something to do
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / 7 + c) * np.cos(yy / 11 - c) for c in range(channels)], -1)
    img = 127.5 + 90 * base + rng.normal(0, 25, (h, w, channels))
    return np.clip(img, 0, 255).astype(np.uint8)


def test_reference_processor_is_the_pil_one(reference_processor):
    """What we reproduce: transformers' Pillow-based CLIP processor (no torchvision here)."""
    assert reference_processor.backend == "pil"


@pytest.mark.parametrize("h, w", [(300, 200), (150, 400), (224, 224), (100, 61), (224, 500), (1000, 999)])
def test_preprocess_pil_parity(reference_processor, ours_processor, h, w):
    img = PIL.Image.fromarray(_image(h, w, seed=h + w))
    got = ours_processor(img)
    assert got.shape == (1, 3, 224, 224) and got.dtype == torch.float32
    assert torch.equal(got, _ref(reference_processor, img))


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA", "CMYK", "I;16"])
def test_preprocess_pil_modes(reference_processor, ours_processor, mode):
    arr = _image(180, 250, channels=4, seed=3)
    if mode == "P":
        img = PIL.Image.fromarray(arr[..., :3]).convert("P")
        img.info["transparency"] = 5  # a transparent palette entry: composited onto white
    elif mode == "I;16":
        img = PIL.Image.fromarray(arr[..., 0].astype(np.uint16) * 200)
    else:
        img = PIL.Image.fromarray(arr, "RGBA").convert(mode)
    assert torch.equal(ours_processor(img), _ref(reference_processor, img))


def test_preprocess_numpy_parity(reference_processor, ours_processor):
    # uint8 (H, W, 3), a batch (B, H, W, 3), RGBA and grey arrays
    a, b = _image(240, 320, seed=1), _image(320, 240, seed=2)
    assert torch.equal(ours_processor(a), _ref(reference_processor, a))
    batch = np.stack([a, _image(240, 320, seed=4)])
    assert torch.equal(ours_processor(batch), _ref(reference_processor, list(batch)))
    assert torch.equal(ours_processor([a, b]), _ref(reference_processor, [a, b]))
    rgba = _image(200, 260, channels=4, seed=5)
    assert torch.equal(ours_processor(rgba), _ref(reference_processor, rgba))
    grey = _image(260, 230, channels=1, seed=6)
    assert torch.equal(ours_processor(grey), _ref(reference_processor, grey))


def test_preprocess_float_parity(reference_processor, ours_processor):
    """Float images in [0, 1]: transformers quantises them to uint8 for Pillow, and with its
    default do_rescale=True would divide by 255 a second time; we treat floats as [0, 1]
    images, which is transformers with do_rescale=False."""
    g = torch.Generator().manual_seed(0)
    # numpy float32 / float64 (H, W, 3)
    for dtype in (np.float32, np.float64):
        x = (_image(250, 190, seed=7) / 255.0 * 0.98 + 0.01).astype(dtype)
        assert torch.equal(ours_processor(x), _ref(reference_processor, x, do_rescale=False))
    # torch (3, H, W), (B, 3, H, W) and lists, float in [0, 1]
    t = torch.rand(2, 3, 230, 300, generator=g)
    want = _ref(reference_processor, list(t), do_rescale=False)
    assert torch.equal(ours_processor(t), want)
    assert torch.equal(ours_processor(list(t)), want)
    assert torch.equal(ours_processor(t[0]), want[:1])
    # half precision tensors and RGBA floats
    assert torch.equal(ours_processor(t[0].half()), _ref(reference_processor, t[0].half(), do_rescale=False))
    rgba = torch.rand(4, 210, 260, generator=g)
    assert torch.equal(ours_processor(rgba), _ref(reference_processor, rgba, do_rescale=False))
    # uint8 torch images are 0..255
    u8 = torch.from_numpy(_image(200, 300, seed=9)).permute(2, 0, 1)
    assert torch.equal(ours_processor(u8), _ref(reference_processor, u8))


def test_preprocess_errors(ours_processor):
    with pytest.raises(ValueError, match="2 channels"):
        ours_processor(np.zeros((64, 64, 2), np.uint8))
    with pytest.raises(ValueError, match="5 channels"):
        ours_processor(torch.rand(5, 64, 64))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ours_processor(torch.rand(3, 64, 64) * 2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ours_processor(np.full((64, 64, 3), np.nan, np.float32))
    with pytest.raises(TypeError, match="int32"):
        ours_processor(np.zeros((64, 64, 3), np.int32))
    with pytest.raises(TypeError, match="str"):
        ours_processor("cat.png")
    with pytest.raises(ValueError, match="channels first"):
        ours_processor(torch.rand(64, 64))
    with pytest.raises(ValueError, match="empty"):
        ours_processor([])


def test_preprocess_tiny_folder_for_pipelines(clip_image_processor_folder):
    from transformers import CLIPImageProcessor

    img = PIL.Image.fromarray(_image(90, 70, seed=11))
    ours = ImagePreprocessor.from_folder(clip_image_processor_folder)
    ref = CLIPImageProcessor.from_pretrained(clip_image_processor_folder)
    got = ours(img)
    assert got.shape == (1, 3, 32, 32)
    assert torch.equal(got, _ref(ref, img))


def test_preprocess_config_round_trip(tmp_path):
    from transformers import CLIPImageProcessor

    cfg = ImagePreprocessor.from_folder(PRIOR / "image_processor").config
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg.to_dict()))
    ref = CLIPImageProcessor.from_pretrained(tmp_path)
    real = CLIPImageProcessor.from_pretrained(PRIOR / "image_processor")
    assert ref.to_dict() == real.to_dict()
    # transformers' own save is accepted (dict-valued size / crop_size, rescale_factor, ...)
    ref.save_pretrained(tmp_path / "again")
    assert ImagePreprocessor.from_folder(tmp_path / "again").config == cfg
    assert ImageProcessorConfig() == cfg  # the defaults are CLIP's


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("resample", 2, "resample=2"),
        ("do_center_crop", False, "do_center_crop=False"),
        ("size", {"height": 224, "width": 224}, "size="),
        ("crop_size", {"height": 224, "width": 200}, "crop_size="),
        ("crop_size", 256, "padding"),
        ("do_pad", True, "unknown key 'do_pad'"),
    ],
)
def test_preprocess_config_refusals(key, value, match):
    config = json.loads((PRIOR / "image_processor" / "preprocessor_config.json").read_text())
    config[key] = value
    with pytest.raises(ConfigError, match=match):
        ImagePreprocessor.from_dict(config)


# --------------------------------------------------------------------------- end to end
def test_image_to_embedding_like_the_prior_pipeline(clip_vision_checkpoint, clip_image_processor_folder):
    """PIL image -> processor -> image encoder, ours vs transformers (diffusers' interpolate path)."""
    from transformers import CLIPImageProcessor

    folder, ref = clip_vision_checkpoint
    ours = load_component(folder)
    images = [PIL.Image.fromarray(_image(120, 90, seed=s)) for s in (1, 2)]
    ref_pixels = _ref(CLIPImageProcessor.from_pretrained(clip_image_processor_folder), images)
    with torch.no_grad():
        got = ours(ImagePreprocessor.from_folder(clip_image_processor_folder)(images))
        want = ref(ref_pixels).image_embeds
    assert_close(got, want)
