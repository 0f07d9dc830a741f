"""The generation tasks, one subcommand each (kandinsky.pipelines.tasks.PROMPT_TASKS):

    kandinsky text2img "a red cat" -o cat.png
    kandinsky img2img "a red cat" --image photo.png --strength 0.4 -o out.png
    kandinsky inpaint "a hat" --image cat.png --mask mask.png -o hat.png     (mask: white = repaint)
    kandinsky variations --image cat.png -o var.png
    kandinsky interpolate --mix "a red cat" 0.3 --mix cat.png 0.7 -o mix.png
    kandinsky controlnet "a robot" --hint depth.png -o robot.png
    kandinsky text2img "a red cat" --scheduler dpmpp_2m --steps 20 --save-steps steps.png
    kandinsky text2img --demo "a red circle on a blue background" -o out.png   (tiny trained model, offline)

--prior / --decoder take folders or hub ids (defaults: the kandinsky-community repos;
inpaint and controlnet default to the decoder-inpaint and controlnet-depth repos).
"""
from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path

from kandinsky.cli import common
from kandinsky.cli.common import InputError, at_least


def _tile(text: str):
    """--tile: auto -> None, on -> True, off -> False, N -> N pixels."""
    named = {"auto": None, "on": True, "off": False}
    if text.lower() in named:
        return named[text.lower()]
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto, on, off or a tile size in pixels") from None
    if value < 64:
        raise argparse.ArgumentTypeError(f"{value} is too small (a tile is at least 64 pixels)")
    return value


def _describe_preset(values: dict) -> str:
    cache = values["cache_interval"]
    return (f"{values['scheduler']} {values['num_inference_steps']} steps"
            + (f", cache interval {cache}" if cache > 1 else "")
            + (f", guidance interval {tuple(values['guidance_interval'])}" if values["guidance_interval"] else ""))


def describe(name: str) -> dict:
    """The task's help, description and examples, for the command table."""
    from kandinsky.pipelines.tasks import PROMPT_TASKS

    task = PROMPT_TASKS[name]
    return dict(help=task.help, description=textwrap.fill(task.description, 79),
                epilog="examples:\n" + "\n".join("  " + e for e in task.examples))


def add_arguments(parser, name: str) -> None:
    """The options every task shares, then the task's inputs."""
    from kandinsky.pipelines.tasks import INPUTS, PRESETS, PROMPT_TASKS
    from kandinsky.sampling.samplers import sampler_names

    parser.add_argument("-o", "--output", default="out.png",
                        help="output PNG (several images: out-0.png, out-1.png, ...)")
    parser.add_argument("--seed", type=common.seed, default=0, help="random seed (default 0)")
    common.add_overwrite(parser)
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="a speed / quality preset (docs/performance.md, Presets): "
                             + "; ".join(f"{k}: {_describe_preset(v)}" for k, v in PRESETS.items())
                             + ". Flags given explicitly override its values")
    parser.add_argument("--steps", type=at_least(1), default=None,
                        help="decoder steps (default 100; demos 20); see --scheduler for what a step is")
    parser.add_argument("--prior-steps", type=at_least(2), default=None, help="prior steps, at least 2 (default 25)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="decoder guidance scale (default 4; <= 1: off)")
    parser.add_argument("--cache-interval", type=at_least(1), default=None, metavar="N",
                        help="a full UNet evaluation every N; in between only the levels above --cache-level run "
                             "on the deeper levels' cached output (default 1: off)")
    parser.add_argument("--cache-level", type=at_least(1), default=None, metavar="K",
                        help="where --cache-interval cuts the UNet: resolution levels >= K are cached (default 1)")
    parser.add_argument("--guidance-interval", type=common.unit, nargs=2, default=None, metavar=("LO", "HI"),
                        help="guide only at the steps whose position in the run (0 = from noise, 1 = clean) is in "
                             "[LO, HI); elsewhere the conditional branch runs alone (default: every step)")
    parser.add_argument("--prior-guidance-scale", type=float, default=None,
                        help="prior guidance scale (default 4; <= 1: off)")
    parser.add_argument("--negative-prompt", default=None, help="what the picture should not show")
    common.add_size_arguments(parser, "the input picture's, else 512; --demo 64, the picture resized to it; "
                                      "--random-demo 256; sizes not a multiple of 64 are generated at the next "
                                      "multiple and resized to the size asked")
    parser.add_argument("--num-images", type=at_least(1), default=1, help="images per prompt (default 1)")
    parser.add_argument("--allow-many", action="store_true",
                        help="confirm a --num-images above 16 (without it such a count is refused)")
    parser.add_argument("--scheduler", type=str.lower, choices=sampler_names(), default=None, metavar="NAME",
                        help=f"decoder sampler: {', '.join(sampler_names())} (default ddpm, the checkpoint's; "
                             "docs/usage.md, Samplers: what a step is for each)")
    parser.add_argument("--save-steps", metavar="GRID.png", default=None,
                        help="also write the decoder's x0 preview at every step as one grid (steps across, "
                             "images down)")
    parser.add_argument("--revision", default=None, help="decoder hub repo revision (branch, tag or commit)")
    parser.add_argument("--prior-revision", default=None, help="prior hub repo revision")
    parser.add_argument("--offline", action="store_true",
                        help="use only the local Hugging Face cache (as HF_HUB_OFFLINE=1); no network")
    parser.add_argument("--tile", type=_tile, default=None, metavar="auto|on|off|N",
                        help="decode with MoVQ in tiles: auto (default: above 1024 x 1024 px), on, off, or a tile "
                             "size in pixels (bounded memory for large images)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet, the prior and the MoVQ decoder (slow first call, faster steps)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    common.add_pipeline_arguments(
        parser, dtype=True, offload=True, lora=True,
        demo_help=common.DEMO_HELP + "; controlnet tasks, which it has no checkpoint for, use random weights")

    task = PROMPT_TASKS[name]
    group = parser.add_argument_group(f"{name} inputs")
    if task.embeddings in ("prompt", "emb2emb"):
        group.add_argument("prompt", help="what to paint")
    if task.embeddings in ("image", "emb2emb") and "image" not in task.inputs:
        group.add_argument("--image", required=True, help="input picture (PNG, JPEG, ...)")
    if task.embeddings == "emb2emb":
        group.add_argument("--prior-strength", type=common.fraction, default=0.3,
                           help="share of the prior's steps run from the image's noised embedding (default 0.3)")
    if task.embeddings == "mix":
        group.add_argument("--mix", nargs=2, action="append", metavar=("PROMPT_OR_IMAGE", "WEIGHT"),
                           required=True, help="a prompt or an image file, and its weight (repeat)")
    for key in task.inputs:
        spec = INPUTS[key]
        if spec.kind == "number":
            group.add_argument(spec.flag, type=common.fraction, default=0.3, help=spec.help)
        else:
            group.add_argument(spec.flag, required=True, help=spec.help)


def output_paths(output: str, count: int) -> list[Path]:
    output = Path(output)
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


def read_inputs(args) -> dict:
    """The task's pictures, read before any checkpoint is built or loaded (fail fast)."""
    from kandinsky.pipelines.tasks import INPUTS, PROMPT_TASKS

    task = PROMPT_TASKS[args.command]
    inputs = {}
    if task.embeddings in ("image", "emb2emb") and "image" not in task.inputs:
        inputs["image"] = common.open_image(args.image, "--image")
    for key in task.inputs:
        spec = INPUTS[key]
        value = getattr(args, spec.flag.lstrip("-").replace("-", "_"))
        inputs[key] = value if spec.kind == "number" else common.open_image(value, spec.flag)
    if task.embeddings == "mix":
        items, weights = [], []
        for item, weight in args.mix:
            # an image file (a missing one is an error, not a prompt)
            items.append(common.open_image(item, "--mix") if common.is_image_path(item) else item)
            try:
                weights.append(float(weight))
            except ValueError:
                raise InputError(f"--mix {item!r} {weight!r}: the weight must be a number") from None
        inputs.update(images_and_prompts=items, weights=weights)
    return inputs


def run(args) -> int:
    import torch

    from kandinsky.pipelines.limits import check_count
    from kandinsky.pipelines.tasks import PROMPT_TASKS

    name, task = args.command, PROMPT_TASKS[args.command]
    check_count(args.num_images, args.allow_many)  # a runaway count: refused before anything else
    paths = output_paths(args.output, args.num_images)
    inputs = read_inputs(args)
    common.check_outputs(paths + ([Path(args.save_steps)] if args.save_steps else []), args.overwrite, image=True)
    ignored = [flag for flag, value in (("--negative-prompt", args.negative_prompt),
                                        ("--prior-steps", args.prior_steps),
                                        ("--prior-guidance-scale", args.prior_guidance_scale)) if value is not None]
    if task.embeddings == "image" and ignored:  # variations: no prompt, no prior run
        route = ("; for a negative prompt, `kandinsky interpolate --mix IMAGE 1 --negative-prompt TEXT` decodes the "
                 "same embedding guided away from TEXT's" if "--negative-prompt" in ignored else "")
        raise InputError(f"{name} does not use {', '.join(ignored)} (the picture's CLIP embedding is decoded "
                         f"directly, without the prior); leave it out{route}.")
    common.device(args.device)  # refused before the demo checkpoints are built

    trained = common.shapes_model(args, name)
    default_steps = common.default_size_and_steps(args, name)[1]
    preset = args.preset
    steps = args.steps if args.steps is not None or preset else default_steps
    width, height = common.picture_size(args, name, *common.width_height(args), "image" in inputs or "hint" in inputs)
    prior_steps = 25 if args.prior_steps is None and not preset else args.prior_steps
    prior_guidance = 4.0 if args.prior_guidance_scale is None else args.prior_guidance_scale

    first = inputs.get("image", inputs.get("hint"))  # image tasks default to the picture's size
    size = (args.num_images, height or first.size[1], width or first.size[0])
    start = time.perf_counter()
    with common.pipeline(args, name, size=size) as (pipe, folders):
        if args.compile:
            pipe.compile()
        kwargs = dict(inputs, height=height, width=width, generator=torch.Generator().manual_seed(args.seed),
                      progress=not args.no_progress, num_images_per_prompt=args.num_images,
                      return_trajectory=args.save_steps is not None, tile=args.tile, preset=preset)
        # only what was given (or, without a preset, the CLI's defaults): a preset fills the rest
        given = dict(num_inference_steps=steps, guidance_scale=args.guidance_scale, cache_interval=args.cache_interval,
                     cache_level=args.cache_level, guidance_interval=args.guidance_interval,
                     scheduler=args.scheduler if args.scheduler or preset else "ddpm")
        if task.embeddings in ("prompt", "mix", "emb2emb"):
            given.update(prior_num_inference_steps=prior_steps, prior_guidance_scale=prior_guidance)
        kwargs.update({key: value for key, value in given.items() if value is not None})
        if task.embeddings in ("prompt", "emb2emb"):
            kwargs.update(prompt=args.prompt, negative_prompt=args.negative_prompt)
        if task.embeddings == "mix":
            kwargs.update(negative_prompt=args.negative_prompt or "")
        if task.embeddings == "emb2emb":
            kwargs.update(prior_strength=args.prior_strength)
        out = pipe.run(name, **kwargs)
        if args.save_steps is not None:
            from kandinsky.sampling.trajectory import save_x0_grid

            save_x0_grid(out.trajectory, pipe.decoder.movq, args.save_steps)

    paths, problem = common.save(out.images, paths)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    label = " (tiny shapes model)" if trained else " (RANDOM demo weights)" if folders["random"] else ""
    print(f"wrote {', '.join(map(str, paths))}{label} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0
