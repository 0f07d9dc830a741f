"""``kandinsky lens``: pictures from each CLIP text layer (kandinsky.research.lens does the work).

    kandinsky lens --demo "a red circle on a blue background" -o lens.png
    kandinsky lens "a red car" "a cat on a sofa" --layers 0,8,16,24,32 -o lens.png --json lens.json
"""
from __future__ import annotations

import json

from kandinsky.cli import common

DESCRIPTION = ("A lens on the text encoder: each prompt is generated from its hidden states after each CLIP text layer "
               "(the tower's final LayerNorm and projection applied there, then the prior and the decoder, every "
               "layer from the same seed), as one grid: rows = prompts, columns = layers (0 = the token embeddings, "
               "the last = the tower's output, i.e. the plain picture). Under each picture its measures: clip (the "
               "cosine of the picture's CLIP image embedding with the prompt's text embedding, any model) and, on "
               "the shapes model (--demo), how many of the attributes the prompt states the analyser finds. The "
               "unconditional text and --negative-prompt go through the whole tower.")
EXAMPLES = ('examples:\n  kandinsky lens --demo "a red circle on a blue background" -o lens.png\n'
            '  kandinsky lens "a red car" "a cat on a sofa" --layers 0,8,16,24,32 -o lens.png --json lens.json')


_layers = common.integers("--layers", "text-encoder layers")


def add_arguments(parser) -> None:
    parser.add_argument("prompts", nargs="+", metavar="PROMPT", help="one grid row each")
    parser.add_argument("-o", "--output", default="lens.png", help="the grid picture, a PNG (default lens.png)")
    parser.add_argument("--json", default=None, help="also write the layers and scores to this JSON file")
    common.add_overwrite(parser)
    parser.add_argument("--layers", type=_layers, default=None,
                        help="text-encoder layers, comma-separated: 0 = the token embeddings .. N = the tower's "
                             "output (default all)")
    parser.add_argument("--measure", choices=["auto", "clip", "shapes", "both"], default="auto",
                        help="clip (any model), shapes (the demo's analyser; prompts of its grammar) or both; "
                             "auto: both with --demo, else clip")
    parser.add_argument("--seed", type=common.seed, default=0, help="random seed (default 0)")
    parser.add_argument("--steps", type=common.at_least(1), default=None, help="decoder steps (default 100; demos 20)")
    parser.add_argument("--prior-steps", type=common.at_least(2), default=None,
                        help="prior steps, at least 2 (default 25)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="decoder guidance scale (default 4; <= 1: off)")
    parser.add_argument("--negative-prompt", default=None, help="what the picture should not show")
    common.add_size_arguments(parser, "512; --demo 64, --random-demo 256; a multiple of 64")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    common.add_pipeline_arguments(parser)


def run(args) -> int:
    from kandinsky.cli.research import _png, _saved, _size
    from kandinsky.research.lens import text_lens

    size, steps = common.default_size_and_steps(args)
    width, height = _size(args, size)
    measure = {"auto": ("shapes", "clip") if args.demo else "clip", "both": ("shapes", "clip")}.get(args.measure,
                                                                                                    args.measure)
    output = _png(args.output)
    common.check_outputs([output], args.overwrite)
    if args.json:
        common.check_outputs([args.json], args.overwrite, flag="--json")
    options = {k: v for k, v in dict(prior_num_inference_steps=args.prior_steps, guidance_scale=args.guidance_scale,
                                     negative_prompt=args.negative_prompt).items() if v is not None}
    with common.pipeline(args, device_default=None) as (pipe, _):
        lens = text_lens(pipe, args.prompts, layers=args.layers, seed=args.seed, measure=measure, height=height,
                         width=width, num_inference_steps=args.steps or steps, progress=not args.no_progress,
                         **options)
    for name, values in lens.scores.items():
        means = ", ".join(f"{layer}: {_mean(values[:, k])}" for k, layer in enumerate(lens.layers))
        print(f"{name} by layer: {means}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"prompts": lens.prompts, "layers": lens.layers, "depth": lens.depth, "seed": lens.seed,
                       "scores": {k: [[None if v != v else v for v in row] for row in values.tolist()]
                                  for k, values in lens.scores.items()}}, f, indent=1)
        print(f"wrote {args.json}")
    return _saved([lens.picture()], [output])


def _mean(column) -> str:
    import numpy as np

    kept = column[np.isfinite(column)]
    return f"{kept.mean():.2f}" if kept.size else "-"
