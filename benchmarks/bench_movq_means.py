"""What each speed measure buys in the MoVQ decoder, measured side by side in one process.

    nice -n 10 python benchmarks/bench_movq_means.py                  # full size, 128 px, fp32 and bf16
    python benchmarks/bench_movq_means.py --latent 64 --device cuda --dtypes fp16 bf16

Variants (the same random weights, fan-in scaled, real hub config; timed interleaved):

* ``reference``: diffusers' VQModel.decode;
* ``ours``: kandinsky's MoVQ.decode (SpatialNorm's 1x1 convs at the latents' resolution,
  scale and shift broadcast over each latent pixel's block);
* ``ours, upsampled SpatialNorm``: ours with the reference's SpatialNorm (latents upsampled
  to every resolution, both 1x1 convs there): what the broadcast saves;
* ``... channels_last``: weights and input in ``torch.channels_last`` (ours keeps it through
  every module: tests/test_movq_perf.py).

Prints a Markdown table: time per decode (median), relative to the reference in the same
dtype and memory format, max |variant - reference| / max |reference|, and the same against
the fp32 reference (with --dtypes including fp32): each half-precision variant's own error.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_components import DTYPES, full_configs, rel_diff, time_pair  # noqa: E402
from benchmarks.bench_stages import reference_and_ours  # noqa: E402
from kandinsky.movq.model import SpatialNorm  # noqa: E402


def upsampled_spatial_norm(self, f, zq):
    """The reference's SpatialNorm: zq upsampled to f's size, both 1x1 convs at full resolution."""
    zq = F.interpolate(zq, size=f.shape[-2:], mode="nearest")
    return self.norm_layer(f) * self.conv_y(zq) + self.conv_b(zq)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latent", type=int, default=16, help="latent side (images are 8x: 16 -> 128 px)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = full_configs("decoder")["movq"]
    fast_forward = SpatialNorm.forward
    rows, truth = [], None
    for name in sorted(args.dtypes, key=lambda d: d != "fp32"):  # fp32 first: the others' yardstick
        dtype = DTYPES[name]
        ref, ours = reference_and_ours("movq_decode", config, dtype, device)
        z = torch.randn(args.batch, 4, args.latent, args.latent, generator=torch.Generator().manual_seed(0))
        z = z.to(device, dtype)
        for fmt in ("nchw", "channels_last"):
            if fmt == "channels_last":
                ref, ours = ref.to(memory_format=torch.channels_last), ours.to(memory_format=torch.channels_last)
                z = z.contiguous(memory_format=torch.channels_last)

            def slow(z=z):
                SpatialNorm.forward = upsampled_spatial_norm
                try:
                    return (ours.decode(z, force_not_quantize=True, tile=False),)
                finally:
                    SpatialNorm.forward = fast_forward

            fns = {
                "reference": lambda z=z: (ref.decode(z, force_not_quantize=True).sample,),
                "ours": lambda z=z: (ours.decode(z, force_not_quantize=True, tile=False),),
                "ours, upsampled SpatialNorm": slow,
            }
            with torch.no_grad():
                times, outputs = time_pair(fns, device, args.warmup, args.iters)
            base = statistics.median(times["reference"])
            truth = truth if name != "fp32" or fmt != "nchw" else outputs["reference"]  # the fp32 reference
            for variant, t in times.items():
                rows.append((name, fmt, variant, statistics.median(t), statistics.median(t) / base,
                             rel_diff(outputs[variant], outputs["reference"]),
                             rel_diff(outputs[variant], truth) if truth is not None else None))
            print(f"  {name} {fmt} done", file=sys.stderr, flush=True)
        del ref, ours
    print(f"\nMoVQ decode, full-size config, random weights, batch {args.batch}, {args.latent * 8} px, "
          f"{args.device}, {args.threads} thread(s), {args.warmup} warmup + {args.iters} timed passes; "
          f"torch {torch.__version__}\n")
    print("| dtype | memory format | variant | seconds | / reference | diff from reference | diff from fp32 reference |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for dtype, fmt, variant, sec, ratio, diff, err in rows:
        err = "-" if err is None else f"{err:.1e}"
        print(f"| {dtype} | {fmt} | {variant} | {sec:.3f} | {ratio:.2f} | {diff:.1e} | {err} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
