"""Run the whole Kandinsky 2.2 chain at the REAL sizes with random weights (run by hand).

Every component is built from the hub's real config (tests/data) with random weights, in
memory (no files), and the prompt-level API generates one small picture: the point is that
the real widths (CLIP 1280 / 1664, prior 2048 inner, UNet 384..1536, 32 image tokens) flow
through every pipeline, and to time a step at full size.

    python benchmarks/smoke_full_size.py                          # bf16, CPU, 64x64, 2 + 2 steps
    python benchmarks/smoke_full_size.py --device cuda --dtype fp16 --size 512 --steps 50 --prior-steps 25

Memory: all five models at once, about 9.8 GB in bf16/fp16 (19.5 GB in fp32).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "tests" / "data"

from kandinsky.clip.preprocess import ImagePreprocessor  # noqa: E402
from kandinsky.clip.tokenizer import Tokenizer  # noqa: E402
from kandinsky.pipelines.combined import Kandinsky  # noqa: E402
from kandinsky.pipelines.decoder import DecoderPipeline  # noqa: E402
from kandinsky.pipelines.prior import PriorPipeline  # noqa: E402
from kandinsky.sampling.schedule import NoiseSchedule  # noqa: E402
from weights_convert import build_model  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@torch.no_grad()
def random_model(config_path: Path, dtype, device, seed: int):
    """Our model for a real config, random weights scaled 1/sqrt(fan_in) (finite in half precision)."""
    with torch.device("meta"):
        model = build_model(json.loads(config_path.read_text()))
    model = model.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 1:
            p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
        else:
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) / fan_in**0.5)
    if hasattr(model, "clip_std"):  # the prior's un-normalisation statistics
        model.clip_std.fill_(1.0)
    return model.eval()


def tokenizer_folder(tmp: Path) -> Path:
    """The real 49,408-token CLIP vocabulary, written from open_clip's BPE file (test helper)."""
    sys.path.insert(0, str(ROOT))
    from tests.refs.clip import write_clip_tokenizer_folder

    return write_clip_tokenizer_folder(tmp / "tokenizer")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--size", type=int, default=64, help="picture height = width (multiple of 64)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--prior-steps", type=int, default=2)
    args = ap.parse_args()
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    prior_dir, decoder_dir = DATA / "kandinsky-2-2-prior", DATA / "kandinsky-2-2-decoder"

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        prior = PriorPipeline(
            prior=random_model(prior_dir / "prior" / "config.json", dtype, device, 0),
            text_encoder=random_model(prior_dir / "text_encoder" / "config.json", dtype, device, 1),
            image_encoder=random_model(prior_dir / "image_encoder" / "config.json", dtype, device, 2),
            tokenizer=Tokenizer.from_folder(tokenizer_folder(Path(tmp))),
            scheduler=NoiseSchedule.from_folder(prior_dir / "scheduler"),
            image_processor=ImagePreprocessor.from_folder(prior_dir / "image_processor"),
        )
    decoder = DecoderPipeline(
        unet=random_model(decoder_dir / "unet" / "config.json", dtype, device, 3),
        movq=random_model(decoder_dir / "movq" / "config.json", dtype, device, 4),
        scheduler=NoiseSchedule.from_folder(decoder_dir / "scheduler"),
    )
    pipe = Kandinsky(prior, decoder)
    built = time.perf_counter() - t0
    params = sum(p.numel() for m in (prior.prior, prior.text_encoder, prior.image_encoder, decoder.unet, decoder.movq)
                 for p in m.parameters())

    t0 = time.perf_counter()
    with torch.no_grad():
        out = pipe.text2img("a red cat", height=args.size, width=args.size, num_inference_steps=args.steps,
                            prior_num_inference_steps=args.prior_steps, generator=torch.Generator().manual_seed(0),
                            output_type="np", progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    ran = time.perf_counter() - t0
    image = out.images
    print(f"{params / 1e9:.3f} B parameters built in {built:.1f} s; text2img {args.size}x{args.size}, "
          f"{args.prior_steps} prior + {args.steps} decoder steps in {ran:.1f} s on {device} {args.dtype}; "
          f"output {image.shape}, finite {bool(torch.isfinite(torch.from_numpy(image)).all())}")


if __name__ == "__main__":
    main()
