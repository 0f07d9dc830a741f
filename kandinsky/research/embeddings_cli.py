"""``kandinsky mix``: paint slerps between two embeddings, or the sum a + b - c.

    kandinsky mix cat.png dog.png --slerp 0,0.25,0.5,0.75,1 -o strip.png
    kandinsky mix photo.png "a watercolour painting" "a photo" -o watercolour.png     (a + b - c)

Each item is an image (a path ending in .png, .jpg, ...: its CLIP image embedding) or a
prompt (an image embedding sampled by the prior). The decoder paints the result, guided
away from the embedding of an all-zero image.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from kandinsky.research.embeddings import is_image_path, mix, strip  # noqa: F401 (mix, strip: their home)


def _ts(text: str) -> list[float]:
    try:
        ts = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--slerp takes comma-separated fractions like 0,0.5,1, got {text!r}")
    if not ts or any(not np.isfinite(t) for t in ts):
        raise argparse.ArgumentTypeError(f"--slerp takes comma-separated fractions like 0,0.5,1, got {text!r}")
    return ts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="kandinsky mix",
        description="Embedding arithmetic and spherical interpolation, painted by the decoder. Items are images "
                    "(paths ending in .png, .jpg, ...) or prompts (turned into image embeddings by the prior).",
        epilog='examples:\n  kandinsky mix cat.png dog.png --slerp 0,0.5,1 -o strip.png\n'
               '  kandinsky mix photo.png "a watercolour painting" "a photo" -o out.png   (a + b - c)\n'
               '  kandinsky mix --demo "a red cat" "a blue dog" --slerp 0,0.5,1 -o demo.png',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("items", nargs="+", metavar="IMAGE_OR_PROMPT", help="a b (with --slerp) or a b c (a + b - c)")
    parser.add_argument("--slerp", type=_ts, default=None, help="fractions t from a (0) to b (1), e.g. 0,0.5,1")
    parser.add_argument("-o", "--output", default="mix.png", help="PNG to write (default mix.png)")
    demo = parser.add_mutually_exclusive_group()
    demo.add_argument("--demo", action="store_true",
                      help="the tiny model trained on procedural shapes that ships with the package (offline)")
    demo.add_argument("--random-demo", action="store_true", help="tiny random-weight checkpoints built on the fly")
    parser.add_argument("--prior", help="prior checkpoint folder or hub id")
    parser.add_argument("--decoder", help="decoder checkpoint folder or hub id")
    parser.add_argument("--steps", type=int, default=None, help="decoder steps (default 50; --demo 20, --random-demo 4)")
    parser.add_argument("--prior-steps", type=int, default=None, help="prior steps (default 25; --random-demo 2)")
    parser.add_argument("--size", default=None, help="WIDTHxHEIGHT (default 512x512; demos 64x64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    from kandinsky.research.inspect import parse_size

    output = Path(args.output)
    try:
        n = len(args.items)
        if (args.slerp is not None and n != 2) or (args.slerp is None and n != 3):
            raise ValueError(f"give 2 items with --slerp, or 3 items for a + b - c; got {n}")
        missing = [x for x in args.items if is_image_path(x) and not Path(x).is_file()]
        if missing:
            raise ValueError(f"no such image file: {', '.join(missing)}")
        steps = args.steps if args.steps is not None else (20 if args.demo else 4 if args.random_demo else 50)
        prior_steps = args.prior_steps if args.prior_steps is not None else (25 if args.demo else 2 if args.random_demo else 25)
        if steps < 1 or prior_steps < 1:
            raise ValueError("--steps and --prior-steps must be >= 1")
        width, height = parse_size(args.size or ("64x64" if args.demo else "64x64" if args.random_demo else "512x512"))
        if output.suffix.lower() != ".png":
            raise ValueError(f"-o must be a .png path, got {output}")
        if output.exists():
            raise ValueError(f"-o {output} exists; choose a new path (nothing is overwritten)")
        if not output.parent.is_dir():
            raise ValueError(f"-o {output}: folder {output.parent} does not exist")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from kandinsky.demo import load_pipeline

    tmp = None
    try:
        pipe, tmp = load_pipeline(args.prior, args.decoder, demo=args.demo, random=args.random_demo, seed=args.seed,
                                  device=args.device)
        images = mix(pipe, args.items, ts=args.slerp, generator=torch.Generator().manual_seed(args.seed),
                     prior_steps=prior_steps, num_inference_steps=steps, height=height, width=width, progress=False)
    except (ValueError, TypeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if tmp is not None:
            tmp.cleanup()
    strip(images).save(output)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
