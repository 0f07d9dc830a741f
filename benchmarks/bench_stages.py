"""Kandinsky 2.2 stage by stage, ours against the reference, full-size configs, random weights.

    nice -n 10 python benchmarks/bench_stages.py --quick                # CPU, fp32, small sizes
    python benchmarks/bench_stages.py --dtype bf16 --stages unet_step,movq_decode
    python benchmarks/bench_stages.py --device cuda --dtype fp16 --out docs/performance-cuda.md

Stages (``STAGES``): CLIP text encode, CLIP image encode, the prior stage (PriorPipeline vs
diffusers' KandinskyV22PriorPipeline, N steps with guidance, our prefix cache on and off),
one UNet step (batch 2 = one guided pair), MoVQ decode and encode, and loading a component
from fp16 safetensors (wall time and peak RSS, each load in a fresh process).

The models are the real hub configs (tests/data) with random weights (fan-in scaled, as in
bench_components.py); the reference is built without its default init (every weight is
overwritten anyway) and **ours shares the reference's weight tensors** (renamed, not
copied), so one copy of each model is in memory. Ours and the reference are timed
alternately in one process (ref, ours, ours, ref, ...); the table shows medians,
ours/reference, and max |ours - ref| / max |ref| of the outputs.

The prior stage's pipelines share the real text encoder and prior; their image encoder is a
tiny CLIP vision tower with the real projection size (it only makes the zero-image
negative embedding; the full tower is timed as "image encode").

The whole text2img (``text2img``): diffusers' KandinskyV22PriorPipeline + KandinskyV22Pipeline
against our Kandinsky, prior 25 + decoder 50 steps with guidance 4 (``--quick``: 5 + 5), the
final pixels compared.

``--quick``: 256 px UNet and MoVQ, 5 prior steps, 1 warmup and 3 timed passes, loading of
the MoVQ and the prior only. ``--out FILE`` writes the Markdown table (with the machine).

``--every-stage`` (issue 21 item 4): one run of ``EVERY_STAGE``, every stage at the size and batch the
pipelines use it, with this machine's measured throughput (the hardware probes: a lone large 3x3
convolution and a lone large matrix product, GFLOP/s, timed alone at the start and again interleaved
with every stage's passes, so that a stage and its yardstick share the machine's load) and, per stage,
its FLOPs (torch.utils.flop_counter on our model on the meta device), the GFLOP/s each implementation
achieves on that work, and its **share of the hardware**: the time the stage's convolution FLOPs
would take at the conv probe's rate plus its matmul / attention FLOPs at the matmul probe's rate,
divided by the measured time (1.0 = as fast as the plain kernels; what is left is norms,
activations, copies, memory-bound small products and Python). 768 px UNet steps are costed, not timed, unless
``--unet-sizes`` asks for them: the 512 px time times the FLOP ratio (the ``costed`` rows say so).

    python benchmarks/bench_stages.py --every-stage --threads 1 --out stages.md
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_components import (  # noqa: E402
    DATA, DTYPES, build_reference, fill_random_, full_configs, make_case, quiet_reference_libraries, rel_diff,
    time_pair, tiny_configs,
)
from weights_convert import build_model, convert_state_dict, skip_init  # noqa: E402

STAGES = ("hardware", "text_encode", "image_encode", "prior_step", "prior_stage", "unet_step", "movq_decode",
          "movq_encode", "text2img", "load")
COMPONENT = {"text_encode": "clip_text", "image_encode": "clip_image", "prior_step": "prior", "unet_step": "unet",
             "movq_decode": "movq_decode", "movq_encode": "movq_encode"}
# --every-stage: (stage, batch, latent side, warmup, timed passes), each at the batch the pipelines run it
# with; few passes (medians; of 2 = their mean), as the whole run does ~30 TFLOP: ~15 minutes on 2 quiet
# cores, 30-40 on a loaded machine with --threads 1.
EVERY_STAGE = (
    ("hardware", None, None, 1, 5),
    ("text_encode", 2, None, 1, 3),  # the prompt and the empty negative prompt
    ("image_encode", 1, None, 1, 2),
    ("prior_step", 2, None, 1, 2),  # one guided step: conditional and unconditional
    ("prior_stage", 1, None, 0, 1),  # 25 steps, text encoding included; one pass each
    ("unet_step", 1, 64, 1, 2),  # 512 px: unguided (cached, or outside a guidance interval)
    ("unet_step", 2, 64, 0, 1),  # 512 px: one guided pair (warm from the batch-1 passes)
    ("movq_decode", 1, 64, 0, 2),  # one 512 px image
)
COSTED_SIZES = (768,)  # --every-stage: UNet step sizes costed from the largest timed one by FLOP ratio
CLASS_KEYS = {"clip_text": {"architectures": ["CLIPTextModelWithProjection"]},
              "clip_image": {"architectures": ["CLIPVisionModelWithProjection"]},
              "prior": {"_class_name": "PriorTransformer"}, "unet": {"_class_name": "UNet2DConditionModel"},
              "movq": {"_class_name": "VQModel"}}
LOAD = {"movq": "VQModel", "prior": "PriorTransformer", "unet": "UNet2DConditionModel",
        "text_encoder": "CLIPTextModelWithProjection", "image_encoder": "CLIPVisionModelWithProjection"}


# ----------------------------------------------------------------------------- models


def reference_and_ours(component: str, config: dict, dtype, device, seed: int = 0):
    """(reference, ours): random weights, ours holding the very same tensors."""
    with skip_init(), torch.device(device):  # fill_random_ overwrites every weight
        ref = build_reference(component, dict(config))
    ref = ref.to(dtype).eval()
    fill_random_(ref, seed)
    config = {**CLASS_KEYS[component.split("_")[0] if component.startswith("movq") else component], **config}
    with torch.device("meta"):
        ours = build_model(config)
    ours.load_state_dict(convert_state_dict(config, ref.state_dict()), assign=True)
    return ref, ours.eval()


# ----------------------------------------------------------------------------- stages


def bench_model_stage(stage: str, configs: dict, args, device, dtype, models=None) -> dict:
    """One forward pass of a component, ours against the reference (``models``: a (ref, ours) pair to
    reuse, e.g. the UNet across sizes)."""
    component = COMPONENT[stage]
    config = configs["movq"] if component.startswith("movq") else configs[component]
    ref, ours = models or reference_and_ours(component, config, dtype, device)
    case = make_case(component, config, args.batch, args.latent, device, dtype)
    fns = {"ref": lambda: case.ref_call(ref, case.inputs), "ours": lambda: case.ours_call(ours, case.inputs)}
    with torch.no_grad():
        times, outputs, rates = timed(fns, device, dtype, args)
    r = row(stage, case.shape, times, rel_diff(outputs["ours"], outputs["ref"]))
    r.update(gflops=rates, flops=model_flops(component, config, args.batch, args.latent, dtype))
    r["ref_flops"] = r["flops"]
    return r


# ----------------------------------------------------------------------------- FLOPs and the hardware

# CPU attention (no formula in torch.utils.flop_counter): the same count as the fused GPU kernels
_CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
             lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)}


def count_flops(fn) -> dict:
    """FLOPs of ``fn()`` by kind: {"conv": convolutions, "matmul": matrix products and attention}."""
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_SDPA)
    with counter, torch.no_grad():
        fn()
    counts = counter.get_flop_counts().get("Global", {})
    conv = sum(n for op, n in counts.items() if "conv" in str(op))
    return {"conv": conv, "matmul": sum(counts.values()) - conv}


def model_flops(component: str, config: dict, batch: int, latent: int, dtype) -> dict:
    """FLOPs of one of our forward passes, counted on the meta device (no weights, no time)."""
    config = {**CLASS_KEYS[component.split("_")[0] if component.startswith("movq") else component], **config}
    with torch.device("meta"):
        ours = build_model(config).to(dtype).eval()
    case = make_case(component, config, batch, latent, "meta", dtype)
    return count_flops(lambda: case.ours_call(ours, case.inputs))


def prior_cached_flops(config: dict, steps: int, dtype) -> dict:
    """FLOPs of our prior's prefix cache on a guided pair: ``prefix`` once, ``forward_cached`` per step."""
    with torch.device("meta"):
        prior = build_model({**CLASS_KEYS["prior"], **config}).to(dtype).eval()
    x = make_case("prior", config, 2, None, "meta", dtype).inputs

    def stage():
        prefix = prior.prefix(x["proj"], x["text"], x["mask"])
        for _ in range(steps):
            prior.forward_cached(x["hidden"], x["t"], prefix)

    return count_flops(stage)


def add_flops(*parts: tuple[float, dict]) -> dict:
    """sum of weight * flops over (weight, {kind: flops}) pairs."""
    return {kind: sum(w * f[kind] for w, f in parts) for kind in ("conv", "matmul")}


PROBE_INPUT = "conv 3x3 512->512 on (1, 512, 64, 64); matmul (2048, 1280) @ (1280, 5120)"


def hardware_probes(device, dtype) -> dict:
    """{"conv probe": a lone large 3x3 convolution (512 -> 512 channels on 64 x 64, the UNet's and MoVQ's
    kind of work), "matmul probe": a lone large matrix product (2048 x 1280 @ 1280 x 5120, a CLIP MLP's)}."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 512, 64, 64, generator=g).to(device, dtype)
    w = torch.randn(512, 512, 3, 3, generator=g).to(device, dtype) / 48
    a = torch.randn(2048, 1280, generator=g).to(device, dtype)
    b = torch.randn(1280, 5120, generator=g).to(device, dtype)
    return {"conv probe": lambda: (torch.nn.functional.conv2d(x, w, padding=1),), "matmul probe": lambda: (a @ b,)}


def timed(fns: dict, device, dtype, args) -> tuple[dict, dict, dict | None]:
    """time_pair over ``fns``, with the hardware probes interleaved among them when ``args.probes``
    (--every-stage), so that each stage's share of the hardware is measured under the load it ran
    under. -> (times, outputs, probe GFLOP/s {"conv", "matmul"} or None)."""
    probes = hardware_probes(device, dtype) if args.probes else {}
    times, outputs = time_pair({**fns, **probes}, device, args.warmup, args.iters)
    if not probes:
        return times, outputs, None
    rates = {name.split()[0]: sum(count_flops(fn).values()) / statistics.median(times[name]) / 1e9
             for name, fn in probes.items()}
    return times, outputs, rates


@torch.no_grad()
def bench_hardware(args, device, dtype) -> dict:
    """This machine's throughput on the hardware probes alone, GFLOP/s, medians of ``args.iters``."""
    a = copy.copy(args)
    a.probes = True
    _, _, rates = timed({}, device, dtype, a)
    return {"stage": "hardware", "input": PROBE_INPUT, "gflops": rates,
            "extra": f"alone, at the start (medians of {args.iters})"}


def prior_pipelines(configs: dict, device, dtype, tmp: str):
    """(diffusers' KandinskyV22PriorPipeline, our PriorPipeline) on the same prior and text encoder.
    Their image encoder is a tiny CLIP vision tower with the real projection size (it only makes the
    zero-image negative embedding; the full tower is timed as "image encode")."""
    from diffusers import KandinskyV22PriorPipeline, UnCLIPScheduler
    from transformers import CLIPImageProcessor, CLIPTokenizer

    from kandinsky.clip.preprocess import ImagePreprocessor
    from kandinsky.clip.tokenizer import Tokenizer
    from kandinsky.pipelines.prior import PriorPipeline
    from kandinsky.sampling.schedule import NoiseSchedule
    from tests.refs.prior_pipeline import write_tiny_clip_tokenizer

    folder = DATA / "kandinsky-2-2-prior"
    tiny_vision = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1,
                   "image_size": 224, "patch_size": 32,  # the real image processor's crop
                   "projection_dim": configs["clip_image"]["projection_dim"], "hidden_act": "gelu",
                   "architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model"}
    parts = {name: reference_and_ours(name, cfg, dtype, device, seed)
             for seed, (name, cfg) in enumerate([("prior", configs["prior"]), ("clip_text", configs["clip_text"]),
                                                 ("clip_image", tiny_vision)])}
    tok = write_tiny_clip_tokenizer(Path(tmp) / "tokenizer")
    ref = KandinskyV22PriorPipeline(
        prior=parts["prior"][0], text_encoder=parts["clip_text"][0], image_encoder=parts["clip_image"][0],
        tokenizer=CLIPTokenizer.from_pretrained(tok),
        scheduler=UnCLIPScheduler.from_pretrained(folder / "scheduler"),
        image_processor=CLIPImageProcessor.from_pretrained(folder / "image_processor"))
    ours = PriorPipeline(
        prior=parts["prior"][1], text_encoder=parts["clip_text"][1], image_encoder=parts["clip_image"][1],
        tokenizer=Tokenizer.from_folder(tok), scheduler=NoiseSchedule.from_folder(folder / "scheduler"),
        image_processor=ImagePreprocessor.from_folder(folder / "image_processor"))
    ref.set_progress_bar_config(disable=True)
    return ref, ours


PROMPT = "a red cat, 4k photo"


def bench_prior_stage(configs: dict, args, device, dtype) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        ref, ours = prior_pipelines(configs, device, dtype, tmp)
    steps = args.prior_steps

    def run(pipe, **kw):
        out = pipe(PROMPT, num_inference_steps=steps, guidance_scale=4.0,
                   generator=torch.Generator(device).manual_seed(0), **kw)
        return (out.image_embeds,)

    fns = {"ref": lambda: run(ref, output_type="pt"), "ours": lambda: run(ours, progress=False),
           "ours_nocache": lambda: run(ours, progress=False, cache=False)}
    if not args.prior_nocache:
        del fns["ours_nocache"]
    with torch.no_grad():
        times, outputs, rates = timed(fns, device, dtype, args)
    shape = f"1 prompt, {steps} steps, guidance 4"
    # the work (on the meta device): the text encoding of the prompt and the negative prompt, then every
    # step on the guided pair, whole (the reference; ours with cache=False) or the prefix once and the
    # 3 step tokens per step (ours)
    text = model_flops("clip_text", configs["clip_text"], 2, None, dtype)
    uncached = add_flops((1, text), (steps, model_flops("prior", configs["prior"], 2, None, dtype)))
    rows = [row("prior_stage", shape, times, rel_diff(outputs["ours"], outputs["ref"]))]
    rows[0].update(flops=add_flops((1, text), (1, prior_cached_flops(configs["prior"], steps, dtype))),
                   ref_flops=uncached, gflops=rates)
    if args.prior_nocache:
        rows.append(row("prior_stage (cache=False)", shape, {"ref": times["ref"], "ours": times["ours_nocache"]},
                        rel_diff(outputs["ours_nocache"], outputs["ref"])))
        rows[1].update(flops=uncached, ref_flops=uncached, gflops=rates)
    return rows


def text2img_calls(configs: dict, args, device, dtype) -> dict:
    """{"ref": diffusers' two pipelines, "ours": our Kandinsky}, each a call -> (pixels in [0, 1],):
    prompt -> prior (guided) -> decoder UNet (guided) -> MoVQ decode, the same weights and seeds."""
    from diffusers import DDPMScheduler, KandinskyV22Pipeline

    from kandinsky.pipelines.combined import Kandinsky
    from kandinsky.pipelines.decoder import DecoderPipeline
    from kandinsky.sampling.schedule import NoiseSchedule

    with tempfile.TemporaryDirectory() as tmp:
        ref_prior, our_prior = prior_pipelines(configs, device, dtype, tmp)
    ref_unet, our_unet = reference_and_ours("unet", configs["unet"], dtype, device, seed=10)
    ref_movq, our_movq = reference_and_ours("movq", configs["movq"], dtype, device, seed=11)
    folder = DATA / "kandinsky-2-2-decoder" / "scheduler"
    ref_decoder = KandinskyV22Pipeline(unet=ref_unet, movq=ref_movq, scheduler=DDPMScheduler.from_pretrained(folder))
    ref_decoder.set_progress_bar_config(disable=True)
    ours = Kandinsky(our_prior, DecoderPipeline(our_unet, our_movq, NoiseSchedule.from_folder(folder)))
    side = args.latent * 8

    def ref_call():
        g = torch.Generator(device).manual_seed(0)
        embeds = ref_prior(PROMPT, num_inference_steps=args.prior_steps, guidance_scale=4.0, generator=g,
                           output_type="pt")
        image = ref_decoder(image_embeds=embeds.image_embeds, negative_image_embeds=embeds.negative_image_embeds,
                            height=side, width=side, num_inference_steps=args.decoder_steps, guidance_scale=4.0,
                            generator=g, output_type="np").images  # "pt" would skip the [0, 1] scaling
        return (torch.from_numpy(image).permute(0, 3, 1, 2),)

    def ours_call():
        g = torch.Generator(device).manual_seed(0)
        image = ours.text2img(PROMPT, prior_num_inference_steps=args.prior_steps, prior_guidance_scale=4.0, height=side,
                              width=side, num_inference_steps=args.decoder_steps, guidance_scale=4.0, generator=g,
                              output_type="pt", progress=False).images
        return (image,)

    return {"ref": ref_call, "ours": ours_call}


def bench_text2img(configs: dict, args, device, dtype, floor: torch.Tensor | None = None) -> dict:
    """The whole chain, diffusers' pipelines against our Kandinsky (text2img_calls), timed alternately.

    The notes give the mean |ours - ref| of the pixels besides the max. ``floor``: the reference's pixels
    in float32 on the same weights and seeds; then the notes also give each side's distance from them,
    the yardstick of a low-precision run (random weights amplify rounding: a difference from the
    reference is a bug only where it is far larger than the reference's own distance from float32)."""
    with torch.no_grad():
        times, outputs = time_pair(text2img_calls(configs, args, device, dtype), device, args.warmup, args.iters)
    shape = f"1 prompt, prior {args.prior_steps} + decoder {args.decoder_steps} steps, {args.latent * 8} px, guidance 4"
    r = row("text2img", shape, times, rel_diff(outputs["ours"], outputs["ref"]))
    ours, ref = outputs["ours"][0], outputs["ref"][0]
    r["extra"] = f"mean abs pixel diff {(ours - ref).abs().mean():.1e}"
    if floor is not None:
        r["extra"] += "; from the fp32 reference, max / mean: " + ", ".join(
            f"{name} {(x - floor).abs().max():.2f} / {(x - floor).abs().mean():.1e}" for name, x in
            (("ref", ref), ("ours", ours)))
    return r


LOAD_CHILD = r"""
import json, resource, sys, time, torch

def peak_rss_kib():
    # VmHWM: this process's own high-water mark (ru_maxrss of an exec'd child starts at its
    # parent's RSS at fork time, which here holds the models that wrote the checkpoint)
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

which, folder, kind = sys.argv[1], sys.argv[2], sys.argv[3]
if which == "ours":
    from weights_convert import build_model, load_component, read_config
    with torch.device("meta"):
        build_model(read_config(folder))  # imports the model's modules, as diffusers' lookup does below
else:
    import diffusers, transformers
    cls = getattr(diffusers, kind, None) or getattr(transformers, kind)
before = peak_rss_kib()
t = time.perf_counter()
if which == "ours":
    model = load_component(folder, dtype=torch.float16)
else:
    model = cls.from_pretrained(folder, torch_dtype=torch.float16)
seconds = time.perf_counter() - t
# memory-mapped weights are read from disk only when touched: touch every page (as a first use would)
for p in list(model.parameters()) + list(model.buffers()):
    float(p.detach().reshape(-1)[::512].float().sum())
touched = time.perf_counter() - t
peak = peak_rss_kib()
print(json.dumps({"seconds": seconds, "touched": touched, "rss_mib": (peak - before) / 1024, "peak_mib": peak / 1024}))
"""


def bench_load(configs: dict, args) -> list[dict]:
    """Each component written once as fp16 safetensors, then loaded ref / ours / ours / ref in fresh processes."""
    rows = []
    names = {"movq": "movq", "prior": "prior", "unet": "unet", "text_encoder": "clip_text",
             "image_encoder": "clip_image"}
    for name in args.load:
        component = names[name]
        config = configs["movq"] if component == "movq" else configs[component]
        with tempfile.TemporaryDirectory() as tmp:
            ref, _ = reference_and_ours(component, config, torch.float16, "cpu")
            ref.save_pretrained(tmp)
            weights = sum(p.numel() * p.element_size() for p in ref.parameters()) / 2**20
            del ref
            results = {"ref": [], "ours": []}
            for which in ("ref", "ours", "ours", "ref")[: 2 * max(1, args.load_iters)]:
                done = subprocess.run([sys.executable, "-c", LOAD_CHILD, which, tmp, LOAD[name]], cwd=ROOT,
                                      capture_output=True, text=True)
                if done.returncode:
                    raise RuntimeError(done.stderr[-2000:])
                results[which].append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = {k: {m: statistics.median(x[m] for x in v) for m in ("seconds", "touched", "rss_mib")}
             for k, v in results.items()}
        rows.append({"stage": f"load {name} (fp16 safetensors)", "input": f"{weights:,.0f} MiB of weights",
                     "ref_s": r["ref"]["seconds"], "ours_s": r["ours"]["seconds"], "rel_diff": None,
                     "extra": f"with every weight page touched: ref {r['ref']['touched']:.2f} s, ours "
                              f"{r['ours']['touched']:.2f} s; RSS growth ref {r['ref']['rss_mib']:,.0f} MiB "
                              f"({r['ref']['rss_mib'] / weights:.2f}x the weights), ours "
                              f"{r['ours']['rss_mib']:,.0f} MiB ({r['ours']['rss_mib'] / weights:.2f}x)"})
    return rows


def row(stage: str, shape: str, times: dict, diff: float | None) -> dict:
    return {"stage": stage, "input": shape, "ref_s": statistics.median(times["ref"]),
            "ours_s": statistics.median(times["ours"]), "rel_diff": diff, "extra": ""}


# ----------------------------------------------------------------------------- report


def environment(args) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import diffusers
    import transformers

    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    try:
        load = f"load average {os.getloadavg()[0]:.1f}; "
    except OSError:
        load = ""
    sizes = ("--every-stage (each stage's batch, size and passes in its row); " if args.every_stage else
             f"{'--quick; ' if args.quick else ''}batch {args.batch}, {args.latent * 8} px, "
             f"{args.warmup} warmup + {args.iters} timed passes each")
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {gpu or cpu}, {os.cpu_count()} CPU(s), "
            f"{torch.get_num_threads()} thread(s); {load}torch {torch.__version__}, diffusers "
            f"{diffusers.__version__}, transformers {transformers.__version__}; {args.device}, {args.dtype}; {sizes}")


def costed_rows(rows: list[dict], sizes, configs: dict, dtype) -> list[dict]:
    """UNet steps at ``sizes`` px costed from the largest timed UNet step of the same batch: its times
    times the FLOP ratio (the costing rule; attention grows faster than the convolutions, so this
    slightly flatters the larger size)."""
    out = []
    for batch in sorted({r["batch"] for r in rows if r["stage"] == "unet_step"}):
        timed = max((r for r in rows if r["stage"] == "unet_step" and r["batch"] == batch), key=lambda r: r["latent"])
        for side in sizes:
            flops = model_flops("unet", configs["unet"], batch, side // 8, dtype)
            f = sum(flops.values()) / sum(timed["flops"].values())
            out.append({**timed, "input": f"sample ({batch}, 4, {side // 8}, {side // 8})", "ref_s": timed["ref_s"] * f,
                        "ours_s": timed["ours_s"] * f, "rel_diff": None, "flops": flops, "ref_flops": flops,
                        "extra": f"costed: the {timed['latent'] * 8} px step x {f:.2f} (FLOP ratio)"})
    return out


def _g(flops: float) -> str:
    return f"{flops / 1e9:,.0f}" if flops >= 1e10 else f"{flops / 1e9:.2g}"


def markdown(rows: list[dict]) -> str:
    hardware = next((r["gflops"] for r in rows if r["stage"] == "hardware"), None)
    if hardware is None:
        lines = ["| stage | input | reference (s) | ours (s) | ours / ref | max diff / max | notes |",
                 "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            diff = "-" if r["rel_diff"] is None else f"{r['rel_diff']:.1e}"
            lines.append(f"| {r['stage']} | {r['input']} | {r['ref_s']:.3f} | {r['ours_s']:.3f} | "
                         f"{r['ours_s'] / r['ref_s']:.2f} | {diff} | {r['extra']} |")
        return "\n".join(lines)

    def at_peak(flops, rates):  # seconds at the lone kernels' rates
        return sum(flops[k] / (rates[k] * 1e9) for k in ("conv", "matmul"))

    lines = ["| stage | input | GFLOP (conv + matmul) | reference (s) | ours (s) | ours / ref | GFLOP/s ref / ours "
             "| probes' GFLOP/s (conv / matmul) | share of hardware ref / ours | max diff / max | notes |",
             "| --- | --- | --- | ---: | ---: | ---: | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["stage"] == "hardware":
            lines.append(f"| hardware | {r['input']} | - | - | - | - | - | {hardware['conv']:.1f} / "
                         f"{hardware['matmul']:.1f} | 1 | - | {r['extra']} |")
            continue
        diff = "-" if r["rel_diff"] is None else f"{r['rel_diff']:.1e}"
        if "flops" not in r:  # text2img, load
            lines.append(f"| {r['stage']} | {r['input']} | - | {r['ref_s']:.3f} | {r['ours_s']:.3f} | "
                         f"{r['ours_s'] / r['ref_s']:.2f} | - | - | - | {diff} | {r['extra']} |")
            continue
        f, fr = r["flops"], r["ref_flops"]
        work = f"{_g(f['conv'])} + {_g(f['matmul'])}"
        if fr != f:
            work += f" (reference: {_g(fr['conv'])} + {_g(fr['matmul'])})"
        rate = f"{sum(fr.values()) / r['ref_s'] / 1e9:.1f} / {sum(f.values()) / r['ours_s'] / 1e9:.1f}"
        probes = r.get("gflops") or hardware  # interleaved with the stage, else the start's
        share = f"{at_peak(fr, probes) / r['ref_s']:.2f} / {at_peak(f, probes) / r['ours_s']:.2f}"
        lines.append(f"| {r['stage']} | {r['input']} | {work} | {r['ref_s']:.3f} | {r['ours_s']:.3f} | "
                     f"{r['ours_s'] / r['ref_s']:.2f} | {rate} | {probes['conv']:.1f} / {probes['matmul']:.1f} | "
                     f"{share} | {diff} | {r['extra']} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", default=None, help=f"comma-separated subset of {STAGES} (default: all but hardware)")
    p.add_argument("--every-stage", action="store_true",
                   help="issue 21 item 4: EVERY_STAGE in one run (hardware throughput, FLOPs, shares); "
                        "--stages then picks from it")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--size", choices=("full", "tiny"), default="full",
                   help="tiny: the test suite's configs (a smoke test of this script)")
    p.add_argument("--quick", action="store_true", help="256 px, 5 prior steps, 1 + 3 passes, load movq and prior")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--latent", type=int, default=None, help="latent side for the UNet and MoVQ (default 64 = 512 px)")
    p.add_argument("--unet-sizes", type=int, nargs="+", default=None,
                   help="UNet step sizes in px to time (default: --latent's; --every-stage: 512, 768 costed)")
    p.add_argument("--unet-batches", type=int, nargs="+", default=None, help="UNet step batches (default --batch)")
    p.add_argument("--prior-steps", type=int, default=None, help="prior stage steps (default 25)")
    p.add_argument("--decoder-steps", type=int, default=None, help="text2img decoder steps (default 50)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--load", default=None, help=f"components to load (default all of {sorted(LOAD)})")
    p.add_argument("--load-iters", type=int, default=None, help="loads of each implementation")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="also write the Markdown table to this file")
    args = p.parse_args(argv)
    q = args.quick
    args.latent = args.latent or (32 if q else 64)
    args.prior_steps = args.prior_steps or (5 if q else 25)
    args.decoder_steps = args.decoder_steps or (5 if q else 50)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 2)
    args.iters = args.iters or (3 if q else 5)
    args.load = (args.load or ("movq,prior" if q else ",".join(LOAD))).split(",")
    args.load_iters = args.load_iters or (1 if q else 2)
    args.prior_nocache = not args.every_stage  # --every-stage: a prior step's ratio stands for it
    args.probes = args.every_stage  # the hardware probes interleaved with every stage's passes
    default = [s for s, *_ in EVERY_STAGE] if args.every_stage else [s for s in STAGES if s != "hardware"]
    args.stages = args.stages.split(",") if args.stages else list(dict.fromkeys(default))
    unknown = set(args.stages) - set(STAGES)
    if unknown:
        p.error(f"unknown stage(s) {sorted(unknown)}; choose from {STAGES}")
    return args


def plan(args) -> list:
    """[(stage, args for it)]: EVERY_STAGE's rows with --every-stage, else one per stage (the UNet step
    once per --unet-sizes x --unet-batches), with the command line's batch, size and passes."""
    if args.every_stage:
        entries = [e for e in EVERY_STAGE if e[0] in args.stages]
        if args.unet_sizes:  # time these sizes instead of EVERY_STAGE's UNet rows
            unet = [e for e in entries if e[0] == "unet_step"]
            entries = [e for e in entries if e[0] != "unet_step"] + [
                ("unet_step", b, side // 8, w, n) for side in args.unet_sizes for _, b, _, w, n in unet]
    else:
        entries = [(stage, args.batch, args.latent, args.warmup, args.iters) for stage in args.stages
                   if stage != "unet_step"]
        entries += [("unet_step", b, side // 8, args.warmup, args.iters) for side in args.unet_sizes or [args.latent * 8]
                    for b in args.unet_batches or [args.batch]] if "unet_step" in args.stages else []
    out = []
    for stage, batch, latent, warmup, iters in entries:
        a = copy.copy(args)
        a.batch, a.latent = batch or args.batch, latent or args.latent
        if args.every_stage:  # the command line's --warmup / --iters apply to the other modes
            a.warmup, a.iters = warmup, iters
        out.append((stage, a))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_reference_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    configs = full_configs("decoder") if args.size == "full" else tiny_configs("decoder")
    env = environment(args)
    print(env, flush=True)
    rows, models = [], {}
    for stage, a in plan(args):
        start, before = time.perf_counter(), len(rows)
        if stage not in models:  # one (reference, ours) pair at a time (the UNet is shared by its rows)
            models.clear()
            gc.collect()
        if stage == "hardware":
            rows.append(bench_hardware(a, device, dtype))
        elif stage == "prior_stage":
            rows += bench_prior_stage(configs, a, device, dtype)
        elif stage == "text2img":
            rows.append(bench_text2img(configs, a, device, dtype))
        elif stage == "load":
            rows += bench_load(configs, a)
        else:
            component = COMPONENT[stage]
            if stage not in models:
                config = configs["movq"] if component.startswith("movq") else configs[component]
                models[stage] = reference_and_ours(component, config, dtype, device)
            rows.append(bench_model_stage(stage, configs, a, device, dtype, models[stage]))
            rows[-1].update(batch=a.batch, latent=a.latent)
        for r in rows[before:]:
            r["extra"] = r["extra"] or f"{a.warmup} warmup + {a.iters} timed"
        print(f"  {stage}: {time.perf_counter() - start:.0f} s; " + markdown(rows).splitlines()[-1],
              file=sys.stderr, flush=True)
        if args.out:  # as it goes: a stopped run keeps what it measured
            Path(args.out).write_text(f"{env}\n\n{markdown(rows)}\n")
    models.clear()
    if args.every_stage and "unet_step" in args.stages and not args.unet_sizes:
        rows += costed_rows(rows, COSTED_SIZES, configs, dtype)
    table = markdown(rows)
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(f"{env}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
