"""Intra-op threads for small decoders: where one thread is as fast as more (kandinsky.threads).

Two measurements, each setting torch's threads explicitly (so kandinsky.threads leaves them alone):

1. the shipped demo model's text2img at 64 px (20 decoder steps, 10 prior steps), whole call;
2. one guided UNet evaluation (batch 2) of decoder UNets of growing size (the tiny demo config, and
   wider variants of it) at latent sizes 8 .. 64, reported with the rule's measure of work:
   UNet parameters x latent pixels of one picture.

    nice -n 10 python benchmarks/bench_threads.py --threads 1 2 --repeat 3

Prints Markdown tables: seconds per call (per UNet evaluation) with each thread count, the ratio
to one thread, and the work. On a busy machine the ratios say what a user on a busy machine gets.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# decoder UNets from the tiny demo config up: block_out_channels (the other keys: kandinsky.demo.TINY)
WIDTHS = {"tiny (demo)": [32, 64, 64, 64], "x4": [128, 256, 256, 256], "x10": [320, 640, 640, 640]}


def best(fn, threads: int, repeat: int) -> float:
    torch.set_num_threads(threads)
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def demo_text2img(threads: list[int], repeat: int) -> None:
    from kandinsky.demo import demo_folders
    from kandinsky.pipelines.combined import Kandinsky

    f = demo_folders()
    pipe = Kandinsky.from_pretrained(f["decoder"], prior=f["prior"])
    run = dict(height=64, width=64, num_inference_steps=20, prior_num_inference_steps=10, progress=False)

    def call():
        pipe.text2img("a red circle on a blue background", generator=torch.Generator().manual_seed(0), **run)

    times = {n: best(call, n, repeat) for n in threads}
    print("| demo text2img 64 px, 20 + 10 steps | " + " | ".join(f"{times[n]:.2f} s ({n} thr)" for n in threads)
          + f" | {times[threads[-1]] / times[threads[0]]:.2f}x |")


@torch.no_grad()
def unets(threads: list[int], repeat: int, latents: list[int], widths: list[str]) -> None:
    from kandinsky.demo import TINY, random_model

    print("| UNet | parameters | latent | work (params x pixels) | "
          + " | ".join(f"ms, {n} thr" for n in threads) + f" | {threads[-1]} thr / {threads[0]} thr |")
    print("| --- " * (5 + len(threads)) + "|")
    for name in widths:
        config = {**TINY["unet"], "block_out_channels": WIDTHS[name]}
        unet = random_model(config, 0).eval()
        params = sum(p.numel() for p in unet.parameters())
        for lat in latents:
            x = torch.randn(2, 4, lat, lat)
            t = torch.tensor([500, 500])
            emb = torch.randn(2, config["encoder_hid_dim"])

            def call():
                unet(x, t, emb)

            times = {n: best(call, n, repeat) for n in threads}
            print(f"| {name} | {params:,} | {lat} x {lat} | {params * lat * lat:.2e} | "
                  + " | ".join(f"{1e3 * times[n]:.1f}" for n in threads)
                  + f" | {times[threads[-1]] / times[threads[0]]:.2f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--latents", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--widths", nargs="+", default=list(WIDTHS), choices=list(WIDTHS))
    p.add_argument("--skip-demo", action="store_true")
    args = p.parse_args()
    if not args.skip_demo:
        demo_text2img(args.threads, args.repeat)
    unets(args.threads, args.repeat, args.latents, args.widths)


if __name__ == "__main__":
    main()
