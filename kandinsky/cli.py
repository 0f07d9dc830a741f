"""The ``kandinsky`` command line.

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
import tempfile
import textwrap
import time
from pathlib import Path

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _at_least(minimum: int):
    """An argparse type: an integer >= minimum (checked before anything is loaded)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is too small (at least {minimum})")
        return value

    return parse


def _seed(text: str) -> int:
    """An integer torch.Generator.manual_seed takes: -2**63 .. 2**64 - 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not -(2**63) <= value < 2**64:
        raise argparse.ArgumentTypeError(f"{value} is out of range (a seed is a 64-bit integer: 0 .. 2**64 - 1)")
    return value


def _output_paths(output: str, count: int) -> list[Path]:
    output = Path(output)
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


def _check_writable(paths, overwrite: bool) -> None:
    """Every output can be written (checked before any weights are loaded)."""
    import os

    for path in paths:
        path = Path(path)
        if path.is_dir():
            raise InputError(f"the output {str(path)!r} is a folder; name a file, e.g. {path / 'out.png'}")
        if path.exists() and not overwrite:
            raise InputError(f"{str(path)!r} exists; pass --overwrite to replace it, or choose another -o")
        ancestor = path.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise InputError(f"cannot write {str(path)!r}: {str(ancestor)!r} is a file, not a folder")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise InputError(f"cannot write {str(path)!r}: no permission to write in {str(ancestor)!r}")


def _save(images, paths) -> tuple[list[Path], str | None]:
    """Save; if that fails, save into a fresh temporary folder instead and say why."""
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
        for image, path in zip(images, paths):
            image.save(path)
        return paths, None
    except (OSError, ValueError) as e:
        rescue = Path(tempfile.mkdtemp(prefix="kandinsky-rescued-"))
        saved = [rescue / path.name for path in paths]
        for image, path in zip(images, saved):
            image.save(path)
        return saved, f"could not write {paths[0]} ({e}); the images were saved to {rescue} instead"


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


def _strength(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 1]")
    return value


def _parser() -> argparse.ArgumentParser:
    from kandinsky.pipelines.tasks import INPUTS, PROMPT_TASKS
    from kandinsky.lora import add_lora_argument
    from kandinsky.sampling.samplers import sampler_names

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-o", "--output", default="out.png", help="output PNG (several images: out-0.png, out-1.png, ...)")
    common.add_argument("--prior", help="prior folder or hub id (default: kandinsky-community/kandinsky-2-2-prior)")
    common.add_argument("--decoder", help="decoder folder or hub id (default: the kandinsky-community repo for the task)")
    common.add_argument("--seed", type=_seed, default=0, help="random seed (default 0)")
    common.add_argument("--overwrite", action="store_true",
                        help="replace output files that exist (without it an existing file is never overwritten: "
                             "the command stops before any work)")
    common.add_argument("--steps", type=_at_least(1), default=None,
                        help="decoder steps (default 100; demos 20); see --scheduler for what a step is")
    common.add_argument("--prior-steps", type=_at_least(2), default=None, help="prior steps, at least 2 (default 25)")
    common.add_argument("--guidance", type=float, default=4.0, help="decoder guidance scale (default 4; <= 1: off)")
    common.add_argument("--prior-guidance", type=float, default=None, help="prior guidance scale (default 4; <= 1: off)")
    common.add_argument("--negative", default=None, help="negative prompt")
    common.add_argument("--width", type=_at_least(1), default=None,
                        help="image width (default: the input picture's, else 512; --demo 64, --random-demo 256); sizes not a "
                             "multiple of 64 are generated at the next multiple and resized to the size asked")
    common.add_argument("--height", type=_at_least(1), default=None, help="image height (as --width)")
    common.add_argument("--num-images", type=_at_least(1), default=1, help="images per prompt (default 1)")
    common.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="weights and compute precision (default fp32; fp16 is for GPUs, slow on a CPU)")
    common.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    common.add_argument("--scheduler", type=str.lower, choices=sampler_names(), default="ddpm", metavar="NAME",
                        help=f"decoder sampler: {', '.join(sampler_names())} (default ddpm, the checkpoint's; "
                             "docs/usage.md, Samplers: what a step is for each)")
    common.add_argument("--save-steps", metavar="GRID.png", default=None,
                        help="also write the decoder's x0 preview at every step as one grid (steps across, images down)")
    common.add_argument("--revision", default=None, help="decoder hub repo revision (branch, tag or commit)")
    common.add_argument("--prior-revision", default=None, help="prior hub repo revision")
    common.add_argument("--offline", action="store_true",
                        help="use only the local Hugging Face cache (as HF_HUB_OFFLINE=1); no network")
    add_lora_argument(common)
    common.add_argument("--tile", type=_tile, default=None, metavar="auto|on|off|N",
                        help="decode with MoVQ in tiles: auto (default: above 1024 x 1024 px), on, off, or a tile "
                             "size in pixels (bounded memory for large images)")
    common.add_argument("--offload", choices=("model", "sequential"), default=None,
                        help="low memory: keep the weights on the CPU and move each component (model) or each layer "
                             "(sequential) to --device only while it runs")
    common.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet, the prior and the MoVQ decoder (slow first call, faster steps)")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo = common.add_mutually_exclusive_group()
    demo.add_argument("--demo", action="store_true",
                      help="the tiny model trained on procedural shapes that ships with the package (offline; "
                           "prompts like 'a large red circle on the left on a blue background', 64 x 64); "
                           "controlnet tasks, which it has no checkpoint for, use random weights")
    demo.add_argument("--random-demo", action="store_true",
                      help="tiny RANDOM-weight checkpoints built on the fly (offline; the picture is noise)")

    parser = argparse.ArgumentParser(
        prog="kandinsky", description="Kandinsky 2.2 image generation. `kandinsky TASK --help` for a task's options.",
        epilog="other commands (`kandinsky COMMAND --help`):\n"
        + "\n".join(f"  {name:<11} {help_}" for name, (help_, _) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tasks = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    for name, task in PROMPT_TASKS.items():
        sub = tasks.add_parser(
            name, parents=[common], help=task.help, description=textwrap.fill(task.description, 79),
            epilog="examples:\n" + "\n".join("  " + e for e in task.examples),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        group = sub.add_argument_group(f"{name} inputs")
        if task.embeddings in ("prompt", "emb2emb"):
            group.add_argument("prompt", help="what to paint")
        if task.embeddings in ("image", "emb2emb") and "image" not in task.inputs:
            group.add_argument("--image", required=True, help="input picture (PNG, JPEG, ...)")
        if task.embeddings == "emb2emb":
            group.add_argument("--prior-strength", type=_strength, default=0.3,
                               help="share of the prior's steps run from the image's noised embedding (default 0.3)")
        if task.embeddings == "mix":
            group.add_argument("--mix", nargs=2, action="append", metavar=("PROMPT_OR_IMAGE", "WEIGHT"),
                               required=True, help="a prompt or an image file, and its weight (repeat)")
        for key in task.inputs:
            spec = INPUTS[key]
            if spec.kind == "number":
                group.add_argument(spec.flag, type=_strength, default=0.3, help=spec.help)
            else:
                group.add_argument(spec.flag, required=True, help=spec.help)
    return parser


class InputError(ValueError):
    """A bad command-line input (missing image file, unknown output format)."""


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _open_image(path: str):
    """The picture as stored (any mode: the pipelines convert it as the Python API does),
    turned upright by its EXIF orientation as image viewers show it."""
    from PIL import Image, ImageOps

    if not Path(path).is_file():
        raise InputError(f"no such image file: {path!r}")
    try:
        image = Image.open(path)
        image.load()
        return ImageOps.exif_transpose(image)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read image {path!r}: {e}") from None


def _read_inputs(args) -> dict:
    """The task's pictures, read before any checkpoint is built or loaded (fail fast)."""
    from PIL import Image

    from kandinsky.pipelines.tasks import INPUTS, PROMPT_TASKS

    for path in filter(None, (args.output, args.save_steps)):
        if Path(path).suffix.lower() not in Image.registered_extensions():
            raise InputError(f"cannot tell the image format of the output {path!r}: name it e.g. out.png")
    task = PROMPT_TASKS[args.task]
    inputs = {}
    if task.embeddings in ("image", "emb2emb") and "image" not in task.inputs:
        inputs["image"] = _open_image(args.image)
    for key in task.inputs:
        spec = INPUTS[key]
        value = getattr(args, spec.flag.lstrip("-").replace("-", "_"))
        inputs[key] = value if spec.kind == "number" else _open_image(value)
    if task.embeddings == "mix":
        items, weights = [], []
        for item, weight in args.mix:
            if Path(item).is_file() or Path(item).suffix.lower() in IMAGE_SUFFIXES:
                items.append(_open_image(item))  # an image file (a missing one is an error, not a prompt)
            else:
                items.append(item)
            try:
                weights.append(float(weight))
            except ValueError:
                raise InputError(f"--mix {item!r} {weight!r}: the weight must be a number") from None
        inputs.update(images_and_prompts=items, weights=weights)
    return inputs


def _device(name: str | None):
    """--device as a torch.device; one this machine does not have is an input error."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, mps, ...)") from None
    backend = {"cuda": torch.cuda, "mps": getattr(torch.backends, "mps", None)}.get(device.type)
    if backend is not None and not backend.is_available():
        raise InputError(f"--device {name!r}: this machine (or this torch build) has no {device.type} device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"--device {name!r}: there are {torch.cuda.device_count()} cuda device(s)")
    return device


# Commands that live in their own modules, each with ``main(argv) -> int``: `kandinsky NAME ...`
# runs ``module.main(rest_of_argv)``. (help line, module)
COMMANDS = {
    "train": ("train a prior, decoder or inpainting UNet (full or LoRA)", "kandinsky.training.cli"),
    "train-demo": ("reproduce the shipped tiny demo model from scratch", "kandinsky.data.train_demo"),
    "eval": ("evaluate the tiny shapes model (accuracy per attribute)", "kandinsky.data.evaluate"),
    "batch": ("generate many prompts (resumable, torchrun-aware)", "kandinsky.batch"),
    "inspect": ("module tree, parameter counts and output shapes", "kandinsky.research.inspect"),
    "attention": ("attention maps as pictures", "kandinsky.research.viz"),
    "score": ("CLIP similarity of images and prompts", "kandinsky.research.embeddings"),
    "mix": ("embedding arithmetic and slerp, decoded", "kandinsky.research.embeddings_cli"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        import importlib

        module = importlib.import_module(COMMANDS[argv[0]][1])
        return module.main(argv[1:])
    args = _parser().parse_args(argv)
    with _plain_warnings():
        return _generate(args)


class _plain_warnings:
    """Warnings printed as `warning: ...` (not as a line of the console-script wrapper)."""

    def __enter__(self):
        import warnings

        self._show = warnings.showwarning
        warnings.showwarning = lambda message, category, *a, **k: print(f"warning: {message}", file=sys.stderr)

    def __exit__(self, *exc):
        import warnings

        warnings.showwarning = self._show


def _generate(args) -> int:
    from kandinsky.pipelines.tasks import PROMPT_TASKS

    task = PROMPT_TASKS[args.task]
    count = args.num_images
    paths = _output_paths(args.output, count)
    try:
        inputs = _read_inputs(args)
        _check_writable(paths + ([Path(args.save_steps)] if args.save_steps else []), args.overwrite)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import torch

    from kandinsky.lora import apply_lora_args
    from kandinsky.pipelines.combined import Kandinsky
    from kandinsky.pipelines.tasks import CHECKPOINTS, PRIOR_CHECKPOINT, checkpoint_for

    try:
        device = _device(args.device)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dtype = getattr(torch, DTYPES[args.dtype])

    trained = args.demo and checkpoint_for(args.task) != "controlnet"  # the shapes model has no ControlNet
    random_weights = args.random_demo or (args.demo and not trained)
    demo_size = 64 if trained else 256
    steps = args.steps if args.steps is not None else (20 if args.demo or args.random_demo else 100)
    picture = "image" in inputs or "hint" in inputs  # image tasks default to the picture's size
    width = args.width if args.width is not None or picture else (demo_size if args.demo or args.random_demo else 512)
    height = args.height if args.height is not None or picture else (demo_size if args.demo or args.random_demo else 512)

    tmp = None
    if args.demo or args.random_demo:
        from kandinsky.demo import demo_checkpoints

        try:
            folders, tmp, message = demo_checkpoints(random=random_weights, seed=args.seed)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        fallback = " (the shapes model has no ControlNet: random weights)" if args.demo and random_weights else ""
        print(message + fallback, file=sys.stderr)
        prior = args.prior or folders["prior"]
        decoder = args.decoder or folders[checkpoint_for(args.task)]
    else:
        prior = args.prior or PRIOR_CHECKPOINT
        decoder = args.decoder or CHECKPOINTS[checkpoint_for(args.task)]

    start = time.perf_counter()
    ignored = [flag for flag, value in (("--negative", args.negative), ("--prior-steps", args.prior_steps),
                                        ("--prior-guidance", args.prior_guidance)) if value is not None]
    if task.embeddings == "image" and ignored:  # variations: no prompt, no prior run
        print(f"error: {args.task} does not use {', '.join(ignored)} (the picture's CLIP embedding is decoded "
              "directly, without the prior); leave it out.", file=sys.stderr)
        return 2
    args.prior_steps = 25 if args.prior_steps is None else args.prior_steps
    args.prior_guidance = 4.0 if args.prior_guidance is None else args.prior_guidance
    try:
        pipe = Kandinsky.from_pretrained(decoder, prior=prior, dtype=dtype, device=None if args.offload else device,
                                         scheduler=args.scheduler,
                                         revision=args.revision, prior_revision=args.prior_revision,
                                         local_files_only=args.offline)
        needed = checkpoint_for(args.task)
        if pipe.decoder.kind != needed:
            raise ValueError(f"--decoder {decoder} is {('an ' if pipe.decoder.kind[0] in 'aeiou' else 'a ')}"
                             f"{pipe.decoder.kind} checkpoint, which cannot run {args.task} (it runs "
                             f"{', '.join(pipe.decoder.tasks)}); pass --decoder {CHECKPOINTS[needed]} or a local "
                             f"copy of it, or leave --decoder out.")
        apply_lora_args(pipe, args.lora)  # adapters first: offload hooks the layers as they then are
        if args.offload:
            from kandinsky.offload import enable_offload

            enable_offload(pipe, mode=args.offload, device=device)
        if args.compile:
            pipe.compile()
        generator = torch.Generator().manual_seed(args.seed)
        kwargs = dict(inputs, num_inference_steps=steps, guidance_scale=args.guidance, height=height, width=width,
                      generator=generator, progress=not args.no_progress, num_images_per_prompt=args.num_images,
                      return_trajectory=args.save_steps is not None, tile=args.tile)
        if task.embeddings in ("prompt", "mix", "emb2emb"):
            kwargs.update(prior_num_inference_steps=args.prior_steps, prior_guidance_scale=args.prior_guidance)
        if task.embeddings in ("prompt", "emb2emb"):
            kwargs.update(prompt=args.prompt, negative_prompt=args.negative)
        if task.embeddings == "mix":
            kwargs.update(negative_prompt=args.negative or "")
        if task.embeddings == "emb2emb":
            kwargs.update(prior_strength=args.prior_strength)
        out = pipe.run(args.task, **kwargs)
        if args.save_steps is not None:
            from kandinsky.sampling.trajectory import save_x0_grid

            save_x0_grid(out.trajectory, pipe.decoder.movq, args.save_steps)
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if tmp is not None:
            tmp.cleanup()

    paths, problem = _save(out.images, paths)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    label = " (tiny shapes model)" if trained else " (RANDOM demo weights)" if random_weights else ""
    print(f"wrote {', '.join(map(str, paths))}{label} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
