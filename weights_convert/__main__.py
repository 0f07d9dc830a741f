"""Convert a whole checkpoint folder between the hub layout and kandinsky's.

    python -m weights_convert SRC DST [--dtype fp16|bf16|fp32] [--to kandinsky|hub]

SRC is a repo folder (kandinsky-2-2-prior, -decoder, -decoder-inpaint, -controlnet-depth)
or a single component folder. Every subfolder whose config.json names a model class
kandinsky knows is loaded and written again in the requested layout (one component
at a time, so memory holds one model); everything else (model_index.json, scheduler/,
tokenizer/, image_processor/, README.md) is copied as is.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from kandinsky.config import ConfigError
from weights_convert import WeightsError, load_component, save_component
from weights_convert.registry import _MODULES, class_name

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _is_component(folder: Path) -> bool:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return False
    try:
        return class_name(json.loads(cfg.read_text())) in _MODULES
    except (ValueError, ConfigError):
        return False


def convert_folder(src: Path, dst: Path, layout: str, dtype: torch.dtype | None, log=print) -> list[str]:
    """Convert every component below ``src`` into ``dst``; returns the converted names."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise WeightsError(f"{src}: no such folder.")
    if dst.resolve() == src.resolve():
        raise WeightsError("SRC and DST must be different folders.")
    converted = []
    folders = [src] if _is_component(src) else sorted(p for p in src.iterdir() if p.is_dir())
    dst.mkdir(parents=True, exist_ok=True)
    if not _is_component(src):
        for item in src.iterdir():
            if item.is_file():
                shutil.copy2(item, dst / item.name)
    for folder in folders:
        out = dst if folder == src else dst / folder.name
        if _is_component(folder):
            model = load_component(folder, dtype=dtype)
            save_component(model, out, layout=layout, dtype=dtype)
            del model
            converted.append(folder.name)
            log(f"converted {folder.name} -> {out} ({layout})")
        else:
            shutil.copytree(folder, out, dirs_exist_ok=True)
    if not converted:
        raise WeightsError(f"{src}: found no component folder (a config.json naming {sorted(_MODULES)}).")
    return converted


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weights_convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="checkpoint folder (or one component folder)")
    parser.add_argument("dst", type=Path, help="output folder")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating tensors (default: float32)")
    parser.add_argument("--to", choices=("kandinsky", "hub"), default="kandinsky", help="layout to write")
    args = parser.parse_args(argv)
    try:
        convert_folder(args.src, args.dst, args.to, DTYPES.get(args.dtype))
    except (WeightsError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
