"""The ``kandinsky`` command line.

    kandinsky text2img "a red cat" -o cat.png
    kandinsky img2img "a red cat" --image photo.png --strength 0.4 -o out.png
    kandinsky inpaint "a hat" --image cat.png --mask mask.png -o hat.png     (mask: white = repaint)
    kandinsky variations --image cat.png -o var.png
    kandinsky interpolate --mix "a red cat" 0.3 --mix cat.png 0.7 -o mix.png
    kandinsky controlnet "a robot" --hint depth.png -o robot.png
    kandinsky text2img --demo "a red cat" -o out.png      (tiny random weights, offline, seconds)

--prior / --decoder take folders or hub ids (defaults: the kandinsky-community repos;
inpaint and controlnet default to the decoder-inpaint and controlnet-depth repos).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DECODERS = {
    "inpaint": "kandinsky-community/kandinsky-2-2-decoder-inpaint",
    "controlnet": "kandinsky-community/kandinsky-2-2-controlnet-depth",
}
DEMO_REPOS = {"inpaint": "decoder-inpaint", "controlnet": "controlnet-depth"}
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-o", "--output", default="out.png", help="output PNG (several images: out-0.png, out-1.png, ...)")
    common.add_argument("--prior", help="prior folder or hub id (default: kandinsky-community/kandinsky-2-2-prior)")
    common.add_argument("--decoder", help="decoder folder or hub id (default: the kandinsky-community repo for the task)")
    common.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    common.add_argument("--steps", type=int, default=None, help="decoder steps (default 100; demo 20)")
    common.add_argument("--prior-steps", type=int, default=25, help="prior steps (default 25)")
    common.add_argument("--guidance", type=float, default=4.0, help="decoder guidance scale (default 4)")
    common.add_argument("--prior-guidance", type=float, default=4.0, help="prior guidance scale (default 4)")
    common.add_argument("--negative", default=None, help="negative prompt")
    common.add_argument("--width", type=int, default=None, help="image width (default 512; demo 256)")
    common.add_argument("--height", type=int, default=None, help="image height (default 512; demo 256)")
    common.add_argument("--num-images", type=int, default=1, help="images per prompt")
    common.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    common.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    common.add_argument("--scheduler", choices=("ddpm", "ddim"), default="ddpm", help="decoder sampler")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")
    common.add_argument("--demo", action="store_true",
                        help="build tiny RANDOM-weight checkpoints on the fly and run offline (the image is noise)")

    parser = argparse.ArgumentParser(prog="kandinsky", description="Kandinsky 2.2 image generation.")
    tasks = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    p = tasks.add_parser("text2img", parents=[common], help="image from a prompt")
    p.add_argument("prompt")
    p = tasks.add_parser("img2img", parents=[common], help="re-paint an image following a prompt")
    p.add_argument("prompt")
    p.add_argument("--image", required=True)
    p.add_argument("--strength", type=float, default=0.3)
    p = tasks.add_parser("inpaint", parents=[common], help="paint a prompt into the white area of a mask")
    p.add_argument("prompt")
    p.add_argument("--image", required=True)
    p.add_argument("--mask", required=True, help="white = repaint, black = keep")
    p = tasks.add_parser("variations", parents=[common], help="variations of an image")
    p.add_argument("--image", required=True)
    p = tasks.add_parser("interpolate", parents=[common], help="mix prompts and images")
    p.add_argument("--mix", nargs=2, action="append", metavar=("PROMPT_OR_IMAGE", "WEIGHT"), required=True,
                   help="a prompt or an image file, and its weight (repeat)")
    p = tasks.add_parser("controlnet", parents=[common], help="image from a prompt and a depth hint")
    p.add_argument("prompt")
    p.add_argument("--hint", required=True, help="depth map image")
    return parser


class InputError(ValueError):
    """A bad command-line input (missing image file, unknown output format)."""


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _open_image(path: str, mode: str = "RGB"):
    from PIL import Image

    if not Path(path).is_file():
        raise InputError(f"no such image file: {path!r}")
    try:
        return Image.open(path).convert(mode)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read image {path!r}: {e}") from None


def _read_inputs(args) -> dict:
    """The task's images, read before any checkpoint is built or loaded (fail fast)."""
    from PIL import Image

    if Path(args.output).suffix.lower() not in Image.registered_extensions():
        raise InputError(f"cannot tell the image format of the output {args.output!r}: name it e.g. out.png")
    if args.task in ("img2img", "inpaint", "variations"):
        inputs = {"image": _open_image(args.image)}
        if args.task == "inpaint":
            inputs["mask"] = _open_image(args.mask, "L")
        return inputs
    if args.task == "controlnet":
        return {"hint": _open_image(args.hint)}
    if args.task == "interpolate":
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
        return {"items": items, "weights": weights}
    return {}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        inputs = _read_inputs(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import torch

    from kandinsky.hub import DEFAULT_DECODER, DEFAULT_PRIOR
    from kandinsky.pipelines.combined import Kandinsky

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPES[args.dtype])
    steps = args.steps or (20 if args.demo else 100)
    width = args.width or (256 if args.demo else 512)
    height = args.height or (256 if args.demo else 512)

    tmp = None
    if args.demo:
        from kandinsky.demo import build_demo_checkpoints

        tmp = tempfile.TemporaryDirectory(prefix="kandinsky-demo-")
        print("DEMO: building tiny checkpoints with RANDOM weights (the image will be noise) ...", file=sys.stderr)
        folders = build_demo_checkpoints(tmp.name, seed=args.seed)
        prior = args.prior or folders["prior"]
        decoder = args.decoder or folders[DEMO_REPOS.get(args.task, "decoder")]
    else:
        prior = args.prior or DEFAULT_PRIOR
        decoder = args.decoder or DEFAULT_DECODERS.get(args.task, DEFAULT_DECODER)

    start = time.perf_counter()
    try:
        pipe = Kandinsky.from_pretrained(decoder, prior=prior, dtype=dtype, device=device,
                                         scheduler=None if args.scheduler == "ddpm" else args.scheduler)
        generator = torch.Generator().manual_seed(args.seed)
        shared = dict(num_inference_steps=steps, guidance_scale=args.guidance, height=height, width=width,
                      generator=generator, progress=not args.no_progress)
        prior_args = dict(prior_num_inference_steps=args.prior_steps, prior_guidance_scale=args.prior_guidance,
                          num_images_per_prompt=args.num_images)
        if args.task == "text2img":
            out = pipe.text2img(args.prompt, negative_prompt=args.negative, **prior_args, **shared)
        elif args.task == "img2img":
            out = pipe.img2img(args.prompt, inputs["image"], negative_prompt=args.negative,
                               strength=args.strength, **prior_args, **shared)
        elif args.task == "inpaint":
            out = pipe.inpaint(args.prompt, inputs["image"], inputs["mask"], negative_prompt=args.negative,
                               **prior_args, **shared)
        elif args.task == "variations":
            out = pipe.variations(inputs["image"], num_images_per_prompt=args.num_images, **shared)
        elif args.task == "interpolate":
            out = pipe.interpolate(inputs["items"], inputs["weights"], negative_prompt=args.negative or "",
                                   **prior_args, **shared)
        else:  # controlnet
            out = pipe.controlnet(args.prompt, inputs["hint"], negative_prompt=args.negative,
                                  **prior_args, **shared)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if tmp is not None:
            tmp.cleanup()

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    paths = [output] if len(out.images) == 1 else [
        output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(len(out.images))
    ]
    for image, path in zip(out.images, paths):
        image.save(path)
    label = " (RANDOM demo weights)" if args.demo else ""
    print(f"wrote {', '.join(map(str, paths))}{label} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
