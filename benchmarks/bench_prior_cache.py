"""The prior stage with and without the constant-prefix cache, full size, random weights (run by hand).

Kandinsky 2.2's prior is causal: the 77 text hidden states and the text embedding (78 tokens)
never see the timestep or the noisy embedding, so ``DiffusionPrior.prefix`` computes their keys
and values once and every step runs only the 3 tokens that change. This times the prior's
denoising loop (the text encoder runs once either way and is left out) with the real config
(20 layers, width 2048), batch 2 x guidance, both ways, alternately, and checks they agree.

    python benchmarks/bench_prior_cache.py                       # fp32 and bf16, CPU, 25 steps
    python benchmarks/bench_prior_cache.py --steps 5 --repeats 1 --dtypes fp32
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from smoke_full_size import DATA, DTYPES, random_model  # noqa: E402
from kandinsky.sampling import samplers  # noqa: E402
from kandinsky.sampling.denoisers import PriorDenoiser  # noqa: E402
from kandinsky.sampling.schedule import NoiseSchedule  # noqa: E402


@torch.no_grad()
def run(prior, schedule, conditioning, rows, steps, cache: bool, seed: int = 0) -> tuple[float, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    plan = samplers.make_plan("unclip", schedule, steps)
    x = torch.randn(rows.shape[0] // 2, prior.config.embedding_dim, generator=g).to(prior.dtype)
    start = time.perf_counter()
    denoiser = PriorDenoiser(prior, conditioning, rows, guidance_scale=4.0, cache=cache)
    x = samplers.sample("unclip", denoiser, x, plan, generator=g)
    return time.perf_counter() - start, x


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=1, help="prompts (x2 rows for guidance)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    schedule = NoiseSchedule.from_folder(DATA / "kandinsky-2-2-prior" / "scheduler")
    print(f"| dtype | steps | uncached s | cached s | cached / uncached | max rel diff |")
    print(f"| --- | --- | --- | --- | --- | --- |")
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        prior = random_model(DATA / "kandinsky-2-2-prior" / "prior" / "config.json", dtype, "cpu", seed=0)
        cfg = prior.config
        g = torch.Generator().manual_seed(1)
        M = 2 * args.batch  # distinct texts: the prompts and the empty negative
        conditioning = (
            torch.randn(M, cfg.text_embed_dim, generator=g).to(dtype),
            torch.randn(M, cfg.num_embeddings, cfg.embedding_dim, generator=g).to(dtype),
            torch.arange(cfg.num_embeddings)[None].expand(M, -1) < 12,  # 12 real tokens, the rest padding
        )
        rows = torch.arange(M)  # [uncond rows; cond rows]
        times = {True: [], False: []}
        outs = {}
        for _ in range(args.repeats):
            for cache in (False, True):
                t, outs[cache] = run(prior, schedule, conditioning, rows, args.steps, cache)
                times[cache].append(t)
                print(f"  {name} cache={cache}: {t:.2f} s", file=sys.stderr, flush=True)
        diff = ((outs[True].float() - outs[False].float()).abs().max() / outs[False].float().abs().max()).item()
        u, c = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {name} | {args.steps} | {u:.2f} | {c:.2f} | {c / u:.3f} | {diff:.1e} |", flush=True)
        del prior
    return 0


if __name__ == "__main__":
    sys.exit(main())
