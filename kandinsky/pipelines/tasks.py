"""Every task, declared once. The decoder methods, the prompt-level API and the CLI read this.

A decoder task is what the UNet is given besides the image embeddings (an image to start
from, a mask, a hint) and which checkpoint can do it. A prompt-level task adds where the
image embeddings come from (the prior on a prompt, an image's CLIP embedding, a mix, ...).
Adding a task or an option is one edit here (plus, for a new input kind, how it is read).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Input:
    """A task input besides the embeddings: its Python name, its CLI flag and help."""

    name: str
    flag: str
    help: str
    kind: str = "image"  # "image" (a picture file on the CLI), "number"


INPUTS = {
    "image": Input("image", "--image", "input picture (PNG, JPEG, ...); img2img / inpaint default to its size"),
    "mask_image": Input("mask_image", "--mask", "mask picture of the same size: white = repaint, black = keep"),
    "hint": Input("hint", "--hint", "depth map picture (grey, bright = near; 8- or 16-bit)"),
    "strength": Input("strength", "--strength",
                      "how much to change the picture, in (0, 1]: the share of the decoder's steps run (default 0.3)",
                      kind="number"),
}


@dataclass(frozen=True)
class DecoderTask:
    """What a decoder task takes. ``start``: "noise" (x_T ~ N(0, I), ``latents`` may be given) or
    "image" (the image's latents noised to the first of the last ``strength`` share of steps)."""

    name: str
    checkpoint: str  # "decoder", "inpaint" or "controlnet": the checkpoint kind that can run it
    inputs: tuple[str, ...]  # keys of INPUTS, in positional order after the embeddings
    start: str = "noise"


DECODER_TASKS: dict[str, DecoderTask] = {
    t.name: t
    for t in (
        DecoderTask("text2img", "decoder", ()),
        DecoderTask("img2img", "decoder", ("image", "strength"), start="image"),
        DecoderTask("inpaint", "inpaint", ("image", "mask_image")),
        DecoderTask("controlnet", "controlnet", ("hint",)),
        DecoderTask("controlnet_img2img", "controlnet", ("image", "hint", "strength"), start="image"),
    )
}

# What each kind of checkpoint can do, and where it comes from (one table for the API and CLI).
CHECKPOINTS = {
    "decoder": "kandinsky-community/kandinsky-2-2-decoder",
    "inpaint": "kandinsky-community/kandinsky-2-2-decoder-inpaint",
    "controlnet": "kandinsky-community/kandinsky-2-2-controlnet-depth",
}
PRIOR_CHECKPOINT = "kandinsky-community/kandinsky-2-2-prior"
TASKS_OF_CHECKPOINT = {kind: tuple(t.name for t in DECODER_TASKS.values() if t.checkpoint == kind) for kind in CHECKPOINTS}

# Options every decoder task takes (name: default). The prompt-level API adds PRIOR_OPTIONS.
DECODER_OPTIONS = {
    "height": None,  # default: the input picture's height for image tasks, else 512
    "width": None,
    "num_inference_steps": 100,
    "guidance_scale": 4.0,
    "num_images_per_prompt": 1,
    "generator": None,
    "latents": None,  # noise-start tasks only
    "output_type": "pil",
    "callback_on_step_end": None,
    "progress": True,
    "scheduler": None,  # a sampler name for this call (default: the pipeline's)
    "return_trajectory": False,
    "tile": None,  # MoVQ decoding in tiles: None = above 1024 x 1024 px, True / False, or a tile size in pixels
    # Fewer / cheaper UNet evaluations (kandinsky.sampling.denoisers.DecoderDenoiser; docs/performance.md):
    "cache_interval": 1,  # a full UNet evaluation every N; in between only the levels above cache_level (1: off)
    "cache_level": 1,  # the cut: UNet resolution levels >= this one (and the mid block) are cached
    "guidance_interval": None,  # (lo, hi) fractions of the run (0 = from noise, 1 = clean) where guidance runs
    "preset": None,  # a key of PRESETS: its values replace the defaults; explicit arguments still win
}


def decoder_options(task: str) -> dict:
    """The options (name: default) decoder task ``task`` takes: DECODER_OPTIONS, without ``latents`` for the
    tasks that start from an image."""
    return {k: v for k, v in DECODER_OPTIONS.items() if not (k == "latents" and DECODER_TASKS[task].start == "image")}


PRIOR_OPTIONS = {
    "prior_guidance_scale": 4.0,
    "prior_num_inference_steps": 25,
    "prior_latents": None,
}

# Named speed / quality trade-offs, picked from the Pareto table in docs/performance.md ("Presets": the
# measured numbers; benchmarks/pareto.py). A preset fills the options it names (decoder and prior); an
# argument given explicitly overrides it. "reference" is the reference's default configuration.
PRESETS = {
    "reference": {"scheduler": "ddpm", "num_inference_steps": 100, "guidance_scale": 4.0, "cache_interval": 1,
                  "cache_level": 1, "guidance_interval": None, "prior_num_inference_steps": 25},
    "balanced": {"scheduler": "dpmpp_2m", "num_inference_steps": 20, "guidance_scale": 4.0, "cache_interval": 1,
                 "cache_level": 1, "guidance_interval": (0.0, 0.6), "prior_num_inference_steps": 25},
    "fast": {"scheduler": "dpmpp_2m", "num_inference_steps": 20, "guidance_scale": 4.0, "cache_interval": 2,
             "cache_level": 1, "guidance_interval": (0.0, 0.6), "prior_num_inference_steps": 25},
}


def preset_options(preset, names) -> dict:
    """The values preset ``preset`` (a key of PRESETS, or None: none) gives to the options ``names``."""
    if preset is None:
        return {}
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is not a preset: use one of {', '.join(map(repr, PRESETS))} (or None).")
    return {name: value for name, value in PRESETS[preset].items() if name in names}


@dataclass(frozen=True)
class PromptTask:
    """A prompt-level task: where the image embeddings come from, and the decoder task painting them.

    ``embeddings``: "prompt" (the prior on a prompt), "image" (CLIP embedding of --image, guided
    away from the zero image), "mix" (weighted prompts and images), "emb2emb" (an image's
    embedding moved towards a prompt by the prior)."""

    name: str
    embeddings: str
    decoder_task: str
    inputs: tuple[str, ...]  # decoder inputs (keys of INPUTS)
    help: str
    description: str
    examples: tuple[str, ...]


PROMPT_TASKS: dict[str, PromptTask] = {
    t.name: t
    for t in (
        PromptTask("text2img", "prompt", "text2img", (), "image from a prompt",
                   "Paint a picture of PROMPT: the prior turns the prompt into a CLIP image embedding, the decoder "
                   "paints it.",
                   ('kandinsky text2img "a red cat, 4k photo" -o cat.png',
                    'kandinsky text2img "a red cat" --negative-prompt "low quality" --num-images 2 --seed 1 -o cats.png',
                    'kandinsky text2img --demo "a red circle on a blue background" -o demo.png     (offline)')),
        PromptTask("img2img", "prompt", "img2img", ("image", "strength"), "re-paint an image following a prompt",
                   "Re-paint --image following PROMPT: the picture is noised and the last STRENGTH share of the "
                   "decoder's steps denoise it (0.3 keeps much of it, 1.0 keeps almost nothing).",
                   ('kandinsky img2img "a red cat, oil painting" --image cat.png --strength 0.4 -o painted.png',)),
        PromptTask("inpaint", "prompt", "inpaint", ("image", "mask_image"),
                   "paint a prompt into the white area of a mask",
                   "Repaint the white area of --mask in --image following PROMPT; black is kept. Uses the "
                   "decoder-inpaint checkpoint.",
                   ('kandinsky inpaint "a wizard hat" --image cat.png --mask mask.png -o hat.png',)),
        PromptTask("variations", "image", "text2img", (), "variations of an image",
                   "New pictures of what --image shows (its CLIP image embedding decoded again; no prompt).",
                   ("kandinsky variations --image cat.png --num-images 2 -o var.png",)),
        PromptTask("interpolate", "mix", "text2img", (), "mix prompts and images",
                   "A picture of the weighted mix of prompts and images (--mix ITEM WEIGHT, repeated; an ITEM that "
                   "is an image file, or ends in an image extension, is an image).",
                   ('kandinsky interpolate --mix "a red cat" 0.3 --mix cat.png 0.4 --mix "a starry night" 0.3 '
                    '-o mix.png',)),
        PromptTask("emb2emb", "emb2emb", "text2img", (), "move an image's embedding towards a prompt",
                   "Paint --image's CLIP embedding moved towards PROMPT by the prior (--prior-strength: the share "
                   "of the prior's steps run from the noised image embedding).",
                   ('kandinsky emb2emb "a red cat" --image cat.png --prior-strength 0.5 -o out.png',)),
        PromptTask("controlnet", "prompt", "controlnet", ("hint",), "image from a prompt and a depth hint",
                   "Paint PROMPT following the depth map --hint (bright = near). Uses the controlnet-depth "
                   "checkpoint.",
                   ('kandinsky controlnet "a robot in a forest" --hint depth.png -o robot.png',)),
        PromptTask("controlnet_img2img", "prompt", "controlnet_img2img", ("image", "hint", "strength"),
                   "re-paint an image following a prompt and a depth hint",
                   "Re-paint --image following PROMPT and the depth map --hint. Uses the controlnet-depth "
                   "checkpoint.",
                   ('kandinsky controlnet_img2img "a robot" --image room.png --hint depth.png -o robot.png',)),
    )
}


def checkpoint_for(task: str) -> str:
    """The checkpoint kind ("decoder", "inpaint", "controlnet") a (decoder or prompt-level) task needs."""
    if task in PROMPT_TASKS:
        task = PROMPT_TASKS[task].decoder_task
    return DECODER_TASKS[task].checkpoint
