"""The GPU check of issue 21, one Markdown report (run by benchmarks/gpu_check.sh).

    python benchmarks/gpu_check.py --out gpu_report.md            (one CUDA GPU, full-size configs, < 8 min)
    python benchmarks/gpu_check.py --dry-run --out /tmp/dry.md    (CPU, tiny configs: every code path)

Sections, every model with random weights (the hub configs; ``--dry-run``: the test suite's tiny ones):

1. text2img, ours against diffusers on the same weights and inputs (benchmarks/bench_stages.py's
   ``bench_text2img``), fp16 and bf16, at 512 and 768 px: seconds per image and the pixel difference,
   with each side's distance from the reference's own float32 pixels as the yardstick (random weights
   amplify rounding: in the dry run both sides' tiny fp16 / bf16 pixels are up to 1.0 from float32);
2. one UNet step (batch 2): its FLOP count (torch.utils.flop_counter) and the achieved TFLOP/s;
3. peak CUDA memory of one text2img at 768 px per offload mode (none, model, sequential);
4. ``torch.compile`` on / off: one UNet step, eager against compiled;
5. the preset ``fast`` against ``reference``: seconds per image (the decoder's share of issue 21's Pareto
   table on this GPU).
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_components import DATA, DTYPES, full_configs, quiet_reference_libraries, tiny_configs  # noqa: E402
from benchmarks.bench_stages import (  # noqa: E402
    PROMPT, bench_text2img, markdown, prior_pipelines, reference_and_ours, text2img_calls,
)


DTYPES_RUN = ("fp16", "bf16")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device, warmup=1, iters=3) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


def unet_case(configs, device, dtype, latent):
    _, unet = reference_and_ours("unet", configs["unet"], dtype, device, seed=10)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(2, 4, latent, latent, generator=g, device=device, dtype=dtype)
    emb = torch.randn(2, unet.config.encoder_hid_dim, generator=g, device=device, dtype=dtype)
    return unet, x, emb


@torch.no_grad()
def flops_section(configs, device, dtype, latent, iters) -> str:
    from torch.utils.flop_counter import FlopCounterMode

    unet, x, emb = unet_case(configs, device, dtype, latent)
    counter = FlopCounterMode(display=False)
    with counter:
        unet(x, 500, emb)
    flops = counter.get_total_flops()
    s = seconds(lambda: unet(x, 500, emb), device, iters=iters)
    return (f"UNet step, batch 2, {latent * 8} px: {flops / 1e12:.2f} TFLOP per step, {s * 1000:.1f} ms, "
            f"**{flops / s / 1e12:.1f} TFLOP/s** achieved")


@torch.no_grad()
def compile_section(configs, device, dtype, latent, iters, backend="inductor") -> str:
    unet, x, emb = unet_case(configs, device, dtype, latent)
    eager = seconds(lambda: unet(x, 500, emb), device, iters=iters)
    compiled = torch.compile(unet, backend=backend)
    start = time.perf_counter()
    compiled(x, 500, emb)
    sync(device)
    first = time.perf_counter() - start
    fast = seconds(lambda: compiled(x, 500, emb), device, iters=iters)
    return (f"UNet step, batch 2, {latent * 8} px: eager {eager * 1000:.1f} ms, compiled {fast * 1000:.1f} ms "
            f"(**{eager / fast:.2f}x**; first call {first:.1f} s)")


def build_kandinsky(configs, device, dtype):
    from kandinsky.pipelines.combined import Kandinsky
    from kandinsky.pipelines.decoder import DecoderPipeline
    from kandinsky.sampling.schedule import NoiseSchedule

    with tempfile.TemporaryDirectory() as tmp:
        _, prior = prior_pipelines(configs, device, dtype, tmp)
    _, unet = reference_and_ours("unet", configs["unet"], dtype, device, seed=10)
    _, movq = reference_and_ours("movq", configs["movq"], dtype, device, seed=11)
    schedule = NoiseSchedule.from_folder(DATA / "kandinsky-2-2-decoder" / "scheduler")
    return Kandinsky(prior, DecoderPipeline(unet, movq, schedule))


@torch.no_grad()
def memory_section(configs, device, dtype, side, steps) -> list[str]:
    from kandinsky.offload import enable_offload

    lines = []
    for mode in (None, "model", "sequential"):
        pipe = build_kandinsky(configs, torch.device("cpu") if mode else device, dtype)
        if mode:
            enable_offload(pipe, mode=mode, device=device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        pipe.text2img(PROMPT, height=side, width=side, num_inference_steps=steps, prior_num_inference_steps=steps,
                      generator=torch.Generator(device).manual_seed(0), progress=False, output_type="pt")
        sync(device)
        took = time.perf_counter() - start
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else "n/a (CPU)"
        lines.append(f"| {mode or 'none'} | {side} px, {steps} + {steps} steps | {peak} | {took:.1f} |")
        del pipe
    return ["| offload | run | peak CUDA memory | seconds |", "| --- | --- | --- | --- |", *lines]


@torch.no_grad()
def preset_section(configs, device, dtype, side, dry: bool) -> list[str]:
    from kandinsky.pipelines.tasks import PRESETS

    pipe = build_kandinsky(configs, device, dtype)
    lines = ["| preset | values | seconds per image |", "| --- | --- | --- |"]
    for name in ("reference", "balanced", "fast"):
        overrides = dict(num_inference_steps=2, prior_num_inference_steps=2) if dry else {}
        run = lambda: pipe.text2img(PROMPT, preset=name, height=side, width=side, progress=False,  # noqa: E731
                                    generator=torch.Generator(device).manual_seed(0), output_type="pt", **overrides)
        s = seconds(run, device, warmup=1, iters=1)
        lines.append(f"| {name} | {PRESETS[name]} | {s:.2f} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny configs, 2 steps: check every code path")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    p.add_argument("--out", default="gpu_report.md")
    p.add_argument("--skip", nargs="*", default=[], choices=["text2img"], help="sections to leave out")
    args = p.parse_args(argv)
    quiet_reference_libraries()
    dry = args.dry_run
    if dry:
        torch.set_num_threads(1)  # tiny models: more threads only wait on each other
    skip = set(args.skip)
    device = torch.device(args.device or ("cpu" if dry else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; run with --dry-run on a CPU machine", file=sys.stderr)
        return 2
    configs = tiny_configs("decoder") if dry else full_configs("decoder")
    sizes = (64, 128) if dry else (512, 768)
    iters = 1 if dry else 5
    report = [f"# GPU check ({'DRY RUN: CPU, tiny configs' if dry else torch.cuda.get_device_name(device)})", "",
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}; "
              "random weights, hub configs" + (" (tiny)" if dry else ""), ""]

    def section(title, lines):
        report.extend([f"## {title}", "", *lines, ""])
        Path(args.out).write_text("\n".join(report))  # written as it goes
        print(f"{title}: done", file=sys.stderr, flush=True)

    rows = []
    for side in sizes if "text2img" not in skip else ():
        ns = SimpleNamespace(latent=side // 8, prior_steps=2 if dry else 25, decoder_steps=2 if dry else 50,
                             warmup=0 if dry else 1, iters=1 if dry else 2)
        with torch.no_grad():  # the yardstick: the reference's own pixels in float32
            floor = text2img_calls(configs, ns, device, torch.float32)["ref"]()[0].float().cpu()
        for dtype_name in DTYPES_RUN:
            row = bench_text2img(configs, ns, device, DTYPES[dtype_name], floor=floor)
            row["extra"] = f"{dtype_name}; {row['extra']}"
            rows.append(row)
    section("text2img, ours against diffusers (prior 25 + decoder 50 steps, guidance 4)", [markdown(rows), "",
            "Random weights amplify rounding through the chain: compare ours' distance from the fp32 reference "
            "with the reference's own (notes); a real difference is one far larger than the reference's."])
    section("UNet step: FLOPs and TFLOP/s",
            [f"- {name}: {flops_section(configs, device, DTYPES[name], sizes[0] // 8, iters)}" for name in DTYPES_RUN])
    backend = "eager" if dry else "inductor"  # the dry run checks the path, not the C++ / Triton code generation
    section(f"torch.compile on / off (backend {backend})",
            [f"- {name}: {compile_section(configs, device, DTYPES[name], sizes[0] // 8, iters, backend)}"
             for name in DTYPES_RUN])
    section("Peak memory per offload mode (fp16)", memory_section(configs, device, DTYPES["fp16"], sizes[1],
                                                                  2 if dry else 10))
    section("Presets: fast against reference (fp16, 512 px; time per image)",
            preset_section(configs, device, DTYPES["fp16"], sizes[0], dry))
    print(Path(args.out).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
