"""The research commands (kandinsky.research does the work):

    kandinsky inspect unet --size 768x768 --depth 2          module tree, parameters, output shapes
    kandinsky inspect unet --demo                            the same for the shipped tiny shapes model
    kandinsky attention --demo "a red circle" -o attn.png     attention maps as pictures
    kandinsky score cat.png "a cat" "a dog"                   CLIP similarity
    kandinsky mix cat.png dog.png --slerp 0,0.5,1 -o mix.png  embedding arithmetic and slerp, decoded
    kandinsky routes --demo "a red circle" "a green circle"   where a concept enters the decoder (heat maps)
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from kandinsky.cli import common


# ----------------------------------------------------------------------------- inspect
INSPECT_DESCRIPTION = ("Module tree, parameter counts and output shapes of a component, on the meta device "
                       "(real configs shipped with kandinsky, or --checkpoint).")
INSPECT_EXAMPLES = ("examples:\n  kandinsky inspect unet --size 768x768\n  kandinsky inspect prior --depth 1\n"
                    "  kandinsky inspect movq --checkpoint ./kandinsky-2-2-decoder --format markdown")


def add_inspect_arguments(parser) -> None:
    from kandinsky.research.inspect import COMPONENTS

    parser.add_argument("component", choices=list(COMPONENTS), metavar="COMPONENT",
                        help="one of: " + ", ".join(COMPONENTS))
    common.add_size_arguments(parser, "512; --demo 64; a multiple of 64")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="a checkpoint folder (or component folder) whose config.json to read")
    source.add_argument("--demo", action="store_true",
                        help="the shipped tiny shapes model's configs (kandinsky/demo_weights; it has no ControlNet)")
    parser.add_argument("--depth", type=int, default=2, help="levels of the tree to show (default 2; 0 = all)")
    parser.add_argument("--batch", type=int, default=1, help="batch size of the shapes (default 1)")
    parser.add_argument("--format", choices=["text", "markdown"], default="text",
                        help="a plain-text tree (default) or a markdown table")


def _config_for(component: str, checkpoint: str | None) -> tuple[dict, str]:
    """The component's config.json: shipped, or read from --checkpoint (a checkpoint, component folder or
    shipped checkpoint name). -> (config, where it came from)."""
    from kandinsky.research.inspect import COMPONENTS, CONFIGS, shipped_config

    if checkpoint is None:
        c, f = COMPONENTS[component]
        return shipped_config(component), f"shipped config {c}/{f}"
    folder = Path(checkpoint)
    if not folder.exists() and (CONFIGS / checkpoint).is_dir():  # a shipped checkpoint by name
        folder = CONFIGS / checkpoint
    sub = COMPONENTS[component][1]
    for candidate in (folder / sub, folder):
        if (candidate / "config.json").is_file():
            return json.loads((candidate / "config.json").read_text()), str(candidate)
    raise FileNotFoundError(f"--checkpoint {checkpoint}: no {sub}/config.json or config.json there; pass a "
                            f"checkpoint folder holding {sub}/ or the component folder itself")


def _demo_folder(component: str) -> str:
    """The shipped shapes model's folder holding ``component`` (inspect --demo)."""
    from kandinsky.demo import demo_folders
    from kandinsky.pipelines.tasks import CHECKPOINTS, PRIOR_CHECKPOINT
    from kandinsky.research.inspect import COMPONENTS

    kinds = {repo.split("/")[-1]: kind for kind, repo in {"prior": PRIOR_CHECKPOINT, **CHECKPOINTS}.items()}
    kind = kinds[COMPONENTS[component][0]]
    folders = demo_folders()
    if kind not in folders:
        raise common.InputError(f"--demo: the shapes model has no {kind} checkpoint; inspect {component} without "
                                "--demo (the shipped real config) or with --checkpoint")
    return str(folders[kind])


def run_inspect(args) -> int:
    from kandinsky.research.inspect import format_markdown, format_text, meta_model, parse_size, tree

    width, height = common.width_height(args)
    default = 64 if args.demo else 512  # the shapes model draws at 64 px
    size = parse_size((width or height or default, height or width or default))
    if args.batch < 1:
        raise common.InputError(f"--batch must be >= 1, got {args.batch}")
    config, source = _config_for(args.component, _demo_folder(args.component) if args.demo else args.checkpoint)
    model = meta_model(config)
    rows = tree(model, size, args.depth or None, args.batch)
    fmt = format_markdown if args.format == "markdown" else format_text
    print(f"# {args.component} ({type(model).__name__}) from {source}, images {size[0]}x{size[1]}\n")
    print(fmt(rows))
    return 0


# ----------------------------------------------------------------------------- attention
ATTENTION_DESCRIPTION = ("Attention as pictures: where the decoder looks at the image tokens (per UNet level, at "
                         "chosen steps, over the generated image) and which words the prior's output token reads.")
ATTENTION_EXAMPLES = ('examples:\n  kandinsky attention --demo "a red circle on a blue background" -o attn.png\n'
                      '  kandinsky attention "a red cat, 4k photo" --steps 50 --at 0,25,49 -o attn.png')


def _steps(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--at must be comma-separated step indices like 0,10,19, got {text!r}")


def add_attention_arguments(parser) -> None:
    parser.add_argument("prompt", help="what to paint")
    parser.add_argument("-o", "--output", default="attention.png",
                        help="decoder grid PNG (default attention.png); the prior's words go to "
                             "<stem>-words.png, the image to <stem>-image.png, the x0 grid to <stem>-x0.png")
    common.add_overwrite(parser)
    common.add_pipeline_arguments(parser, device="cpu")
    parser.add_argument("--steps", type=int, default=None,
                        help="decoder steps (default 50; --demo 20, --random-demo 6)")
    parser.add_argument("--prior-steps", type=int, default=25, help="prior steps (default 25)")
    parser.add_argument("--at", type=_steps, default=None, help="decoder steps to show, e.g. 0,10,19 "
                        "(default first, middle, last)")
    common.add_size_arguments(parser, "512; --demo 64, --random-demo 128; a multiple of 64")
    parser.add_argument("--seed", type=common.seed, default=0, help="random seed (default 0)")


def _png(output: str) -> Path:
    """-o: a .png path (its folder is checked by common.check_outputs, and made when missing)."""
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise common.InputError(f"-o must be a .png path, got {output}")
    return output


def _size(args, default: int) -> tuple[int, int]:
    """(width, height): --width / --height / --size (a missing side: the other, else ``default``), multiples
    of 64."""
    from kandinsky.research.inspect import parse_size

    width, height = common.width_height(args)
    return parse_size((width or height or default, height or width or default))


def _saved(pictures, paths) -> int:
    """Save (common.save: rescued, never lost) and say where: -> the exit status (1: saved elsewhere)."""
    import sys

    saved, problem = common.save(pictures, paths)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    for path in saved:
        print(f"wrote {path}")
    return 0


def run_attention(args) -> int:
    import torch

    from kandinsky.research.viz import attention_pictures

    steps = args.steps if args.steps is not None else (20 if args.demo else 6 if args.random_demo else 50)
    if steps < 1 or args.prior_steps < 1:
        raise common.InputError(f"--steps and --prior-steps must be >= 1, got {steps}, {args.prior_steps}")
    width, height = _size(args, 64 if args.demo else 128 if args.random_demo else 512)
    output = _png(args.output)
    if args.at is not None and any(not 0 <= s < steps for s in args.at):
        raise common.InputError(f"--at steps must be in [0, {steps - 1}] for --steps {steps}, got {args.at}")
    paths = {"decoder": output, "prior": output.with_name(output.stem + "-words.png"),
             "image": output.with_name(output.stem + "-image.png"),
             "trajectory": output.with_name(output.stem + "-x0.png")}
    common.check_outputs(paths.values(), args.overwrite)
    with common.pipeline(args, device_default="cpu") as (pipe, _):
        pictures = attention_pictures(
            pipe, args.prompt, steps=args.at, trajectory=True, num_inference_steps=steps,
            prior_num_inference_steps=args.prior_steps, height=height, width=width,
            generator=torch.Generator().manual_seed(args.seed), progress=False)
    return _saved([pictures[key] for key in paths], paths.values())


# ----------------------------------------------------------------------------- score
SCORE_DESCRIPTION = ("CLIP cosine similarity (bigG towers of a prior checkpoint): text-image for every image and "
                     "prompt, image-image when several images are given. Arguments ending in an image suffix "
                     "(.png, .jpg, .jpeg, .webp, ...: kandinsky.research.embeddings.IMAGE_SUFFIXES) are images, the "
                     "others prompts.")


SCORE_EXAMPLES = ('examples:\n  kandinsky score cat.png "a cat" "a dog"\n'
                  "  kandinsky score a.png b.png c.png --json sims.json")


def add_score_arguments(parser) -> None:
    parser.add_argument("items", nargs="+", metavar="IMAGE_OR_PROMPT",
                        help="image files (by their suffix: .png, .jpg, ...) and prompts, in any order")
    common.add_pipeline_arguments(parser, decoder=False, device="cpu")
    parser.add_argument("--json", help="also write the matrices to this JSON file")
    common.add_overwrite(parser)


def run_score(args) -> int:
    from kandinsky.hub import resolve
    from kandinsky.pipelines.prior import PriorPipeline
    from kandinsky.research.embeddings import format_matrix, is_image_path, similarity

    images = [x for x in args.items if is_image_path(x)]
    prompts = [x for x in args.items if not is_image_path(x)]
    missing = [x for x in images if not Path(x).is_file()]
    if missing:
        raise common.InputError(f"no such image file: {', '.join(missing)}")
    if not images:
        raise common.InputError("give at least one image (IMAGE_OR_PROMPT arguments ending in .png, .jpg, ...)")
    if args.json:
        common.check_outputs([args.json], args.overwrite, flag="--json")
    where = common.device(args.device, "cpu")
    with common.checkpoints(args, weights_seed=0) as folders:
        prior = PriorPipeline.from_pretrained(resolve(folders["prior"], "prior checkpoint"), device=where)
    common.keep_threads(prior.threads())  # its CLIP towers' calls (kandinsky.threads)
    sims = similarity(prior, images, prompts)
    if "text" in sims:
        print("text-image cosine (rows: images, columns: prompts)")
        print(format_matrix(sims["text"], images, prompts))
    if len(images) > 1:
        print("\nimage-image cosine")
        print(format_matrix(sims["image"], images, images))
    if args.json:
        data = {"images": images, "prompts": prompts, **{k: v.tolist() for k, v in sims.items()}}
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


# ----------------------------------------------------------------------------- mix
MIX_DESCRIPTION = ("Embedding arithmetic and spherical interpolation, painted by the decoder. Items are images "
                   "(paths ending in .png, .jpg, ...) or prompts (turned into image embeddings by the prior).")
MIX_EXAMPLES = ('examples:\n  kandinsky mix cat.png dog.png --slerp 0,0.5,1 -o strip.png\n'
                '  kandinsky mix photo.png "a watercolour painting" "a photo" -o out.png   (a + b - c)\n'
                '  kandinsky mix --demo "a red cat" "a blue dog" --slerp 0,0.5,1 -o demo.png')


def _ts(text: str) -> list[float]:
    try:
        ts = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        ts = []
    if not ts or any(not math.isfinite(t) for t in ts):
        raise argparse.ArgumentTypeError(f"--slerp takes comma-separated fractions like 0,0.5,1, got {text!r}")
    return ts


def add_mix_arguments(parser) -> None:
    parser.add_argument("items", nargs="+", metavar="IMAGE_OR_PROMPT", help="a b (with --slerp) or a b c (a + b - c)")
    parser.add_argument("--slerp", type=_ts, default=None, help="fractions t from a (0) to b (1), e.g. 0,0.5,1")
    parser.add_argument("-o", "--output", default="mix.png", help="PNG to write (default mix.png)")
    common.add_overwrite(parser)
    common.add_pipeline_arguments(parser, device="cpu")
    parser.add_argument("--steps", type=int, default=None,
                        help="decoder steps (default 50; --demo 20, --random-demo 4)")
    parser.add_argument("--prior-steps", type=int, default=None, help="prior steps (default 25; --random-demo 2)")
    common.add_size_arguments(parser, "512; demos 64; a multiple of 64")
    parser.add_argument("--seed", type=common.seed, default=0, help="random seed (default 0)")


def run_mix(args) -> int:
    import torch

    from kandinsky.research.embeddings import is_image_path, mix, strip

    n = len(args.items)
    if (args.slerp is not None and n != 2) or (args.slerp is None and n != 3):
        raise common.InputError(f"give 2 items with --slerp, or 3 items for a + b - c; got {n}")
    missing = [x for x in args.items if is_image_path(x) and not Path(x).is_file()]
    if missing:
        raise common.InputError(f"no such image file: {', '.join(missing)}")
    steps = args.steps if args.steps is not None else (20 if args.demo else 4 if args.random_demo else 50)
    prior_steps = args.prior_steps if args.prior_steps is not None else (2 if args.random_demo else 25)
    if steps < 1 or prior_steps < 1:
        raise common.InputError("--steps and --prior-steps must be >= 1")
    width, height = _size(args, 64 if args.demo or args.random_demo else 512)
    output = _png(args.output)
    common.check_outputs([output], args.overwrite)
    with common.pipeline(args, device_default="cpu") as (pipe, _):
        images = mix(pipe, args.items, ts=args.slerp, generator=torch.Generator().manual_seed(args.seed),
                     prior_steps=prior_steps, num_inference_steps=steps, height=height, width=width, progress=False)
    return _saved([strip(images)], [output])


# ----------------------------------------------------------------------------- routes
ROUTES_DESCRIPTION = ("Where a concept enters the picture: prompt B's image embedding patched into prompt A's decoder "
                      "run along one route ('time': the timestep embedding every ResBlock reads; 'tokens': the image "
                      "tokens every attention layer reads), at one UNet level, for one window of steps; one heat map "
                      "per measure of how far the picture moved from A toward B (--measure shapes: the shapes "
                      "analyser's attributes, the default with --demo; clip: CLIP image embeddings, any model).")
ROUTES_EXAMPLES = ('examples:\n  kandinsky routes --demo "a red circle on a blue background" '
                   '"a green square on a blue background" -o map.png\n'
                   '  kandinsky routes "a red car" "a blue car" --levels down,mid,up,all --windows 5 -o car.png')


def _names(what: str):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(s.strip() for s in text.split(",") if s.strip())
        if not names:
            raise argparse.ArgumentTypeError(f"{what} takes comma-separated names, got {text!r}")
        return names

    return parse


_seeds = common.integers("--seeds", "integers")


def add_routes_arguments(parser) -> None:
    parser.add_argument("prompt_a", help="the run that is patched")
    parser.add_argument("prompt_b", help="the prompt whose image embedding is patched in")
    parser.add_argument("-o", "--output", default="routes.png", help="heat map PNG (default routes.png)")
    common.add_overwrite(parser)
    common.add_pipeline_arguments(parser, device="cpu")
    parser.add_argument("--measure", choices=["auto", "shapes", "clip"], default="auto",
                        help="shapes (the demo's analyser) or clip (any model); auto: shapes with --demo, else clip")
    parser.add_argument("--routes", type=_names("--routes"), default=("time", "tokens", "time+tokens"),
                        help="rows: routes, comma-separated (default time,tokens,time+tokens)")
    parser.add_argument("--levels", type=_names("--levels"), default=None,
                        help="rows: UNet levels, comma-separated, e.g. down,mid,up,all (default every level: "
                             "down.0 .. mid .. up.3)")
    parser.add_argument("--windows", type=common.at_least(1), default=4,
                        help="columns: this many equal windows of the steps (default 4)")
    parser.add_argument("--seeds", type=_seeds, default=[0], help="decoder seeds, comma-separated (default 0)")
    parser.add_argument("--steps", type=common.at_least(1), default=None,
                        help="decoder steps (default 50; --demo 20, --random-demo 4)")
    parser.add_argument("--prior-steps", type=common.at_least(1), default=None,
                        help="prior steps (default 25; --random-demo 2)")
    common.add_size_arguments(parser, "512; demos 64; a multiple of 64")


def run_routes(args) -> int:
    from kandinsky.research.routes import Grid, route_map

    steps = args.steps if args.steps is not None else (20 if args.demo else 4 if args.random_demo else 50)
    prior_steps = args.prior_steps if args.prior_steps is not None else (2 if args.random_demo else 25)
    if args.windows > steps:
        raise common.InputError(f"--windows {args.windows} is more than the {steps} steps; give at most {steps}")
    width, height = _size(args, 64 if args.demo or args.random_demo else 512)
    measure = args.measure if args.measure != "auto" else ("shapes" if args.demo else "clip")
    output = _png(args.output)
    common.check_outputs([output], args.overwrite)
    grid = Grid(routes=args.routes, levels=args.levels, windows=args.windows)
    with common.pipeline(args, device_default="cpu") as (pipe, _):
        result = route_map(pipe, args.prompt_a, args.prompt_b, measure=measure, grid=grid, seeds=args.seeds,
                           num_inference_steps=steps, prior_steps=prior_steps, height=height, width=width)
    for name, values in result.values.items():
        i, j = divmod(int(values.argmax()), values.shape[1])
        (route, level), (start, stop) = result.rows[i], result.windows[j]
        print(f"{name}: strongest cell {route} {level}, steps {start}-{stop - 1}: {values[i, j]:.2f} "
              f"(A {result.a[name]:.2f}, B {result.b[name]:.2f})")
    return _saved([result.picture()], [output])
