"""Time to a good picture (issue 21): decoder configurations' accuracy against their time per image.

    nice -n 10 python benchmarks/pareto.py --n 64 --seeds 0 --out pareto.jsonl       (CPU: a small table)
    python benchmarks/pareto.py --n 256 --seeds 0 1 --sizes 512 768 --out pareto.jsonl  (the full table)
    python benchmarks/pareto.py --table pareto.jsonl                               (Markdown from a results file)

For every decoder configuration (sampler x steps x cache interval / level x guidance interval):

* **accuracy**: the shipped shapes model (kandinsky/demo_weights, 64 px) on ``--n`` random prompts of
  its grammar per seed (kandinsky.data.evaluate: the prior at 25 steps, guidance 4, shared by every
  configuration; the decoder configuration; the analyser's score per attribute and their mean);
* **time per image**: the configuration's UNet evaluations, counted by hooks while it runs (full or
  cached at a level; batch 2 when guided, 1 when not), each costed with the measured time of that
  evaluation on the full-size UNet (hub config, random weights) at ``--sizes`` px, plus the prior
  stage (25 steps, guidance 4, prefix cache) and one MoVQ decode, measured in the same run.

Both are shown relative to the reference's default configuration (DDPM, 100 steps, guidance 4,
prior 25 steps), which is also a row. The Pareto front (no other row is both faster and more
accurate on the mean) is marked. Results are appended to ``--out`` (JSON lines) as each
configuration finishes, so a stopped run keeps what it measured; ``--table`` prints the Markdown.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kandinsky.calls import BRANCHES_GUIDED, current_call  # noqa: E402

REFERENCE = dict(name="reference", sampler="ddpm", steps=100)
# (name, sampler, steps, cache_interval, cache_level, guidance_interval); guidance 4 everywhere.
CONFIGS = [
    ("reference", "ddpm", 100, 1, 1, None),
    ("dpmpp_2m 20", "dpmpp_2m", 20, 1, 1, None),
    ("dpmpp_2m 20, cache 2", "dpmpp_2m", 20, 2, 1, None),
    ("dpmpp_2m 15", "dpmpp_2m", 15, 1, 1, None),
    ("dpmpp_2m 15, cache 2", "dpmpp_2m", 15, 2, 1, None),
    ("dpmpp_2m 20, guidance (0, 0.6)", "dpmpp_2m", 20, 1, 1, (0.0, 0.6)),
    ("dpmpp_2m 20, cache 2, guidance (0, 0.6)", "dpmpp_2m", 20, 2, 1, (0.0, 0.6)),
    ("dpmpp_2m 10", "dpmpp_2m", 10, 1, 1, None),
    ("dpmpp_2m 20, cache 2 at level 2", "dpmpp_2m", 20, 2, 2, None),
    ("dpmpp_2m 20, cache 3", "dpmpp_2m", 20, 3, 1, None),
    ("dpmpp_2m 15, cache 2, guidance (0, 0.6)", "dpmpp_2m", 15, 2, 1, (0.0, 0.6)),
    ("dpmpp_2m 20, guidance (0.1, 0.7)", "dpmpp_2m", 20, 1, 1, (0.1, 0.7)),
    ("unipc 15", "unipc", 15, 1, 1, None),
    ("dpmpp_2m 30", "dpmpp_2m", 30, 1, 1, None),
    ("ddim 50", "ddim", 50, 1, 1, None),
    ("dpmpp_2m 30, guidance (0, 0.6)", "dpmpp_2m", 30, 1, 1, (0.0, 0.6)),
    ("dpmpp_2m 30, cache 2, guidance (0, 0.6)", "dpmpp_2m", 30, 2, 1, (0.0, 0.6)),
    ("dpmpp_2m 20, cache 3, guidance (0, 0.6)", "dpmpp_2m", 20, 3, 1, (0.0, 0.6)),
    ("dpmpp_2m 10, guidance (0, 0.6)", "dpmpp_2m", 10, 1, 1, (0.0, 0.6)),
    ("dpmpp_2m 20, cache 2, guidance (0, 0.5)", "dpmpp_2m", 20, 2, 1, (0.0, 0.5)),
    ("ddpm 50", "ddpm", 50, 1, 1, None),
]
PRIOR_STEPS, GUIDANCE = 25, 4.0


# ----------------------------------------------------------------------------- accuracy


def count_evaluations(unet, level: int):
    """Pre-hook on the UNet's conv_in: one entry per evaluation, (kind, guided) with kind "full" or
    "cached k" (the levels above a cut at ``level``). -> (list, remove())."""
    seen = []

    def hook(module, args):
        call = current_call()
        guided = call is not None and tuple(call.branches) == BRANCHES_GUIDED
        kind = f"cached {level}" if call is not None and call.cached else "full"
        seen.append((kind, guided))

    handle = unet.conv_in.register_forward_pre_hook(hook)
    return seen, handle.remove



@torch.no_grad()
def accuracy(prior, decoder, config, n: int, seed: int, embeddings, batch: int = 16) -> dict:
    from kandinsky.data.evaluate import IMAGE_SIZE, random_prompts, score

    name, sampler, steps, interval, level, guidance_interval = config
    items = random_prompts(n, seed)
    embeds, negatives = embeddings
    g = torch.Generator().manual_seed(seed)
    seen, remove = count_evaluations(decoder.unet, level)
    pictures, batches = [], 0
    try:
        for start in range(0, n, batch):
            out = decoder.text2img(embeds[start:start + batch], negatives[start:start + batch], height=IMAGE_SIZE,
                                   width=IMAGE_SIZE, num_inference_steps=steps, guidance_scale=GUIDANCE, generator=g,
                                   scheduler=sampler, progress=False, cache_interval=interval, cache_level=level,
                                   guidance_interval=guidance_interval)
            pictures += list(out.images)
            batches += 1
    finally:
        remove()
    report = score(pictures, [stated for _, stated in items])
    per_run = {}
    for key in seen:  # every batch runs the same sequence of evaluations
        per_run[f"{key[0]}, {'guided' if key[1] else 'single'}"] = per_run.get(
            f"{key[0]}, {'guided' if key[1] else 'single'}", 0) + 1 / batches
    acc = report["accuracy"]
    return {"accuracy": acc, "mean": statistics.fmean(acc.values()), "evaluations": per_run}


def shapes_models():
    from kandinsky.demo import demo_folders
    from kandinsky.pipelines.decoder import DecoderPipeline
    from kandinsky.pipelines.prior import PriorPipeline

    folders = demo_folders()
    return PriorPipeline.from_pretrained(folders["prior"]), DecoderPipeline.from_pretrained(folders["decoder"])


# ----------------------------------------------------------------------------- time


def median_time(fn, warmup: int = 1, iters: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def unet_times(size: int, levels, iters: int) -> dict:
    """Seconds of one full-size UNet evaluation: {"full, guided": batch 2, "full, single": batch 1,
    "cached k, guided" / "cached k, single": the levels above a cut at k on stored deep features}."""
    from benchmarks.bench_components import full_configs
    from benchmarks.bench_stages import reference_and_ours
    from kandinsky.unet.model import DeepCache

    _, unet = reference_and_ours("unet", full_configs("decoder")["unet"], torch.float32, "cpu", seed=10)
    latent = size // 8
    out = {}
    for guided, batch in (("guided", 2), ("single", 1)):
        x = torch.randn(batch, 4, latent, latent, generator=torch.Generator().manual_seed(0))
        emb = torch.randn(batch, unet.config.encoder_hid_dim, generator=torch.Generator().manual_seed(1))
        out[f"full, {guided}"] = median_time(lambda: unet(x, 500, emb), iters=iters)
        for level in levels:
            cache = DeepCache(level)
            unet.forward_cached(x, 500, emb, None, cache)  # fills the cache
            out[f"cached {level}, {guided}"] = median_time(lambda: unet.forward_cached(x, 500, emb, None, cache),
                                                           iters=iters)
        print(f"  UNet {size} px {guided}: " + ", ".join(f"{k} {v:.2f} s" for k, v in out.items()), file=sys.stderr)
    return out


@torch.no_grad()
def prior_and_movq_times(size: int, iters: int) -> dict:
    from benchmarks.bench_components import full_configs
    from benchmarks.bench_stages import PROMPT, prior_pipelines, reference_and_ours

    configs = full_configs("decoder")
    with tempfile.TemporaryDirectory() as tmp:
        _, prior = prior_pipelines(configs, "cpu", torch.float32, tmp)
    prior_s = median_time(lambda: prior(PROMPT, num_inference_steps=PRIOR_STEPS, guidance_scale=GUIDANCE,
                                        generator=torch.Generator().manual_seed(0), progress=False), iters=iters)
    del prior
    _, movq = reference_and_ours("movq", configs["movq"], torch.float32, "cpu", seed=11)
    latents = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(2))
    movq_s = median_time(lambda: movq.decode(latents, force_not_quantize=True), iters=iters)
    return {"prior stage": prior_s, "movq decode": movq_s}


@torch.no_grad()
def unet_flops(size: int, levels) -> dict:
    """FLOPs of one full-size UNet evaluation (torch.utils.flop_counter on the meta device: no weights,
    no time): {"full, guided": batch 2, "full, single": batch 1, "cached k, ...": the levels above a cut at k}."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.bench_components import full_configs
    from kandinsky.unet.model import DeepCache
    from weights_convert import build_model

    with torch.device("meta"):
        unet = build_model({"_class_name": "UNet2DConditionModel", **full_configs("decoder")["unet"]})
    out = {}
    for guided, batch in (("guided", 2), ("single", 1)):
        x = torch.empty(batch, 4, size // 8, size // 8, device="meta")
        emb = torch.empty(batch, unet.config.encoder_hid_dim, device="meta")
        t = torch.full((batch,), 500, device="meta")
        for level in [None, *levels]:
            cache = DeepCache(level or 1)
            if level is not None:
                unet.forward_cached(x, t, emb, None, cache)  # fills the cache
            counter = FlopCounterMode(display=False)
            with counter:
                unet(x, t, emb) if level is None else unet.forward_cached(x, t, emb, None, cache)
            out[f"{'full' if level is None else f'cached {level}'}, {guided}"] = counter.get_total_flops()
    return out


def modelled_times(size: int, levels, unet_step: float, prior: float, movq: float) -> dict:
    """Seconds from measured stage times (a full UNet step at batch 2, the prior stage, a MoVQ decode of one
    image) and the FLOP ratios of the other evaluations to the full batch-2 one (time taken as proportional
    to FLOPs: an assumption, checked against measured evaluations where they exist)."""
    flops = unet_flops(size, levels)
    times = {key: unet_step * f / flops["full, guided"] for key, f in flops.items()}
    return {"prior stage": prior, "movq decode": movq, **times}


def seconds(evaluations: dict, times: dict) -> float:
    return times["prior stage"] + times["movq decode"] + sum(count * times[key] for key, count in evaluations.items())


# ----------------------------------------------------------------------------- table


def table(lines: list[dict]) -> str:
    """Markdown: one row per configuration (accuracy averaged over the seeds measured), relative time per size."""
    timing = {line["size"]: line["times"] for line in lines if line["kind"] == "times"}
    runs = {}
    for line in lines:
        if line["kind"] == "accuracy":
            runs.setdefault(line["name"], []).append(line)
    if "reference" not in runs or not timing:
        return "(no reference row or no timing yet)"
    sizes = sorted(timing)

    def summary(name, seeds=None):
        rows = [r for r in runs[name] if seeds is None or r["seed"] in seeds]
        attrs = rows[0]["accuracy"].keys()
        acc = {a: statistics.fmean(r["accuracy"][a] for r in rows) for a in attrs}
        return acc, statistics.fmean(r["mean"] for r in rows), rows[0]["evaluations"], sorted(r["seed"] for r in rows)

    ref_acc, ref_mean, ref_evals, _ = summary("reference")
    ref_time = {s: seconds(ref_evals, timing[s]) for s in sizes}
    rows, deltas = [], {}
    for name in runs:
        acc, mean, evals, seeds = summary(name)
        if any(r["seed"] not in seeds for r in runs["reference"]):  # compare on the seeds this row has
            deltas[name] = summary("reference", set(seeds))[:2]
        rel = {s: seconds(evals, timing[s]) / ref_time[s] for s in sizes}
        rows.append((name, acc, mean, evals, seeds, rel))
    first = sizes[0]
    front = {name for name, _, mean, _, _, rel in rows
             if not any(r[first] <= rel[first] and m >= mean and (r[first] < rel[first] or m > mean)
                        for n2, _, m, _, _, r in rows if n2 != name)}
    attrs = list(ref_acc)
    head = (["configuration", "UNet evaluations (x batch)"] + [f"time / ref ({s} px)" for s in sizes]
            + [f"{a} (pts vs ref)" for a in attrs] + ["mean (pts vs ref)", "seeds", "Pareto (mean)"])
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, acc, mean, evals, seeds, rel in sorted(rows, key=lambda r: r[5][first]):
        units = sum(c * (2 if k.endswith("guided") else 1) for k, c in evals.items())
        cached = sum(c for k, c in evals.items() if k.startswith("cached"))
        evals_text = f"{sum(evals.values()):.0f} ({units:.0f})" + (f", {cached:.0f} cached" if cached else "")
        base_acc, base_mean = deltas.get(name, (ref_acc, ref_mean))  # the reference on the same seeds
        cells = [name, evals_text] + [f"{rel[s]:.3f}" for s in sizes]
        cells += [f"{acc[a]:.3f} ({100 * (acc[a] - base_acc[a]):+.1f})" for a in attrs]
        cells += [f"{mean:.3f} ({100 * (mean - base_mean):+.1f})", ",".join(map(str, seeds)),
                  "**front**" if name in front else ""]
        out.append("| " + " | ".join(cells) + " |")
    times = "; ".join(f"{s} px: " + ", ".join(f"{k} {v:.2f} s" for k, v in timing[s].items()) for s in sizes)
    sources = {line.get("source", "measured in the run") for line in lines if line["kind"] == "times"}
    return "\n".join(out) + f"\n\nFull-size seconds per stage and evaluation ({'; '.join(sorted(sources))}): {times}."


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=256, help="prompts per seed (the full table: 256)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 768], help="full-size UNet timing sizes (px)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for the full-size timing")
    p.add_argument("--iters", type=int, default=2, help="timed passes per full-size measurement (median)")
    p.add_argument("--configs", nargs="+", default=None, help="names of CONFIGS to run (default: all)")
    p.add_argument("--out", default="pareto.jsonl", help="results, one JSON line per measurement (appended)")
    p.add_argument("--skip-timing", action="store_true", help="accuracy only (timing lines already in --out)")
    p.add_argument("--timing-only", action="store_true", help="the full-size timing only (no accuracy runs)")
    p.add_argument("--stage-seconds", type=float, nargs=3, metavar=("UNET_STEP", "PRIOR", "MOVQ"), default=None,
                   help="instead of timing the full-size models here: seconds of a full UNet step at batch 2, "
                        "the prior stage (25 steps) and a one-image MoVQ decode at --sizes[0] px, measured before "
                        "(benchmarks/bench_stages.py); the other evaluations are costed by their FLOP ratio")
    p.add_argument("--table", metavar="RESULTS", default=None, help="print the Markdown table of a results file")
    args = p.parse_args(argv)
    if args.table:
        print(table([json.loads(line) for line in Path(args.table).read_text().splitlines() if line.strip()]))
        return 0
    torch.set_num_threads(1)  # the shapes model is tiny: more threads only wait on each other (20x the CPU time
    # on a busy 2-core machine); the full-size timing sets its own count
    out = Path(args.out)

    def write(line):
        with out.open("a") as f:
            f.write(json.dumps(line) + "\n")

    configs = [c for c in CONFIGS if (args.configs is None or c[0] in args.configs) and not args.timing_only]
    from kandinsky.data.evaluate import embed_prompts, random_prompts

    prior, decoder = shapes_models() if configs else (None, None)

    levels = sorted({c[4] for c in CONFIGS if c[3] > 1})
    if args.stage_seconds:
        write({"kind": "times", "size": args.sizes[0], "source": "stage seconds and FLOP ratios",
               "times": modelled_times(args.sizes[0], levels, *args.stage_seconds)})
    elif not args.skip_timing:  # first: a stopped run then still has its costs
        torch.set_num_threads(args.threads)
        for size in args.sizes:
            times = prior_and_movq_times(size, args.iters)
            times.update(unet_times(size, levels, args.iters))
            write({"kind": "times", "size": size, "times": times})
        torch.set_num_threads(1)
    for seed in args.seeds if configs else ():
        prompts = [text for text, _ in random_prompts(args.n, seed)]
        embeddings = embed_prompts(prior, prompts, seed, PRIOR_STEPS, GUIDANCE, 16)
        for config in configs:
            start = time.perf_counter()
            result = accuracy(prior, decoder, config, args.n, seed, embeddings)
            write({"kind": "accuracy", "name": config[0], "config": config, "seed": seed, "n": args.n, **result})
            print(f"{config[0]} seed {seed}: mean {result['mean']:.3f} ({time.perf_counter() - start:.0f} s)",
                  file=sys.stderr)
    print(table([json.loads(line) for line in out.read_text().splitlines() if line.strip()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
