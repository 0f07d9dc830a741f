"""Tiled MoVQ decoding, every mode against untiled, on trained and on random weights.

Trained: the shipped shapes MoVQ (kandinsky/demo_weights/decoder/movq); random: the same config with
random weights (kandinsky.demo.random_model(TINY["movq"], 20), the random demo's MoVQ). The latents
are those of real shapes pictures (kandinsky.data.shapes.example(seed, 1, image_size=size), encoded
untiled by the same model). Each tiled mode (passes 1, 2, "exact"; tiles of half the picture, the
default quarter-tile overlap) is compared with the untiled fp32 decode and with an untiled fp64 decode
(the truth both round away from):

    nice -n 10 python benchmarks/bench_tiling_accuracy.py --sizes 256 512 --seeds 0 1

Prints a Markdown table: weights, picture, mode, seconds, max |diff| / max |reference| against fp32 and
fp64 untiled (the bound of kandinsky.movq.tiling.BOUND is on this number), relative L2, and the share
of pixels off by more than 30/255. The worst over the seeds is shown.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    d = (out.double() - ref.double())
    return ((d.abs().max() / ref.abs().max()).item(), (d.norm() / ref.norm()).item(),
            ((d.abs() * 127.5 > 30).double().mean()).item())


@torch.no_grad()
def main() -> None:
    from kandinsky.data import shapes
    from kandinsky.demo import DEMO_WEIGHTS, TINY, random_model
    from kandinsky.movq.tiling import tiled_decode
    from weights_convert import load_component

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--modes", nargs="+", default=["1", "2", "exact"])
    p.add_argument("--weights", nargs="+", default=["trained", "random"], choices=["trained", "random"])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    models = {"trained": lambda: load_component(DEMO_WEIGHTS / "decoder" / "movq"),
              "random": lambda: random_model(TINY["movq"], 20)}
    print("| weights | picture | mode | seconds | max diff / max (fp32) | max diff / max (fp64) | rel. L2 (fp64) "
          "| pixels off > 30/255 (fp64) |")
    print("| --- " * 8 + "|")
    for name in args.weights:
        movq = models[name]().eval()
        for size in args.sizes:
            rows: dict[str, list] = {}
            for seed in args.seeds:
                picture = np.asarray(shapes.example(seed, 1, image_size=size).image, dtype=np.float32) / 127.5 - 1
                x = torch.from_numpy(picture).permute(2, 0, 1)[None]
                z = movq.encode(x, tile=False)
                t = time.perf_counter()
                untiled = movq.decode(z, force_not_quantize=True, tile=False)
                rows.setdefault("untiled fp32", []).append((time.perf_counter() - t, None, None, None, None))
                truth = movq.double().decode(z.double(), force_not_quantize=True, tile=False)
                movq.float()
                rows.setdefault("untiled fp32 vs fp64", []).append((None, None, *errors(untiled, truth)))
                for mode in args.modes:
                    passes = mode if mode == "exact" else int(mode)
                    t = time.perf_counter()
                    out = tiled_decode(movq, z, size // 2, force_not_quantize=True, passes=passes)
                    seconds = time.perf_counter() - t
                    label = f"tiles {size // 2}, {'exact' if passes == 'exact' else f'{passes} pass' + 'es' * (passes > 1)}"
                    rows.setdefault(label, []).append((seconds, errors(out, untiled)[0], *errors(out, truth)))
            for label, got in rows.items():
                worst = [max((g[i] for g in got if g[i] is not None), default=None) for i in range(len(got[0]))]
                cells = ["-" if v is None else f"{v:.1f}" if i == 0 else f"{v:.2e}" if i < 4 else f"{100 * v:.2f} %"
                         for i, v in enumerate(worst)]
                print(f"| {name} | {size} x {size} | {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
