"""Session fixtures for the CLIP encoders, tokenizer and image processor.

Fixtures (all session-scoped, built once):

* ``clip_tokenizer_folder`` -> Path: a hub-style ``tokenizer/`` folder (vocab.json,
  merges.txt, tokenizer_config.json, special_tokens_map.json) holding the REAL
  49,408-token CLIP vocabulary, converted from open_clip's ``bpe_simple_vocab_16e6.txt.gz``
  the way transformers' CLIP vocabulary is built. Load it with
  ``transformers.CLIPTokenizer.from_pretrained`` or ``kandinsky.clip.Tokenizer.from_folder``.
* ``clip_text_checkpoint`` -> (folder, reference): a tiny random
  ``CLIPTextModelWithProjection`` (vocab 49,408 so the real tokenizer's ids fit; hidden
  size == projection_dim == 32 as a Kandinsky prior needs; eos_token_id 2 like the real
  config) saved with ``save_pretrained`` (config.json + model.safetensors).
* ``clip_vision_checkpoint`` -> (folder, reference): a tiny random
  ``CLIPVisionModelWithProjection`` (32x32 images, 8x8 patches, projection_dim 32).
* ``clip_image_processor_folder`` -> Path: ``preprocessor_config.json`` (the real
  checkpoint's, with size / crop_size set to the tiny vision tower's 32).
* ``clip_text_checkpoint_forms`` / ``clip_vision_checkpoint_forms`` ->
  dict form -> (folder, reference), the same tiny models written in every file form the
  hub uses:
    "safetensors": model.safetensors
    "bin":         pytorch_model.bin (torch.save of the state dict, as transformers 4 wrote it)
    "fp16":        model.fp16.safetensors (save_pretrained(variant="fp16") of a half copy);
                   its reference is that fp16 model cast back to float32
    "sharded":     model-0000i-of-0000n.safetensors + model.safetensors.index.json
                   (save_pretrained with max_shard_size a quarter of the model)
  Every folder also holds config.json; every reference is float32, eval mode, and was
  randomised with tests.helpers.randomize_ (no zero layers).

The reference models are transformers objects: use them only in tests.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from kandinsky.demo import bytes_to_unicode
from tests.helpers import randomize_
from tests.refs import tiny_kwargs

DATA = Path(__file__).resolve().parent.parent / "data" / "kandinsky-2-2-prior"

# Tiny configs in the hub's config.json form (the keys transformers writes).
# kandinsky.demo's tiny towers with the real vocabulary and the checkpoint's special-token ids
TINY_TEXT_CONFIG = tiny_kwargs("text_encoder", vocab_size=49408, attention_dropout=0.0, bos_token_id=0, pad_token_id=1)
TINY_VISION_CONFIG = tiny_kwargs("image_encoder", attention_dropout=0.0)


# --------------------------------------------------------------------------- tokenizer
def open_clip_dir() -> Path:
    """open_clip's package folder, found without importing it (it needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch is not installed (it ships the CLIP BPE vocabulary)")
    return Path(list(spec.submodule_search_locations)[0])


def write_clip_tokenizer_folder(folder: Path) -> Path:
    """Write the real CLIP vocabulary as a hub ``tokenizer/`` folder (vocab.json + merges.txt).

    Same construction as OpenAI's / open_clip's SimpleTokenizer and transformers' CLIP
    vocab: 256 byte characters, the same with ``</w>``, the first 48,894 merges, then
    ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = open_clip_dir() / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    chars = bytes_to_unicode()  # the 256 byte tokens, in GPT-2 / CLIP order
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408 and len(set(vocab)) == 49408
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    shutil.copy(DATA / "tokenizer" / "tokenizer_config.json", folder / "tokenizer_config.json")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return folder


def load_open_clip_tokenizer():
    """open_clip's own SimpleTokenizer, loaded from its file (open_clip/__init__ needs torchvision)."""
    pytest.importorskip("ftfy")
    pytest.importorskip("regex")
    path = open_clip_dir() / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()


@pytest.fixture(scope="session")
def clip_tokenizer_folder(tmp_path_factory) -> Path:
    """A hub-style CLIP ``tokenizer/`` folder with the real 49,408-token vocabulary."""
    return write_clip_tokenizer_folder(tmp_path_factory.mktemp("clip") / "tokenizer")


# --------------------------------------------------------------------------- image processor
def write_image_processor_folder(folder: Path, size: int = 224, crop_size: int = 224) -> Path:
    """The checkpoint's ``image_processor/preprocessor_config.json`` with the sizes changed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((DATA / "image_processor" / "preprocessor_config.json").read_text())
    cfg.update(size=size, crop_size=crop_size)
    (folder / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))
    return folder


@pytest.fixture(scope="session")
def clip_image_processor_folder(tmp_path_factory) -> Path:
    """``preprocessor_config.json`` for the tiny vision tower (resize/crop to 32)."""
    size = TINY_VISION_CONFIG["image_size"]
    return write_image_processor_folder(tmp_path_factory.mktemp("clip") / "image_processor", size, size)


# --------------------------------------------------------------------------- models
def make_text_reference(config: dict | None = None, seed: int = 0):
    """Tiny random transformers CLIPTextModelWithProjection (float32, eval)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = {k: v for k, v in (config or TINY_TEXT_CONFIG).items() if k not in ("architectures", "model_type")}
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
    return randomize_(model, seed).eval()


def make_vision_reference(config: dict | None = None, seed: int = 0):
    """Tiny random transformers CLIPVisionModelWithProjection (float32, eval)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = {k: v for k, v in (config or TINY_VISION_CONFIG).items() if k not in ("architectures", "model_type")}
    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg))
    return randomize_(model, seed).eval()


def save_forms(model, root: Path) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Save ``model`` in every hub file form; form -> (folder, float32 reference)."""
    import copy

    forms = {}
    folder = root / "safetensors"
    model.save_pretrained(folder)
    forms["safetensors"] = (folder, model)

    folder = root / "bin"
    model.config.save_pretrained(folder)
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "pytorch_model.bin")
    forms["bin"] = (folder, model)

    folder = root / "fp16"
    half = copy.deepcopy(model).half()
    half.save_pretrained(folder, variant="fp16")
    forms["fp16"] = (folder, half.float().eval())

    folder = root / "sharded"
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    model.save_pretrained(folder, max_shard_size=total // 4)
    assert (folder / "model.safetensors.index.json").is_file()
    forms["sharded"] = (folder, model)
    return forms


@pytest.fixture(scope="session")
def clip_text_checkpoint_forms(tmp_path_factory) -> dict:
    """Tiny CLIPTextModelWithProjection in every file form: form -> (folder, reference)."""
    return save_forms(make_text_reference(), tmp_path_factory.mktemp("clip_text"))


@pytest.fixture(scope="session")
def clip_vision_checkpoint_forms(tmp_path_factory) -> dict:
    """Tiny CLIPVisionModelWithProjection in every file form: form -> (folder, reference)."""
    return save_forms(make_vision_reference(), tmp_path_factory.mktemp("clip_vision"))


@pytest.fixture(scope="session")
def clip_text_checkpoint(clip_text_checkpoint_forms):
    """(folder with config.json + model.safetensors, reference CLIPTextModelWithProjection)."""
    return clip_text_checkpoint_forms["safetensors"]


@pytest.fixture(scope="session")
def clip_vision_checkpoint(clip_vision_checkpoint_forms):
    """(folder with config.json + model.safetensors, reference CLIPVisionModelWithProjection)."""
    return clip_vision_checkpoint_forms["safetensors"]
