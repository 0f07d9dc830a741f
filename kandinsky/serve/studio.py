"""The studio's engine, without Gradio: the models, one run at a time, the parameters of every picture.

    studio = Studio(args)                       # the `kandinsky serve` arguments (the CLI's model flags)
    result = studio.generate("text2img", prompt="a red circle", seed=-1, num_inference_steps=20)
    result.images, result.seed, result.parameters, result.paths    # PNGs carrying a `parameters` chunk
    studio.inpaint(prompt, image, mask_image, outpaint_left=16, ...); studio.mix(prompt_1=..., image_1=..., ...)
    parse_parameters(result.parameters)         # every setting back (the pictures are not kept)

* Models: loaded on first use, once per checkpoint kind (decoder, inpaint, controlnet), through the CLI's
  one loader (kandinsky.cli.common.pipeline: --demo, --prior, --decoder, --dtype, --offload, --lora ...);
  one prior per prior checkpoint, loaded once and shared by every decoder it serves (the loader's
  ``priors``; with --lora, whose adapters may be on the prior, each decoder kind loads its own; --demo's
  ControlNet, which the shapes model lacks, runs on the random demo prior, as the command line's does);
  all requests share them.
* One model run at a time (a lock around loading and sampling: one device, one run); every request makes
  its own ``torch.Generator`` from its seed, so the same seed gives the same bytes, busy server or not.
* Inputs are checked before anything runs (``check_options``); a run whose sample turns NaN or infinite
  stops with the pipelines' own message (a FloatingPointError). Every refusal of an input is a ValueError.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import secrets
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import PIL.Image
import PIL.PngImagePlugin
import torch

from kandinsky.cli import common
from kandinsky.pipelines.tasks import DECODER_OPTIONS, PRIOR_OPTIONS, PROMPT_TASKS, checkpoint_for
from kandinsky.sampling.samplers import get_sampler
from kandinsky.serve import canvas

MAX_SIDE = 2048  # the largest width / height a request may ask for
MAX_IMAGES = 8  # images per prompt, at most
MAX_STEPS = 1000
INPAINT_AREAS = ("whole picture", "only masked area")
ALL_LEVELS = "all levels"  # look inside: every UNet level of the decoder's attention, one column each
MIX_ITEMS = 2  # prompts and pictures in the mix (its tab and /mix), each with a weight
OUTPAINT_SIDES = ("left", "right", "top", "bottom")  # inpaint's outpaint_<side>: pixels added on that side

# The PNG `parameters` chunk: the convention other tools read back ("prompt\nNegative prompt: ...\n
# Steps: 20, Sampler: ddpm, ..."), keyed here by the Python API's names (the mix's by its tab's).
PARAMETER_LABELS = {
    "task": "Task",
    **{key: key.replace("_", " ").capitalize() for key in (  # the mix: "Prompt 1", "Prompt weight 1", ...
        *(f"{kind}_{i}" for i in range(1, MIX_ITEMS + 1) for kind in ("prompt", "prompt_weight")),
        *(f"image_weight_{i}" for i in range(1, MIX_ITEMS + 1)))},
    "num_inference_steps": "Steps",
    "scheduler": "Sampler",
    "guidance_scale": "CFG scale",
    "seed": "Seed",
    "size": "Size",
    "strength": "Strength",
    "prior_num_inference_steps": "Prior steps",
    "prior_guidance_scale": "Prior CFG scale",
    "prior_strength": "Prior strength",
    "mask_blur": "Mask blur",
    "inpaint_area": "Inpaint area",
    "padding": "Padding",
    **{f"outpaint_{side}": f"Outpaint {side}" for side in OUTPAINT_SIDES},
    "model": "Model",
    "num_images_per_prompt": "Images",
}


def quote(value) -> str:
    """A value of the ``Label: value, ...`` line as written: as it is, or a JSON string (``"a, b"``) when it
    would not read back as it is (empty, with a comma, colon, double quote or line break, or spaces at
    either end), as other tools write and read it."""
    text = str(value)
    if text and text == text.strip() and not any(c in text for c in ',:"\n'):
        return text
    return json.dumps(text, ensure_ascii=False)


PAIR = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')  # Label: value (quoted or not)


def parameters_text(params: dict) -> str:
    """The ``parameters`` text of a picture: the prompt, ``Negative prompt: ...``, then ``Label: value``
    pairs (PARAMETER_LABELS) on one line, each value ``quote``d where it must be."""
    lines = [params.get("prompt") or ""]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    pairs = [f"{label}: {quote(params[key])}" for key, label in PARAMETER_LABELS.items()
             if params.get(key) is not None]
    return "\n".join(lines + [", ".join(pairs)])


def parse_parameters(text: str) -> dict:
    """``parameters_text`` read back: {"prompt", "negative_prompt", API names: values as text}."""
    *head, last = text.split("\n")
    by_label = {label: key for key, label in PARAMETER_LABELS.items()}
    negative = next((i for i, line in enumerate(head) if line.startswith("Negative prompt: ")), len(head))
    params = {"prompt": "\n".join(head[:negative]),  # prompts of several lines too
              "negative_prompt": "\n".join(head[negative:]).removeprefix("Negative prompt: ")}
    for label, value in PAIR.findall(last):
        if label in by_label:
            params[by_label[label]] = json.loads(value) if value.startswith('"') else value
    return params


@dataclass
class Result:
    """One request's pictures (PNG files with the ``parameters`` chunk), the seed used and the parameters."""

    images: list[PIL.Image.Image]
    seed: int
    parameters: str
    paths: list[Path] = field(default_factory=list)


def _number(name: str, value, low=None, high=None, integer: bool = False, open_low: bool = False):
    """``value`` as a number in [low, high] (``open_low``: (low, high]) or a ValueError naming ``name``."""
    try:
        number = value if isinstance(value, int) and not isinstance(value, bool) else float(value)  # big ints exact
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if integer:
        if number != int(number):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        number = int(number)
    if (low is not None and (number <= low if open_low else number < low)) or (high is not None and number > high):
        span = f"{'(' if open_low else '['}{low}, {high}]"
        raise ValueError(f"{name} must be in {span}, got {value!r}")
    return number


def check_options(task: str, options: dict) -> dict:
    """The request's options checked and converted (every refusal names the option and the range)."""
    out = dict(options)
    checks = {
        "num_inference_steps": dict(low=1, high=MAX_STEPS, integer=True),
        "prior_num_inference_steps": dict(low=2, high=MAX_STEPS, integer=True),
        "guidance_scale": dict(low=0, high=100),
        "prior_guidance_scale": dict(low=0, high=100),
        "num_images_per_prompt": dict(low=1, high=MAX_IMAGES, integer=True),
        "width": dict(low=0, high=MAX_SIDE, integer=True),  # 0: the default size
        "height": dict(low=0, high=MAX_SIDE, integer=True),
        "strength": dict(low=0, high=1, open_low=True),
        "prior_strength": dict(low=0, high=1, open_low=True),
        "mask_blur": dict(low=0, high=256),
        "padding": dict(low=0, high=MAX_SIDE, integer=True),
    }
    for key, rule in checks.items():
        if out.get(key) is not None:
            out[key] = _number(key, out[key], **rule)
    if out.get("scheduler"):
        try:
            out["scheduler"] = get_sampler(out["scheduler"]).name
        except ValueError as e:
            raise ValueError(f"scheduler: {e}") from None
    if out.get("inpaint_area") is not None and out["inpaint_area"] not in INPAINT_AREAS:
        raise ValueError(f"inpaint_area must be one of {', '.join(map(repr, INPAINT_AREAS))}, "
                         f"got {out['inpaint_area']!r}")
    return out


def resolve_seed(seed) -> int:
    """-1 (or None): a fresh random seed; else the integer seed (0 .. 2**64 - 1)."""
    if seed is None or seed == -1:
        return secrets.randbelow(2**32)
    return _number("seed", seed, low=0, high=2**64 - 1, integer=True)


class Studio:
    """The models behind the page and the API, loaded lazily and shared; see the module docstring."""

    def __init__(self, args: argparse.Namespace, max_pixels: int = canvas.MAX_PIXELS, out_dir=None):
        self.args = args
        self.max_pixels = max_pixels
        self.out_dir = Path(out_dir or tempfile.mkdtemp(prefix="kandinsky-studio-"))
        self._pipes: dict = {}  # checkpoint kind -> Kandinsky
        self._priors: dict = {}  # prior folder -> its PriorPipeline, shared by every decoder it serves
        self._stack = contextlib.ExitStack()  # keeps --random-demo's folders until close()
        self._stack.callback(shutil.rmtree, self.out_dir, ignore_errors=True)
        self._lock = threading.Lock()  # one load or run at a time
        self.device = common.device(args.device)  # a missing device is refused before serving

    # ------------------------------------------------------------------ what this studio offers
    @property
    def demo(self) -> bool:
        return bool(self.args.demo or self.args.random_demo)

    def tasks(self) -> list[str]:
        """The prompt-level tasks offered (keys of PROMPT_TASKS): ControlNet only with its checkpoint."""
        has_controlnet = bool(getattr(self.args, "controlnet", None)) or self.args.random_demo
        return [name for name in PROMPT_TASKS if checkpoint_for(name) != "controlnet" or has_controlnet]

    def default_size(self, task: str = "text2img") -> int:
        """The side pictures without an input picture get (the command line's rule, cli.common)."""
        return common.default_size_and_steps(self.args, task)[0]

    def picture_size(self, task: str, width=None, height=None) -> tuple:
        """(width, height) a ``task`` request runs at (0 or None: not given), by the command line's rule
        (cli.common.picture_size); None: the input picture's (on --demo pictures are resized to its 64 px)."""
        picture = bool({"image", "hint"} & set(PROMPT_TASKS[task].inputs))  # the decoder starts from a picture
        return common.picture_size(self.args, task, width or None, height or None, picture)

    def default_steps(self, task: str = "text2img") -> int:
        return common.default_size_and_steps(self.args, task)[1]

    def model_name(self) -> str:
        if self.args.demo:
            return "kandinsky-demo-shapes"
        if self.args.random_demo:
            return "random-demo"
        return Path(str(self.args.decoder or "kandinsky-2-2-decoder")).name

    # ------------------------------------------------------------------ models
    def pipe(self, task: str):
        """The pipeline for ``task`` (call with the lock held): its checkpoint kind loaded on first use."""
        kind = checkpoint_for(task)
        if kind not in self._pipes:
            override = {"decoder": self.args.decoder, "inpaint": getattr(self.args, "inpaint", None),
                        "controlnet": getattr(self.args, "controlnet", None)}[kind]
            args = argparse.Namespace(**{**vars(self.args), "decoder": override})
            # one prior per prior checkpoint, loaded once (common.pipeline's priors)
            self._pipes[kind], _ = self._stack.enter_context(common.pipeline(args, task, priors=self._priors))
        return self._pipes[kind]

    def close(self) -> None:
        self._stack.close()

    # ------------------------------------------------------------------ running
    def generate(self, task: str, seed=-1, on_step: Callable | None = None, **options) -> Result:
        """Run prompt-level ``task`` with the Python API's keyword ``options`` (pictures as PIL images;
        width / height 0 or None: the default), one run at a time. ``on_step(state)``: after every
        sampler step (progress, previews)."""
        return self.finish(*self._run(task, seed, on_step, options))

    def _run(self, task: str, seed, on_step, options: dict) -> tuple[list, int, dict]:
        """``generate`` before saving: (the pictures, the seed used, their parameters)."""
        if task not in self.tasks():
            raise ValueError(f"this studio does not offer {task!r}: it offers {', '.join(self.tasks())}")
        options, seed = self.run_options(task, options), resolve_seed(seed)
        with self._lock:
            pipe = self.pipe(task)
            out = pipe.run(task, generator=torch.Generator().manual_seed(seed), progress=False,
                           callback_on_step_end=on_step, **options)
        images = out.images
        params = {key: value for key, value in options.items() if not isinstance(value, (PIL.Image.Image, list))}
        params.update(task=task, seed=seed, model=self.model_name(), size=f"{images[0].width}x{images[0].height}",
                      scheduler=options.get("scheduler") or pipe.decoder.sampler)
        return images, seed, params

    def run_options(self, task: str, options: dict) -> dict:
        """A request's options checked (check_options), with what was not given filled in as the command line
        fills it (size, steps, guidance, prior settings; a preset brings its own): what the pipeline gets."""
        options = check_options(task, options)
        spec = PROMPT_TASKS[task]
        options["width"], options["height"] = self.picture_size(task, options.get("width"), options.get("height"))
        if not options.get("preset"):  # a preset brings its own steps and guidance
            options.setdefault("num_inference_steps", self.default_steps(task))
            options.setdefault("guidance_scale", DECODER_OPTIONS["guidance_scale"])
        if spec.embeddings != "image" and not options.get("preset"):  # (a preset brings its prior steps too)
            for key, value in PRIOR_OPTIONS.items():
                if key != "prior_latents":
                    options.setdefault(key, value)
        if spec.embeddings in ("prompt", "emb2emb") and not options.get("negative_prompt"):
            options["negative_prompt"] = None
        if spec.embeddings == "image":  # variations: no prompt, no prior
            for key in ("prompt", "negative_prompt", "prior_guidance_scale", "prior_num_inference_steps"):
                options.pop(key, None)
        return options

    def finish(self, images, seed: int, params: dict) -> Result:
        """Save ``images`` as PNGs carrying the ``parameters`` chunk; the Result."""
        text = parameters_text(params)
        info = PIL.PngImagePlugin.PngInfo()
        info.add_text("parameters", text)
        folder = Path(tempfile.mkdtemp(prefix=f"{params.get('task', 'image')}-", dir=self.out_dir))
        paths = []
        for i, image in enumerate(images):
            path = folder / f"{seed}-{i}.png"
            image.save(path, pnginfo=info)
            paths.append(path)
        return Result(images, seed, text, paths)

    def inpaint(self, prompt: str, image, mask_image=None, seed=-1, mask_blur: float = 0,
                inpaint_area: str = "whole picture", padding: int = 32, outpaint_left: int = 0,
                outpaint_right: int = 0, outpaint_top: int = 0, outpaint_bottom: int = 0,
                on_step: Callable | None = None, **options) -> Result:
        """Inpainting the painters' way: ``mask_image`` (white = repaint; any picture the Python API reads)
        and/or the canvas extended by ``outpaint_*`` pixels (the new area joins the mask); "whole picture"
        or "only masked area" (a crop around the mask, ``padding`` pixels wide, inpainted at width x height,
        then scaled back); the mask feathered by ``mask_blur`` pixels for pasting; the unmasked pixels kept
        exactly."""
        checked = check_options("inpaint", dict(mask_blur=mask_blur, inpaint_area=inpaint_area, padding=padding))
        sides = [_number(f"outpaint_{side}", value, low=0, high=MAX_SIDE, integer=True)
                 for side, value in zip(OUTPAINT_SIDES, (outpaint_left, outpaint_right, outpaint_top, outpaint_bottom))]
        image = image.convert("RGB")
        if mask_image is None and not any(sides):
            raise ValueError("no mask: paint over the area to repaint, upload a mask (white = repaint) or "
                             "extend the canvas (outpainting)")
        if mask_image is not None:
            if mask_image.size != image.size:
                raise ValueError(f"the mask is {mask_image.width} x {mask_image.height} but the picture is "
                                 f"{image.width} x {image.height}: the mask must have the picture's size")
            mask = canvas.binary_mask(mask_image)
        else:
            mask = PIL.Image.new("L", image.size, 0)
        if any(sides):
            image, _ = canvas.outpaint(image, *sides)
            mask = canvas.grow_mask(mask, *sides)
        if mask.getbbox() is None:
            raise ValueError("the mask is empty: paint over the area to repaint (white = repaint)")
        original = image
        box = None
        if checked["inpaint_area"] == "only masked area":
            width = options.get("width") or self.default_size("inpaint")
            height = options.get("height") or self.default_size("inpaint")
            box = canvas.crop_box(mask, checked["padding"], aspect=width / height)
            image, mask_in = image.crop(box), mask.crop(box)
            options.update(width=width, height=height)
        else:
            mask_in = mask
        images, seed, params = self._run("inpaint", seed, on_step,
                                         dict(prompt=prompt, image=image, mask_image=mask_in, **options))
        soft = canvas.feather(mask, checked["mask_blur"])
        pictures = [canvas.paste_back(original, generated, soft, box) for generated in images]
        params.update(checked, **{f"outpaint_{side}": n for side, n in zip(OUTPAINT_SIDES, sides)})
        return self.finish(pictures, seed, params)  # (Size: what the model drew at)

    def mix(self, seed=-1, on_step: Callable | None = None, **values) -> Result:
        """The mix: ``prompt_i`` with ``prompt_weight_i`` and ``image_i`` (a picture, or None) with
        ``image_weight_i``, i = 1 .. MIX_ITEMS, the rest as ``generate``'s options; the items given (a prompt
        not empty, a picture) mixed with their weights (``Kandinsky.interpolate``). Every prompt and weight is
        kept in the picture's parameters (the pictures are not)."""
        items, weights, record = [], [], {}
        for kind in ("prompt", "image"):
            for i in range(1, MIX_ITEMS + 1):
                item, weight = values.pop(f"{kind}_{i}", None), values.pop(f"{kind}_weight_{i}", None)
                if weight is not None:
                    weight = record[f"{kind}_weight_{i}"] = _number(f"{kind}_weight_{i}", weight)
                if kind == "prompt":
                    record[f"prompt_{i}"] = item or ""
                if (bool(item) if isinstance(item, str) else item is not None):  # an empty prompt: no item
                    if weight is None:
                        raise ValueError(f"{kind}_weight_{i} must be a number, got None")
                    items.append(item)
                    weights.append(weight)
        if not items:
            raise ValueError("nothing to mix: give at least one prompt or picture, each with a weight")
        images, seed, params = self._run("interpolate", seed, on_step,
                                         dict(values, images_and_prompts=items, weights=weights))
        return self.finish(images, seed, {**params, **record})

    def look_inside(self, prompt: str, seed=-1, step: int = 0, level: str | None = None,
                    on_step: Callable | None = None, **options) -> tuple[dict, int]:
        """One text2img run (``options``: text2img's, filled in as ``generate`` fills them: the same settings
        and seed give generate's picture) recording kandinsky.research.viz.attention_pictures' pictures:
        ({"image", "trajectory", "decoder", "prior"}, the seed used). ``step``: the decoder step whose
        image-token attention is drawn (clipped to the last); ``level``: one UNet level of ``levels()`` (None
        or ALL_LEVELS: every level, one column each)."""
        from kandinsky.research.viz import attention_pictures

        if not prompt:
            raise ValueError("no prompt: type what to paint")
        options, seed = self.run_options("text2img", options), resolve_seed(seed)
        step = min(_number("step", step, low=0, integer=True), options["num_inference_steps"] - 1)
        with self._lock:
            pictures = attention_pictures(self.pipe("text2img"), prompt, steps=[step], trajectory=True,
                                          levels=None if level in (None, "", ALL_LEVELS) else [level],
                                          generator=torch.Generator().manual_seed(seed), progress=False,
                                          callback_on_step_end=on_step, **options)
        return pictures, seed

    def levels(self) -> list[str]:
        """The UNet levels look_inside can show (kandinsky.research.viz.unet_levels; loads the decoder)."""
        from kandinsky.research.viz import unet_levels

        with self._lock:
            return unet_levels(self.pipe("text2img"))

    def open(self, path, what: str = "image"):
        """An uploaded file as a picture, within this studio's pixel limit."""
        return canvas.open_upload(path, what, self.max_pixels)

