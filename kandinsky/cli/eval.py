"""``kandinsky eval shapes``: the measurements of kandinsky.data.evaluate, printed (and --save: grids)."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from types import SimpleNamespace

from kandinsky.cli import common

DESCRIPTION = ("Measure a checkpoint on the procedural shapes grammar (kandinsky.data.shapes): per-attribute "
               "accuracy and confusion tables of text2img, CLIP retrieval, inpainting, variations.")
GRIDS = ("text2img", "variations", "inpaint")  # --save PREFIX writes one grid per section (grid_paths)


def grid_paths(save: str) -> dict[str, Path]:
    """--save's grids: a folder (an existing one, or a name ending in /) gets FOLDER/text2img.png, ...; a
    prefix ending in -, _ or . gets PREFIXtext2img.png; any other prefix PREFIX-text2img.png."""
    if save.endswith(("/", "\\")) or Path(save).is_dir():
        return {name: Path(save) / f"{name}.png" for name in GRIDS}
    join = "" if save.endswith(("-", "_", ".")) else "-"
    return {name: Path(f"{save}{join}{name}.png") for name in GRIDS}


def add_arguments(parser) -> None:
    from kandinsky.data.evaluate import SWEEP_SAMPLERS, SWEEP_STEPS

    parser.add_argument("what", choices=["shapes"], help="the evaluation to run (shapes)")
    parser.add_argument("--prior", help="prior checkpoint folder (hub layout)")
    parser.add_argument("--decoder", help="decoder checkpoint folder")
    parser.add_argument("--inpaint", help="inpainting decoder checkpoint folder (the hub's decoder-inpaint layout; "
                                          "adds the inpainting evaluation)")
    parser.add_argument("--demo", action="store_true", help="evaluate the shipped demo weights")
    parser.add_argument("--n", type=common.at_least(1), default=64, help="prompts / pictures per evaluation (default 64)")
    parser.add_argument("--seed", type=common.seed, default=0, help="seed of the prompts, pictures and noise (default 0)")
    parser.add_argument("--steps", type=common.at_least(1), default=20, help="decoder steps (default 20)")
    parser.add_argument("--prior-steps", type=common.at_least(1), default=25, help="prior steps (default 25)")
    parser.add_argument("--scheduler", default=None, help="decoder sampler (default: the checkpoint's)")
    parser.add_argument("--guidance-scale", type=float, default=4.0, help="decoder guidance scale (default 4)")
    parser.add_argument("--prior-guidance-scale", type=float, default=4.0, help="prior guidance scale (default 4)")
    parser.add_argument("--batch", type=common.at_least(1), default=16, help="pictures per model call (default 16)")
    parser.add_argument("--sweep", action="store_true",
                        help=f"also accuracy vs steps {SWEEP_STEPS} for samplers {', '.join(SWEEP_SAMPLERS)}")
    parser.add_argument("--save", default=None, metavar="PREFIX",
                        help="also write the generated pictures as PNG grids, one per section: "
                             f"PREFIX-{{{','.join(GRIDS)}}}.png, or FOLDER/{{...}}.png when PREFIX is a folder "
                             "(ends in /); made if missing, checked before any work")
    common.add_overwrite(parser)


def run(args) -> int:
    import numpy as np

    from kandinsky.data import evaluate as ev, shapes

    if not args.demo and (not args.prior or not args.decoder):
        raise common.InputError("give --prior and --decoder checkpoint folders (or --demo for the shipped weights)")
    grids = grid_paths(args.save) if args.save else {}
    common.check_outputs(grids.values(), args.overwrite, image=True, flag="--save")
    from kandinsky.pipelines.decoder import DecoderPipeline
    from kandinsky.pipelines.prior import PriorPipeline

    with common.checkpoints(args) as folders:
        inpaint = args.inpaint or folders["inpaint"]
        prior = PriorPipeline.from_pretrained(str(folders["prior"]))
        decoder = DecoderPipeline.from_pretrained(str(folders["decoder"]))
        inpainter = DecoderPipeline.from_pretrained(str(inpaint)) if inpaint else None
    common.keep_threads(decoder.threads())  # the reports' own model calls (MoVQ round trip, CLIP) too
    shared = dict(seed=args.seed, steps=args.steps, sampler=args.scheduler, guidance=args.guidance_scale,
                  batch=args.batch)
    prior_options = dict(prior_steps=args.prior_steps, prior_guidance=args.prior_guidance_scale)
    rescued = []

    def save(name, pictures):  # a grid that cannot be written is rescued (common.save): the run goes on
        import warnings

        grid = SimpleNamespace(save=partial(ev.save_grid, pictures))  # saved as common.save saves a picture
        path, problem = common.save([grid], [grids[name]])
        if problem:
            warnings.warn(problem, stacklevel=2)
            rescued.append(path[0])

    report = ev.text2img_report(prior, decoder, n=args.n, **shared, **prior_options)
    print(ev.format_accuracy(f"text2img ({args.n} random prompts, {args.steps} steps)", report))
    for name in shapes.ATTRIBUTES:
        if name in report["confusion"]:
            print(ev.format_confusion(name, report["confusion"][name]))
    if grids:
        save("text2img", report["pictures"])

    retrieval = ev.retrieval_report(prior, n=args.n, seed=args.seed)
    print(f"CLIP retrieval ({args.n} pictures, full captions): text->image {retrieval['text_to_image']:.1%}  "
          f"image->text {retrieval['image_to_text']:.1%}")

    report_prior = ev.prior_report(prior, n=args.n, seed=args.seed, batch=args.batch, **prior_options)
    print(ev.format_accuracy("prior (sampled embeddings, linear probes of real pictures' embeddings)", report_prior))
    print("  the same classifier on real pictures' embeddings: "
          + "  ".join(f"{name} {value:.1%}" for name, value in report_prior["probe"].items()))

    roundtrip = ev.movq_report(decoder, n=args.n, seed=args.seed, batch=args.batch)
    print(ev.format_accuracy("MoVQ round trip (real pictures encoded and decoded: the decoder's ceiling)", roundtrip)
          + "  shape by size: " + "  ".join(f"{k} {v:.1%}" for k, v in roundtrip["shape_by_size"].items()))

    variations = ev.variations_report(prior, decoder, n=args.n, **shared)
    print(ev.format_accuracy("variations (picture -> CLIP embedding -> decoder)", variations))
    if grids:
        save("variations", variations["pictures"])

    if inpainter is not None:
        inpaint = ev.inpaint_report(prior, inpainter, n=args.n, **shared, **prior_options)
        print(f"inpaint ({args.n} cases): prompted colour in the masked half {inpaint['colour']:.1%}, "
              f"pixels kept outside it {inpaint['kept']:.1%}")
        if grids:
            save("inpaint", inpaint["pictures"])

    if args.sweep:
        embeddings = ev.embed_prompts(prior, report["prompts"], args.seed, args.prior_steps, args.prior_guidance_scale,
                                      args.batch)
        print("text2img accuracy by sampler and steps: mean over the stated attributes / shape")
        print(f"  {'sampler':<10}" + "".join(f"{s:>15}" for s in ev.SWEEP_STEPS))
        for sampler in ev.SWEEP_SAMPLERS:
            row = []
            for steps in ev.SWEEP_STEPS:
                r = ev.text2img_report(prior, decoder, n=args.n, seed=args.seed, steps=steps, sampler=sampler,
                                       guidance=args.guidance_scale, batch=args.batch, embeddings=embeddings)
                row.append(f"{np.mean(list(r['accuracy'].values())):.1%} / {r['accuracy']['shape']:.0%}")
            print(f"  {sampler:<10}" + "".join(f"{cell:>15}" for cell in row), flush=True)
    if grids:
        print(f"wrote {', '.join(str(p) for p in grids.values() if p.exists())}"
              + (f"; rescued {', '.join(map(str, rescued))}" if rescued else ""))
    return 1 if rescued else 0
