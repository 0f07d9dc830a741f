"""Time kandinsky's components against the diffusers / transformers reference, same weights.

    python benchmarks/bench_components.py                                   # tiny, CPU, fp32
    python benchmarks/bench_components.py --size full --device cuda --dtype fp16 --latent 96

For each component the reference model is built (tiny sizes from tests/refs/*.py, or the
real hub configs in tests/data/ with ``--size full``), filled with random weights,
written with ``save_pretrained`` into a temporary folder, and loaded into our model with
``weights_convert.load_component`` -- the same path real checkpoints take. Both run the
same inputs; the script reports per-pass time (median, or ``--stat min``), the peak CUDA
memory of a pass (weights + what the pass allocates on top, from
``torch.cuda.max_memory_allocated``; not measured on CPU) and the largest relative
difference between the two outputs, max|ours - ref| / max|ref|.

Passes of the two models are interleaved (ref, ours, ours, ref, ...), so a shared, busy
machine slows both alike. Memory is measured as a difference around one pass, so the
other model being resident does not count.

Run by hand (not part of the test suite). Needs diffusers and transformers (the test
extras). Full size holds both models of the largest component at once (CLIP ViT-bigG/14
image tower: 1.84 B parameters, 7.4 GB each in fp32, 3.7 GB in fp16/bf16) and writes it
to a temporary folder.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `weights_convert`, `kandinsky` and the tiny configs in tests/refs

from weights_convert import load_component  # noqa: E402

DATA = ROOT / "tests" / "data"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPONENTS = ("clip_text", "clip_image", "prior", "unet", "movq_decode", "movq_encode")
UNET_FOLDERS = {
    "decoder": "kandinsky-2-2-decoder",
    "inpaint": "kandinsky-2-2-decoder-inpaint",
    "controlnet": "kandinsky-2-2-controlnet-depth",
}


# --------------------------------------------------------------------------- configs
def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def tiny_configs(unet_variant: str) -> dict[str, dict]:
    """The tiny configs the parity tests use (tests/refs/*.py)."""
    from tests.refs.clip import TINY_TEXT_CONFIG, TINY_VISION_CONFIG
    from tests.refs.movq import MOVQ_TINY_CONFIG
    from tests.refs.prior import PRIOR_TINY_CONFIG
    from tests.refs.unet import tiny_unet_config

    return {
        "clip_text": dict(TINY_TEXT_CONFIG),
        "clip_image": dict(TINY_VISION_CONFIG),
        # the prior's embedding is the CLIP projection (as in the real configs), so pipelines fit together
        "prior": {**PRIOR_TINY_CONFIG, "embedding_dim": TINY_TEXT_CONFIG["projection_dim"]},
        "unet": tiny_unet_config(unet_variant),
        "movq": dict(MOVQ_TINY_CONFIG),
    }


def full_configs(unet_variant: str) -> dict[str, dict]:
    """The real hub configs (tests/data/kandinsky-2-2-*)."""
    prior = DATA / "kandinsky-2-2-prior"
    decoder = DATA / UNET_FOLDERS[unet_variant]
    return {
        "clip_text": _read(prior / "text_encoder" / "config.json"),
        "clip_image": _read(prior / "image_encoder" / "config.json"),
        "prior": _read(prior / "prior" / "config.json"),
        "unet": _read(decoder / "unet" / "config.json"),
        "movq": _read(decoder / "movq" / "config.json"),
    }


# --------------------------------------------------------------------------- reference models
def build_reference(component: str, config: dict) -> torch.nn.Module:
    """The diffusers / transformers model for ``component`` (built on the current default device)."""
    if component == "clip_text":
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        return CLIPTextModelWithProjection(CLIPTextConfig.from_dict(_transformers_kwargs(config)))
    if component == "clip_image":
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        return CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(_transformers_kwargs(config)))
    if component == "prior":
        from diffusers import PriorTransformer

        return PriorTransformer.from_config(config)
    if component == "unet":
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_config(config)
    if component.startswith("movq"):
        from diffusers import VQModel

        return VQModel.from_config(config)
    raise ValueError(component)


def _transformers_kwargs(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")}


@torch.no_grad()
def fill_random_(model: torch.nn.Module, seed: int) -> None:
    """Random non-zero weights with sane activations at any width (fan-in scaling).

    Like tests.helpers.randomize_, every parameter is random (default inits zero some
    layers, which would make a comparison weak); unlike it, matrices are scaled by
    1/sqrt(fan_in) so that full-size models stay finite in fp16. Non-persistent buffers
    (the prior's causal mask, CLIP's position ids) are not in the state dict and stay as built.
    """
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    for name, t in model.state_dict(keep_vars=True).items():
        if not t.is_floating_point():
            continue
        noise = torch.randn(t.shape, generator=g, device=device, dtype=torch.float32)
        if name.endswith("clip_std"):  # a standard deviation: positive
            value = noise.abs() + 0.5
        elif t.ndim == 1 and name.endswith("weight"):  # norms
            value = 1.0 + 0.1 * noise
        elif t.ndim == 1 or t.shape[0] == 1:  # biases, learned tokens and positions
            value = 0.1 * noise
        else:
            value = noise / math.sqrt(t[0].numel())
        t.copy_(value.to(t.dtype))


# --------------------------------------------------------------------------- inputs and calls
@dataclass
class Case:
    """How to call one component: inputs, and the reference's / our call."""

    inputs: dict
    ref_call: Callable
    ours_call: Callable
    shape: str
    extra: dict = field(default_factory=dict)


def make_case(component: str, config: dict, batch: int, latent: int, device, dtype) -> Case:
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    if component == "clip_text":
        length = config.get("max_position_embeddings", 77)
        ids = torch.randint(0, config["vocab_size"], (batch, length), generator=g).to(device)
        return Case(
            {"ids": ids},
            ref_call=lambda m, x: (lambda o: (o.text_embeds, o.last_hidden_state))(m(input_ids=x["ids"])),
            ours_call=lambda m, x: (lambda o: (o.text_embeds, o.last_hidden_state))(m(x["ids"])),
            shape=f"ids ({batch}, {length})",
        )
    if component == "clip_image":
        size = config["image_size"]
        return Case(
            {"pixels": randn(batch, 3, size, size)},
            ref_call=lambda m, x: (m(pixel_values=x["pixels"]).image_embeds,),
            ours_call=lambda m, x: (m(x["pixels"]),),
            shape=f"pixels ({batch}, 3, {size}, {size})",
        )
    if component == "prior":
        dim, tokens = config["embedding_dim"], config["num_embeddings"]
        text_dim = config.get("embedding_proj_dim") or dim
        lengths = torch.tensor([tokens, 5, 1, 12][:batch] + [tokens] * max(0, batch - 4))
        mask = (torch.arange(tokens)[None, :] < lengths[:, None]).to(device)  # (B, 77) bool
        x = {
            "hidden": randn(batch, dim),
            "t": torch.tensor(500, device=device),
            "proj": randn(batch, text_dim),
            "text": randn(batch, tokens, dim),
            "mask": mask,
        }
        return Case(
            x,
            ref_call=lambda m, x: (
                m(x["hidden"], x["t"], proj_embedding=x["proj"], encoder_hidden_states=x["text"],
                  attention_mask=x["mask"]).predicted_image_embedding,
            ),
            ours_call=lambda m, x: (m(x["hidden"], x["t"], x["proj"], x["text"], x["mask"]),),
            shape=f"x ({batch}, {dim}), text ({batch}, {tokens}, {dim})",
        )
    if component == "unet":
        hint = config.get("addition_embed_type") == "image_hint"
        channels = config["in_channels"] - (4 if hint else 0)
        x = {
            "sample": randn(batch, channels, latent, latent),
            "t": torch.tensor(500, device=device),
            "embeds": randn(batch, config["encoder_hid_dim"]),
            "hint": torch.rand(batch, 3, 8 * latent, 8 * latent, generator=g).to(device, dtype) if hint else None,
        }

        def ref_call(m, x):
            cond = {"image_embeds": x["embeds"]}
            if x["hint"] is not None:
                cond["hint"] = x["hint"]
            return (m(x["sample"], x["t"], encoder_hidden_states=None, added_cond_kwargs=cond).sample,)

        return Case(
            x,
            ref_call=ref_call,
            ours_call=lambda m, x: (m(x["sample"], x["t"], x["embeds"], hint=x["hint"]),),
            shape=f"sample ({batch}, {channels}, {latent}, {latent})" + (" + hint" if hint else ""),
        )
    if component == "movq_decode":
        latents = randn(batch, config["latent_channels"], latent, latent)
        return Case(
            {"z": latents},
            ref_call=lambda m, x: (m.decode(x["z"], force_not_quantize=True).sample,),
            ours_call=lambda m, x: (m.decode(x["z"], force_not_quantize=True),),
            shape=f"latents ({batch}, {config['latent_channels']}, {latent}, {latent})",
        )
    if component == "movq_encode":
        size = 8 * latent
        return Case(
            {"images": randn(batch, 3, size, size).clamp(-1, 1)},
            ref_call=lambda m, x: (m.encode(x["images"]).latents,),
            ours_call=lambda m, x: (m.encode(x["images"]),),
            shape=f"images ({batch}, 3, {size}, {size})",
        )
    raise ValueError(component)


# --------------------------------------------------------------------------- measuring
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@torch.inference_mode()
def peak_memory_mib(fn: Callable[[], tuple], weights: int, device: torch.device) -> float | None:
    """Weights + the peak memory one forward pass allocates on top of what is resident (CUDA only).

    Measured as a difference, so the other model of the pair being resident does not count.
    """
    if device.type != "cuda":
        return None
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return (weights + torch.cuda.max_memory_allocated(device) - base) / 2**20


@torch.inference_mode()
def time_pair(fns: dict[str, Callable[[], tuple]], device: torch.device, warmup: int, iters: int):
    """Per-pass times (s) of each callable, interleaved (ref, ours, ours, ref, ...) so that a busy
    machine slows both alike; returns ({name: [seconds]}, {name: last outputs on the CPU})."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    outputs = {}
    for i in range(iters):
        for name in names if i % 2 == 0 else names[::-1]:
            synchronize(device)
            start = time.perf_counter()
            out = fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
            outputs[name] = out
    outputs = {name: tuple(o.detach().float().cpu() for o in out) for name, out in outputs.items()}
    return times, outputs


def rel_diff(ours: tuple, ref: tuple) -> float:
    """max over outputs of max|ours - ref| / max|ref| (the parity tests' measure)."""
    worst = 0.0
    for a, b in zip(ours, ref):
        a, b = a.double(), b.double()
        if a.shape != b.shape:
            raise RuntimeError(f"output shapes differ: ours {tuple(a.shape)} vs reference {tuple(b.shape)}")
        worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())
    return worst


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_component(component: str, configs: dict, args, device: torch.device, dtype: torch.dtype) -> dict:
    model_config = configs["movq"] if component.startswith("movq") else configs[component]
    case = make_case(component, model_config, args.batch, args.latent, device, dtype)
    stat = min if args.stat == "min" else statistics.median
    with tempfile.TemporaryDirectory(prefix=f"bench-{component}-") as tmp:
        # the reference: built on the device, random weights, saved in the hub layout
        torch.manual_seed(0)
        with torch.device(device):
            ref = build_reference(component, copy.deepcopy(model_config))
        ref = ref.to(dtype).eval()
        fill_random_(ref, seed=0)
        ref.save_pretrained(tmp)
        # ours: the saved folder through the loader real checkpoints take
        ours = load_component(tmp, dtype=dtype, device=device)
        if args.channels_last:
            ref = ref.to(memory_format=torch.channels_last)
            ours = ours.to(memory_format=torch.channels_last)
            case.inputs = {
                k: v.contiguous(memory_format=torch.channels_last) if torch.is_tensor(v) and v.ndim == 4 else v
                for k, v in case.inputs.items()
            }

        fns = {
            "ref": lambda: case.ref_call(ref, case.inputs),
            "ours": lambda: case.ours_call(ours, case.inputs),
        }
        if args.compile:
            fns = {name: torch.compile(fn) for name, fn in fns.items()}
        times, outputs = time_pair(fns, device, args.warmup, args.iters)
        row = {
            "component": component,
            "input": case.shape,
            "params": sum(p.numel() for p in ours.parameters()),
            "ref_ms": 1e3 * stat(times["ref"]),
            "ours_ms": 1e3 * stat(times["ours"]),
            "ref_peak": peak_memory_mib(fns["ref"], weight_bytes(ref), device),
            "ours_peak": peak_memory_mib(fns["ours"], weight_bytes(ours), device),
            "rel_diff": rel_diff(outputs["ours"], outputs["ref"]),
        }
        del ref, ours, fns
        free(device)
    return row


# --------------------------------------------------------------------------- report
def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| component | input | params | reference ms | ours ms | ours / ref | reference peak MiB | ours peak MiB "
        "| max rel diff |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['component']} | {r['input']} | {_params(r['params'])} | {r['ref_ms']:.2f} | {r['ours_ms']:.2f} "
            f"| {r['ours_ms'] / r['ref_ms']:.2f} | {_mib(r['ref_peak'])} | {_mib(r['ours_peak'])} "
            f"| {r['rel_diff']:.1e} |"
        )
    return "\n".join(lines)


def environment(args, device: torch.device) -> str:
    import diffusers
    import transformers

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return (
        f"size={args.size} device={device} ({where}) dtype={args.dtype} batch={args.batch} latent={args.latent} "
        f"unet={args.unet_variant} warmup={args.warmup} iters={args.iters} stat={args.stat} compile={args.compile} "
        f"channels_last={args.channels_last}\n"
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}"
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("tiny", "full"), default="tiny",
                   help="tiny: the test suite's configs; full: the real hub configs (random weights)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--batch", type=int, default=2, help="batch size of every input (default 2: a guided pair)")
    p.add_argument("--latent", type=int, default=None,
                   help="latent height = width for the UNet and MoVQ (images are 8x); default 8 tiny, 64 full")
    p.add_argument("--unet-variant", choices=sorted(UNET_FOLDERS), default="decoder")
    p.add_argument("--components", default=",".join(COMPONENTS), help=f"comma-separated subset of {COMPONENTS}")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=None, help="timed passes of each model (default 10 tiny, 5 full)")
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="per-pass time reported (min is steadier on a shared, busy machine)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile both callables (warmup includes compiling)")
    p.add_argument("--channels-last", action="store_true",
                   help="both models' conv weights and 4-D inputs in torch.channels_last memory format")
    args = p.parse_args(argv)
    args.latent = args.latent or (8 if args.size == "tiny" else 64)
    args.iters = args.iters or (10 if args.size == "tiny" else 5)
    unknown = set(args.components.split(",")) - set(COMPONENTS)
    if unknown:
        p.error(f"unknown component(s) {sorted(unknown)}; choose from {COMPONENTS}")
    if args.latent % 8:
        p.error("--latent must be a multiple of 8 (the UNet halves it three times)")
    return args


def quiet_reference_libraries() -> None:
    """No progress bars or dtype-cast notices from diffusers / transformers in the report."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_reference_libraries()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = tiny_configs(args.unet_variant) if args.size == "tiny" else full_configs(args.unet_variant)
    print(environment(args, device), flush=True)
    rows = []
    for component in args.components.split(","):
        start = time.perf_counter()
        rows.append(bench_component(component, configs, args, device, dtype))
        print(f"  {component}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    print()
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
