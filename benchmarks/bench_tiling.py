"""Tiled MoVQ decoding at full size: peak memory, time, and the difference from untiled.

The real Kandinsky 2.2 MoVQ config (tests/data) with random weights (fan-in scaled, as in
bench_components.py), one image of random latents. Every measurement runs in a fresh
process, so its peak RSS (``VmHWM``) is that decode's (plus the weights and torch);
the untiled and tiled outputs are saved and compared at the end.

    nice -n 10 python benchmarks/bench_tiling.py --sizes 1024 2048 --untiled 1024
    python benchmarks/bench_tiling.py --sizes 512 --untiled 512 --threads 2 --device cuda

Prints a Markdown table: size, mode (untiled, or tile/overlap/passes), seconds, peak RSS
(CPU) or peak CUDA memory, and max |tiled - untiled| / max |untiled| where both ran.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM (ru_maxrss of an exec'd child can start at its parent's RSS)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(args) -> None:
    """Child process: one decode, results as JSON on stdout, the image saved to --save."""
    import torch

    from benchmarks.bench_components import fill_random_, full_configs
    from kandinsky.movq import MoVQ, MoVQConfig

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with torch.device(device):
        movq = MoVQ(MoVQConfig.from_dict(full_configs("decoder")["movq"])).eval()
    fill_random_(movq, seed=0)
    lat = args.size // 8
    z = torch.randn(1, 4, lat, lat, generator=torch.Generator().manual_seed(1)).to(device)
    rss_weights = peak_rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tile = False if args.tile == 0 else args.tile
    start = time.perf_counter()
    with torch.no_grad():
        if tile:
            from kandinsky.movq.tiling import tiled_decode

            image = tiled_decode(movq, z, tile, args.overlap, force_not_quantize=True, passes=args.passes)
        else:
            image = movq.decode(z, force_not_quantize=True, tile=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out = {
        "seconds": seconds,
        "peak_rss_mib": peak_rss_mib(),
        "rss_before_mib": rss_weights,
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }
    torch.save(image.cpu(), args.save)
    print(json.dumps(out))


def measure(size: int, tile: int, overlap: int, passes: int, args, folder: Path) -> dict:
    save = folder / f"{size}-{tile}-{overlap}-{passes}.pt"
    cmd = [sys.executable, __file__, "--child", "--size", str(size), "--tile", str(tile), "--overlap", str(overlap),
           "--passes", str(passes), "--threads", str(args.threads), "--device", args.device, "--save", str(save)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row.update(size=size, tile=tile, overlap=overlap, passes=passes, save=save)
    print(f"  {size} px {'untiled' if not tile else f'tile {tile}/{overlap} x{passes}'}: "
          f"{row['seconds']:.1f} s, peak RSS {row['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[1024, 2048], help="image sides to decode tiled")
    p.add_argument("--untiled", type=int, nargs="*", default=[1024], help="sizes also decoded untiled")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--overlap", type=int, default=128)
    p.add_argument("--passes", type=int, nargs="+", default=[2], help="GroupNorm statistics passes to try")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    # child mode
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.passes = args.passes[0]
        one(args)
        return 0

    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for size in sorted(set(args.sizes) | set(args.untiled)):
            base = measure(size, 0, 0, 1, args, folder) if size in args.untiled else None
            if base:
                rows.append(base)
            if size in args.sizes:
                for passes in args.passes:
                    row = measure(size, args.tile, args.overlap, passes, args, folder)
                    if base:
                        a, b = torch.load(row["save"]), torch.load(base["save"])
                        row["rel_diff"] = ((a - b).abs().max() / b.abs().max()).item()
                        row["mean_abs_diff"] = (a - b).abs().mean().item()
                    rows.append(row)
    print(f"\nMoVQ decode, full-size config, random weights, batch 1, fp32, {args.device}, "
          f"{args.threads} thread(s); torch {torch.__version__}; {platform.processor() or platform.machine()}\n")
    print("| image | mode | seconds | peak RSS (MiB) | RSS before decode (MiB) | peak CUDA (MiB) "
          "| max diff / max | mean abs diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        mode = "untiled" if not r["tile"] else f"tiles {r['tile']}, overlap {r['overlap']}, {r['passes']} pass(es)"
        cuda = "-" if r["peak_cuda_mib"] is None else f"{r['peak_cuda_mib']:.0f}"
        diff = f"{r['rel_diff']:.2e}" if "rel_diff" in r else "-"
        mad = f"{r['mean_abs_diff']:.2e}" if "mean_abs_diff" in r else "-"
        print(f"| {r['size']}x{r['size']} | {mode} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} "
              f"| {r['rss_before_mib']:.0f} | {cuda} | {diff} | {mad} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
