"""Each decoder sampler's sensible minimum of steps (kandinsky.sampling.samplers.SamplerSpec.min_steps).

    nice -n 10 python benchmarks/min_steps.py                   (CPU, one thread: about 15 minutes on a free core)
    python benchmarks/min_steps.py --prior-only                 (the prior's sampler: under a minute)

On the shipped shapes model (kandinsky/demo_weights, 64 px), the same ``--n`` random prompts of its grammar
per seed and the same prior embeddings (25 steps, guidance 4) for every cell: each decoder sampler at each
of ``--steps``, guidance 4, scored by the shapes analyser (kandinsky.data.evaluate.score: the share of the
stated attributes the picture shows, mean over shape, colour, background, size and position). The
reference row is DDPM at 100 steps (the checkpoint's default).

A step count is **usable** when its mean accuracy is within ``--margin`` points (default 5) of the
reference's, and so is every larger step count measured; the sampler's minimum is the smallest usable
one. The prior's sampler (unclip) is measured the same way on the prior alone: its embeddings
classified per attribute by linear probes on real pictures' CLIP embeddings
(kandinsky.data.evaluate.prior_report), against the prior's default of 25 steps. The table and the
minima are printed; the registry's ``min_steps`` is what the library warns below (tests/test_messages.py
checks that docs/usage.md shows the registry's numbers).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STEPS = (2, 3, 4, 5, 6, 8, 10, 12, 15, 20)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="prompts per seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    parser.add_argument("--samplers", nargs="+", default=None, help="default: every decoder sampler")
    parser.add_argument("--margin", type=float, default=5.0, help="points of mean accuracy below the reference")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prior-only", action="store_true", help="only the prior's sampler (unclip)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from kandinsky.data import evaluate as ev
    from kandinsky.demo import demo_folders
    from kandinsky.pipelines.decoder import DecoderPipeline
    from kandinsky.pipelines.prior import PriorPipeline
    from kandinsky.sampling.samplers import SAMPLERS, sampler_names

    folders = demo_folders()
    prior = PriorPipeline.from_pretrained(folders["prior"])
    decoder = DecoderPipeline.from_pretrained(folders["decoder"])
    if args.prior_only:
        return prior_minimum(prior, args)
    runs = []  # (seed, stated attributes, embeddings)
    for seed in args.seeds:
        items = ev.random_prompts(args.n, seed)
        runs.append((seed, [s for _, s in items], ev.embed_prompts(prior, [p for p, _ in items], seed, 25, 4.0, 16)))

    def mean_accuracy(sampler: str, steps: int) -> tuple[float, float]:
        means, shapes = [], []
        for seed, stated, embeddings in runs:
            pictures = ev.decode(decoder, *embeddings, seed, steps, sampler, 4.0, 16)
            accuracy = ev.score(pictures, stated)["accuracy"]
            means.append(statistics.fmean(accuracy.values()))
            shapes.append(accuracy["shape"])
        return 100 * statistics.fmean(means), 100 * statistics.fmean(shapes)

    reference, reference_shape = mean_accuracy("ddpm", 100)
    print(f"reference (ddpm, 100 steps): mean {reference:.1f}%, shape {reference_shape:.1f}% "
          f"(n = {args.n} x seeds {args.seeds})", flush=True)
    print("| sampler | " + " | ".join(str(s) for s in args.steps) + " | minimum | registry |")
    print("| --- |" + " --- |" * (len(args.steps) + 2))
    for name in args.samplers or sampler_names():
        cells = {steps: mean_accuracy(name, steps) for steps in args.steps}
        usable = [s for s in args.steps if all(cells[t][0] >= reference - args.margin for t in args.steps if t >= s)]
        minimum = usable[0] if usable else None
        print(f"| {name} | " + " | ".join(f"{m:.1f} / {sh:.0f}" for m, sh in cells.values())
              + f" | {minimum} | {SAMPLERS[name].min_steps} |", flush=True)
    return 0


@torch.no_grad()
def prior_minimum(prior, args) -> int:
    from kandinsky.data import evaluate as ev
    from kandinsky.sampling.samplers import SAMPLERS

    probes = {seed: ev.attribute_probe(prior, seed)[0] for seed in args.seeds}

    def mean_accuracy(steps: int) -> float:
        means = []
        for seed in args.seeds:
            items = ev.random_prompts(args.n, seed)
            embeds, _ = ev.embed_prompts(prior, [t for t, _ in items], seed, steps, 4.0, 16)
            found = probes[seed](embeds)
            means.append(statistics.fmean(f[k] == v for (_, stated), f in zip(items, found)
                                          for k, v in stated.items()))
        return 100 * statistics.fmean(means)

    reference = mean_accuracy(25)
    print(f"reference (unclip, 25 steps): mean {reference:.1f}% (n = {args.n} x seeds {args.seeds})")
    cells = {steps: mean_accuracy(steps) for steps in args.steps}
    usable = [s for s in args.steps if all(cells[t] >= reference - args.margin for t in args.steps if t >= s)]
    print("| sampler | " + " | ".join(str(s) for s in args.steps) + " | minimum | registry |")
    print("| unclip | " + " | ".join(f"{m:.1f}" for m in cells.values())
          + f" | {usable[0] if usable else None} | {SAMPLERS['unclip'].min_steps} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
