"""The demo checkpoints: the tiny trained shapes model that ships in the package, and a tiny
RANDOM-WEIGHT Kandinsky 2.2 checkpoint set, built on the fly, for offline demos.

``demo_folders()`` gives the shipped checkpoints (kandinsky/demo_weights/, trained by
``kandinsky train-demo``: kandinsky.data.train_demo).
``build_demo_checkpoints(folder)`` writes the four hub repos in their exact layout
(``prior/`` with text_encoder, image_encoder, tokenizer, scheduler, image_processor;
``decoder/``, ``decoder-inpaint/``, ``controlnet-depth/`` with unet, movq, scheduler),
using kandinsky's own models and ``weights_convert.save_component``. The weights are
random: the pictures are noise. The point is that the whole chain runs, offline, in
seconds, with the real code paths (tokenizer, configs, file formats, schedulers).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from kandinsky.clip.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

DEMO_WEIGHTS = Path(__file__).resolve().parent / "demo_weights"  # the shipped tiny shapes model
DEMO_REPOS = ("prior", "decoder", "decoder-inpaint")

# Real scheduler / processor configs of the hub repos (tests/data holds the originals).
PRIOR_SCHEDULER = {
    "_class_name": "UnCLIPScheduler",
    "clip_sample": True,
    "clip_sample_range": 10.0,
    "num_train_timesteps": 1000,
    "prediction_type": "sample",
    "variance_type": "fixed_small_log",
}
DECODER_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "thresholding": False,
}
EMBED = 32  # CLIP projection = prior embedding = UNet encoder_hid_dim
IMAGE_SIZE = 32  # the tiny image tower's input (the real one is 224)

# The tiny configs, declared once (config.json keys): the random demo checkpoints are built from them, and
# every other tiny model starts from them and says what it changes: the shapes model that ships
# (kandinsky.data.train_demo.CONFIGS) and the tests' random reference models (tests/refs/*.py).
TINY = {
    "text_encoder": {
        "architectures": ["CLIPTextModelWithProjection"],
        "model_type": "clip_text_model",
        "vocab_size": 514,  # 512 byte tokens + <|startoftext|> + <|endoftext|>
        "hidden_size": EMBED,
        "intermediate_size": 64,
        "projection_dim": EMBED,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "eos_token_id": 2,
    },
    "image_encoder": {
        "architectures": ["CLIPVisionModelWithProjection"],
        "model_type": "clip_vision_model",
        "hidden_size": 48,
        "intermediate_size": 96,
        "projection_dim": EMBED,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_channels": 3,
        "image_size": IMAGE_SIZE,
        "patch_size": 8,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
    },
    "prior": {
        "_class_name": "PriorTransformer",
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "num_layers": 2,
        "embedding_dim": EMBED,
        "num_embeddings": 77,  # the other keys: the Kandinsky prior's fixed values (PriorConfig.FIXED)
    },
    "unet": {
        "_class_name": "UNet2DConditionModel",
        "in_channels": 4,
        "out_channels": 8,
        "block_out_channels": [32, 64, 64, 64],
        "layers_per_block": 1,
        "attention_head_dim": 16,
        "norm_num_groups": 8,
        "cross_attention_dim": 32,
        "encoder_hid_dim": EMBED,
        "encoder_hid_dim_type": "image_proj",
        "addition_embed_type": "image",
        "down_block_types": [
            "ResnetDownsampleBlock2D",
            "SimpleCrossAttnDownBlock2D",
            "SimpleCrossAttnDownBlock2D",
            "SimpleCrossAttnDownBlock2D",
        ],
        "up_block_types": [
            "SimpleCrossAttnUpBlock2D",
            "SimpleCrossAttnUpBlock2D",
            "SimpleCrossAttnUpBlock2D",
            "ResnetUpsampleBlock2D",
        ],
        "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
        "resnet_time_scale_shift": "scale_shift",
    },
    "movq": {
        "_class_name": "VQModel",
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "vq_embed_dim": 4,
        "num_vq_embeddings": 64,
        "block_out_channels": [32, 32, 64, 64],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "norm_type": "spatial",
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
    },
}

# what each decoder task's UNet changes in TINY["unet"] (as the hub's three decoder repos do)
UNET_VARIANTS = {
    "decoder": {},  # text2img / img2img: the latents (4 channels)
    "inpaint": {"in_channels": 9},  # latents + masked-picture latents + mask
    "controlnet": {"in_channels": 8, "addition_embed_type": "image_hint"},  # latents + 4 hint channels
}
# the hub folder of each decoder task's checkpoint: (folder, model_index class)
DECODER_REPOS = {
    "decoder": ("decoder", "KandinskyV22Pipeline"),
    "inpaint": ("decoder-inpaint", "KandinskyV22InpaintPipeline"),
    "controlnet": ("controlnet-depth", "KandinskyV22ControlnetPipeline"),
}


class Folders(dict):
    """{checkpoint kind: folder}, keyed as kandinsky.pipelines.tasks.CHECKPOINTS ("prior", "decoder",
    "inpaint", "controlnet"); the hub folder names "decoder-inpaint" and "controlnet-depth", the keys
    of earlier releases, still work for one release, with a warning."""

    OLD_KEYS = {folder: kind for kind, (folder, _) in DECODER_REPOS.items() if folder != kind}

    def __missing__(self, key):
        kind = self.OLD_KEYS.get(key)
        if kind not in self:
            raise KeyError(key)
        import warnings

        warnings.warn(f"the key {key!r} is deprecated (it goes in the next release): use {kind!r} (the hub folder "
                      f"keeps its name {key}/)", FutureWarning, stacklevel=2)
        return self[kind]
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def bytes_to_unicode() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the 256 byte values."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(folder: Path, merges=(), context: int = 77) -> int:
    """A CLIP tokenizer folder: the 256 byte tokens alone and word-final, one token per merge (pairs of
    strings, in order), the two specials last (the largest ids, as in CLIP: the text tower pools at the
    largest id). No merges: 514 tokens. -> the vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + list(SPECIAL_TOKENS)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    _json(folder / "tokenizer_config.json", {
        "unk_token": "<|endoftext|>",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": context,
        "tokenizer_class": "CLIPTokenizer",
    })
    return len(vocab)


def _json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_checkpoint_set(root: str | Path, models: dict, image_size: int, merges=(), context: int = 77,
                         dtype: torch.dtype | None = None) -> dict[str, Path]:
    """The hub folders of a Kandinsky 2.2 checkpoint set under ``root``, as the hub lays them out:

        prior/     models "prior", "text_encoder", "image_encoder"; the tokenizer (``merges``, ``context``
                   tokens), PRIOR_SCHEDULER, the image processor (``image_size``), model_index.json
        decoder/, decoder-inpaint/, controlnet-depth/   one per UNet in ``models`` ("decoder", "inpaint",
                   "controlnet": DECODER_REPOS), each with models["movq"], DECODER_SCHEDULER, model_index.json

    Weights in ``dtype`` (None: as they are). -> Folders {"prior", and the decoder kinds written: path}."""
    from weights_convert import save_component

    root = Path(root)
    prior = root / "prior"
    for name in ("prior", "text_encoder", "image_encoder"):
        save_component(models[name], prior / name, dtype=dtype)
    write_tokenizer(prior / "tokenizer", merges, context)
    _json(prior / "scheduler" / "scheduler_config.json", PRIOR_SCHEDULER)
    _json(prior / "image_processor" / "preprocessor_config.json", {
        "crop_size": image_size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD), "resample": 3, "size": image_size,
    })
    _json(prior / "model_index.json", {
        "_class_name": "KandinskyV22PriorPipeline",
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "image_processor": ["transformers", "CLIPImageProcessor"],
        "prior": ["diffusers", "PriorTransformer"],
        "scheduler": ["diffusers", "UnCLIPScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
    })
    folders = Folders(prior=prior)
    for task, (name, pipeline_class) in DECODER_REPOS.items():
        if task not in models:
            continue
        repo = root / name
        save_component(models[task], repo / "unet", dtype=dtype)
        save_component(models["movq"], repo / "movq", dtype=dtype)
        _json(repo / "scheduler" / "scheduler_config.json", DECODER_SCHEDULER)
        _json(repo / "model_index.json", {
            "_class_name": pipeline_class,
            "movq": ["diffusers", "VQModel"],
            "scheduler": ["diffusers", "DDPMScheduler"],
            "unet": ["diffusers", "UNet2DConditionModel"],
        })
        folders[task] = repo
    return folders


@torch.no_grad()
def random_model(config: dict, seed: int):
    """The model of ``config`` with random weights drawn from ``seed``: norm weights 1 + 0.05 N(0, 1),
    every other float 0.05 N(0, 1)."""
    from weights_convert import build_model

    torch.manual_seed(seed)
    model = build_model(config)
    g = torch.Generator().manual_seed(seed)
    for name, p in model.state_dict(keep_vars=True).items():
        if p.is_floating_point():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.05 * noise if (p.ndim == 1 and name.endswith("weight")) else 0.05 * noise)
    return model


def build_demo_checkpoints(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write tiny random prior / decoder / decoder-inpaint / controlnet-depth folders under ``root``.
    -> Folders {"prior", "decoder", "inpaint", "controlnet": path}."""
    models = {"prior": random_model(TINY["prior"], seed),
              "text_encoder": random_model(TINY["text_encoder"], seed + 1),
              "image_encoder": random_model(TINY["image_encoder"], seed + 2)}
    for i, (task, changes) in enumerate(UNET_VARIANTS.items()):
        models[task] = random_model({**TINY["unet"], **changes}, seed + 10 + i)
    models["movq"] = random_model(TINY["movq"], seed + 20)
    folders = write_checkpoint_set(root, models, IMAGE_SIZE)
    for task in DECODER_REPOS:
        # the prior as a path relative to this card's folder: the set works wherever it is used from
        (folders[task] / "README.md").write_text(
            "---\nprior:\n- ../prior\ntags:\n- random-weights-demo\n---\n"
            "# RANDOM WEIGHTS: a kandinsky demo checkpoint, not a trained model\n"
        )
    return folders


def demo_folders() -> dict[str, Path]:
    """{"prior", "decoder", "inpaint"} -> the shipped tiny trained checkpoint folders (hub layout).

    Raises FileNotFoundError naming the fix when the package has no shipped weights.
    """
    folders = Folders(prior=DEMO_WEIGHTS / "prior", decoder=DEMO_WEIGHTS / "decoder",
                      inpaint=DEMO_WEIGHTS / "decoder-inpaint")
    missing = [str(f) for f in folders.values() if not (f / "model_index.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"the shipped demo weights are missing ({', '.join(missing)}); reinstall the package, or "
            f"rebuild them with `kandinsky train-demo --out {DEMO_WEIGHTS}`."
        )
    return folders


def demo_checkpoints(random: bool = False, seed: int = 0):
    """The checkpoints behind every command's ``--demo`` / ``--random-demo``.

    -> (folders {"prior", "decoder", "inpaint", "controlnet"}, a TemporaryDirectory to clean up or
    None, a one-line message saying what they are). ``random=False``: the tiny model trained on
    procedural shapes that ships in the package (no ControlNet: that entry is None); ``random=True``:
    tiny random-weight checkpoints built now (``seed`` seeds the weights). Neither touches the threads:
    every pipeline call on a model this small runs on one thread, however it was loaded (kandinsky.threads)."""
    import tempfile

    if not random:
        folders = demo_folders()
        message = ("DEMO: tiny model trained on procedural shapes (kandinsky/demo_weights): circles, squares and "
                   "triangles in 8 colours, 2 sizes and 5 positions, at 64 x 64.")
        return {**folders, "controlnet": None}, None, message
    tmp = tempfile.TemporaryDirectory(prefix="kandinsky-demo-")
    return (build_demo_checkpoints(tmp.name, seed=seed), tmp,
            "DEMO: tiny checkpoints with RANDOM weights built on the fly (the pictures are noise).")
