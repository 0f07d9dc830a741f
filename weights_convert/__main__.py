"""Convert a whole checkpoint folder between the hub layout and kandinsky's.

    python -m weights_convert SRC DST [--to kandinsky|hub] [--dtype keep|fp32|fp16|bf16] [--overwrite]

SRC is a repo folder (kandinsky-2-2-prior, -decoder, -decoder-inpaint, -controlnet-depth)
or a single component folder. Every subfolder whose config.json names a model class
kandinsky knows is loaded and written again in the requested layout (one component
at a time, so memory holds one model); everything else (model_index.json, scheduler/,
tokenizer/, image_processor/, README.md) is copied as is.

DST must not exist, or be an empty folder; ``--overwrite`` replaces a DST that holds files.
The conversion is written into a temporary folder beside DST (``.DST.partial-*``) and moved
into place only when complete: a failure or Ctrl-C leaves nothing behind, and an existing DST
is untouched until the new one is ready. ``--dtype keep`` (the default) writes every tensor in
the dtype it is stored in (an fp16 checkpoint stays fp16); fp32 / fp16 / bf16 cast the
floating-point tensors. Errors: ``error: ...`` on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import torch

from kandinsky.config import ConfigError
from kandinsky.exits import run
from weights_convert import WeightsError, WeightsNotFoundError, load_component, save_component
from weights_convert.registry import BY_CLASS_NAME, class_name

DTYPES = {"keep": "keep", "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _is_component(folder: Path) -> bool:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return False
    try:
        return class_name(json.loads(cfg.read_text())) in BY_CLASS_NAME
    except (ValueError, ConfigError):
        return False


def plan(src: Path) -> tuple[list[Path], list[Path]]:
    """(component folders to convert, other files and folders to copy) of SRC; writes nothing."""
    if src.is_file():
        raise WeightsError(f"SRC {src}: is a file; pass the checkpoint folder (or component folder) that holds it.")
    if not src.is_dir():
        raise WeightsNotFoundError(f"SRC {src}: no such folder.")
    if _is_component(src):
        return [src], []
    items = sorted(src.iterdir())
    components = [p for p in items if p.is_dir() and _is_component(p)]
    if not components:
        raise WeightsError(f"SRC {src}: found no component folder (a config.json naming {sorted(BY_CLASS_NAME)}).")
    return components, [p for p in items if p not in components]


def check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse, before anything is written, a DST that cannot or must not be replaced."""
    s, d = src.resolve(), dst.resolve()
    if d == s:
        raise WeightsError("SRC and DST must be different folders.")
    if s in d.parents:
        raise WeightsError(f"DST {dst} lies inside SRC {src}: choose a folder outside it.")
    if d in s.parents:
        raise WeightsError(f"SRC {src} lies inside DST {dst}: replacing DST would delete SRC; choose another DST.")
    if dst.exists() and not dst.is_dir():
        raise WeightsError(f"DST {dst}: is a file; pass the path of a folder to create.")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        shown = sorted(p.name for p in dst.iterdir())
        raise WeightsError(
            f"DST {dst} is not empty (holds {', '.join(shown[:5])}{', ...' if len(shown) > 5 else ''}); "
            f"pass --overwrite to replace it, or choose a new folder."
        )
    parent = next(p for p in d.parents if p.exists())  # where the first new folder is made
    if not parent.is_dir():
        raise WeightsError(f"DST {dst}: {parent} is a file, so no folder can be created in it.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise WeightsError(f"DST {dst}: cannot write into {parent} (permission denied).")
    if dst.is_dir() and any(dst.iterdir()) and not os.access(dst, os.W_OK | os.X_OK):
        raise WeightsError(f"DST {dst}: cannot replace it, its contents are read-only (permission denied).")


def convert_into(components: list[Path], others: list[Path], src: Path, out: Path, layout: str, dtype, log) -> None:
    """Write the conversion of SRC into the (new, empty) folder ``out``."""
    for folder in components:
        target = out if folder == src else out / folder.name
        model = load_component(folder, dtype=dtype)  # "keep": each tensor as stored
        save_component(model, target, layout=layout, dtype=None if dtype == "keep" else dtype)
        del model
        log(f"converted {folder.name} ({layout}, dtype {'as stored' if dtype == 'keep' else dtype})")
    for item in others:
        if item.is_dir():
            shutil.copytree(item, out / item.name)
        else:
            shutil.copy2(item, out / item.name)


def publish(tmp: Path, dst: Path) -> None:
    """Move the finished ``tmp`` folder to ``dst``; an existing dst is replaced only once tmp is in place."""
    if not dst.exists():
        os.replace(tmp, dst)
        return
    old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if old.exists():
        print(f"warning: could not remove the previous {dst} (left at {old})", file=sys.stderr)


def convert_folder(
    src: Path, dst: Path, layout: str, dtype="keep", overwrite: bool = False, log=print
) -> list[str]:
    """Convert every component below ``src`` into ``dst``; returns the converted names.

    Everything is checked before anything is written; the result appears at ``dst`` only
    when complete (see the module docstring)."""
    src, dst = Path(src), Path(dst)
    components, others = plan(src)
    check_destination(src, dst, overwrite)
    created = next((p for p in reversed(dst.parents) if not p.exists()), None)  # topmost missing parent
    tmp = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        convert_into(components, others, src, tmp, layout, dtype, log)
        publish(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    log(f"wrote {dst}")
    return [folder.name for folder in components]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weights_convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="checkpoint folder (or one component folder)")
    parser.add_argument("dst", type=Path, help="output folder (must not exist or be empty, unless --overwrite)")
    parser.add_argument("--to", choices=("kandinsky", "hub"), default="kandinsky", help="layout to write")
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default="keep",
        help="keep: every tensor in the dtype it is stored in (default); fp32/fp16/bf16: cast floating tensors",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it holds files (default: refuse)")
    args = parser.parse_args(argv)
    # error: lines and status 2, Ctrl-C and 130, as every kandinsky command (kandinsky/exits.py); DST appears
    # only when complete, so a Ctrl-C leaves it as it was
    def convert() -> int:
        convert_folder(args.src, args.dst, args.to, DTYPES[args.dtype], overwrite=args.overwrite)
        return 0

    return run("python -m weights_convert", convert, kept=f"nothing written ({args.dst} as it was)")


if __name__ == "__main__":
    sys.exit(main())
