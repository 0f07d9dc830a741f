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
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_components import (  # noqa: E402
    DATA, DTYPES, build_reference, fill_random_, full_configs, make_case, quiet_reference_libraries, rel_diff,
    time_pair, tiny_configs,
)
from weights_convert import build_model, convert_state_dict, skip_init  # noqa: E402

STAGES = ("text_encode", "image_encode", "prior_stage", "unet_step", "movq_decode", "movq_encode", "text2img",
          "load")
COMPONENT = {"text_encode": "clip_text", "image_encode": "clip_image", "unet_step": "unet",
             "movq_decode": "movq_decode", "movq_encode": "movq_encode"}
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


def bench_model_stage(stage: str, configs: dict, args, device, dtype) -> dict:
    component = COMPONENT[stage]
    config = configs["movq"] if component.startswith("movq") else configs[component]
    ref, ours = reference_and_ours(component, config, dtype, device)
    case = make_case(component, config, args.batch, args.latent, device, dtype)
    fns = {"ref": lambda: case.ref_call(ref, case.inputs), "ours": lambda: case.ours_call(ours, case.inputs)}
    with torch.no_grad():
        times, outputs = time_pair(fns, device, args.warmup, args.iters)
    return row(stage, case.shape, times, rel_diff(outputs["ours"], outputs["ref"]))


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
    with torch.no_grad():
        times, outputs = time_pair(fns, device, args.warmup, args.iters)
    shape = f"1 prompt, {steps} steps, guidance 4"
    rows = [row("prior_stage", shape, times, rel_diff(outputs["ours"], outputs["ref"])),
            row("prior_stage (cache=False)", shape, {"ref": times["ref"], "ours": times["ours_nocache"]},
                rel_diff(outputs["ours_nocache"], outputs["ref"]))]
    return rows


def bench_text2img(configs: dict, args, device, dtype) -> dict:
    """The whole chain: prompt -> prior (guided) -> decoder UNet (guided) -> MoVQ decode -> pixels,
    diffusers' two pipelines against our Kandinsky, the same weights, the same generator seeds."""
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

    with torch.no_grad():
        times, outputs = time_pair({"ref": ref_call, "ours": ours_call}, device, args.warmup, args.iters)
    shape = f"1 prompt, prior {args.prior_steps} + decoder {args.decoder_steps} steps, {side} px, guidance 4"
    return row("text2img", shape, times, rel_diff(outputs["ours"], outputs["ref"]))


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
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {gpu or cpu}, {torch.get_num_threads()} "
            f"thread(s); torch {torch.__version__}, diffusers {diffusers.__version__}, transformers "
            f"{transformers.__version__}; {args.device}, {args.dtype}; "
            f"{'--quick; ' if args.quick else ''}batch {args.batch}, {args.latent * 8} px, "
            f"{args.warmup} warmup + {args.iters} timed passes each")


def markdown(rows: list[dict]) -> str:
    lines = ["| stage | input | reference (s) | ours (s) | ours / ref | max diff / max | notes |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        diff = "-" if r["rel_diff"] is None else f"{r['rel_diff']:.1e}"
        lines.append(f"| {r['stage']} | {r['input']} | {r['ref_s']:.3f} | {r['ours_s']:.3f} | "
                     f"{r['ours_s'] / r['ref_s']:.2f} | {diff} | {r['extra']} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {STAGES}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--size", choices=("full", "tiny"), default="full",
                   help="tiny: the test suite's configs (a smoke test of this script)")
    p.add_argument("--quick", action="store_true", help="256 px, 5 prior steps, 1 + 3 passes, load movq and prior")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--latent", type=int, default=None, help="latent side for the UNet and MoVQ (default 64 = 512 px)")
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
    unknown = set(args.stages.split(",")) - set(STAGES)
    if unknown:
        p.error(f"unknown stage(s) {sorted(unknown)}; choose from {STAGES}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_reference_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    configs = full_configs("decoder") if args.size == "full" else tiny_configs("decoder")
    env = environment(args)
    print(env, flush=True)
    rows = []
    for stage in args.stages.split(","):
        start = time.perf_counter()
        if stage == "prior_stage":
            rows += bench_prior_stage(configs, args, device, dtype)
        elif stage == "text2img":
            rows.append(bench_text2img(configs, args, device, dtype))
        elif stage == "load":
            rows += bench_load(configs, args)
        else:
            rows.append(bench_model_stage(stage, configs, args, device, dtype))
        print(f"  {stage}: {time.perf_counter() - start:.0f} s; " + markdown(rows[-1:]).splitlines()[-1],
              file=sys.stderr, flush=True)
    table = markdown(rows)
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(f"{env}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
