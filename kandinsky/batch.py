"""``kandinsky batch``: many prompts to PNGs, resumable, on one process or many (torchrun).

    kandinsky batch prompts.txt --out pictures/ --prior P --decoder D
    kandinsky batch prompts.jsonl --out pictures/ --demo --steps 2 --width 64 --height 64
    torchrun --nproc_per_node 8 -m kandinsky.cli batch prompts.jsonl --out pictures/ ...
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500 \\
             --nproc_per_node 8 -m kandinsky.cli batch prompts.jsonl --out /shared/pictures/ ...

The prompts file: ``.txt`` holds one prompt per line (blank lines skipped); ``.jsonl`` one
JSON object per line with ``prompt`` and optionally the per-item keys of ``ITEM_KEYS``.
Item ``i`` (0-based, in file order) is written to ``OUT/000i.png`` (six digits).

* Seeds come from the item, not from the process: an item's ``seed`` key, else a hash of
  the base ``--seed`` and the item index. With the same settings, any number of processes
  writes the same files.
* Under torchrun (``WORLD_SIZE`` > 1, ``RANK``, ``LOCAL_RANK`` in the environment) rank r
  takes the items with ``i % world_size == r``; torch.distributed is initialised (gloo on
  CPU, nccl on CUDA) only to wait for every rank before the manifest is merged.
* Resumable: an item whose PNG exists is skipped. Each PNG is written to a temporary name
  and renamed (``os.replace``), so a killed run leaves whole files or none.
* Manifest: each rank appends one JSON line per finished item to
  ``OUT/manifest.rank<r>.jsonl`` (item, file, prompt, seed, settings, seconds, time); at
  the end rank 0 merges them into ``OUT/manifest.jsonl`` (one line per item, by item).
* ``OUT/batch.json`` records the items' fingerprint: a second run into the same folder
  with a different prompts file or settings is refused instead of mixing two batches
  (``--overwrite``: ``start_over`` clears the folder's batch files first).

The command line (flags, torch.distributed set-up, the summary line) is kandinsky/cli/batch.py.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# per-item keys of a .jsonl line, with their types; the defaults come from the command line
ITEM_KEYS = {
    "prompt": str,
    "negative_prompt": str,
    "seed": int,
    "width": int,
    "height": int,
    "steps": int,
    "prior_steps": int,
    "guidance_scale": float,
}


class InputError(ValueError):
    """A problem with the command line or the prompts file (reported as `error: ...`, status 2)."""


@dataclass
class Item:
    index: int
    prompt: str
    negative_prompt: str | None
    seed: int
    width: int
    height: int
    steps: int
    prior_steps: int
    guidance_scale: float

    @property
    def file(self) -> str:
        return f"{self.index:06d}.png"


# ----------------------------------------------------------------------------- items


def item_seed(base: int, index: int) -> int:
    """The default seed of item ``index``: a hash of the base seed and the index (63 bits)."""
    digest = hashlib.sha256(f"kandinsky-batch:{base}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def read_rows(path: Path) -> list[dict]:
    """The prompts file as a list of {key: value} rows (one per item)."""
    if not path.is_file():
        raise InputError(f"prompts file {str(path)!r} not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        return [{"prompt": line.strip()} for line in lines if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not a JSON object ({e.msg}); each line of a .jsonl file is one item") from None
        if not isinstance(row, dict) or "prompt" not in row:
            raise InputError(f"{where}: each line must be a JSON object with a \"prompt\" key")
        unknown = sorted(set(row) - set(ITEM_KEYS))
        if unknown:
            raise InputError(f"{where}: unknown key(s) {unknown}; an item may have {sorted(ITEM_KEYS)}")
        for key, value in row.items():
            kind = ITEM_KEYS[key]
            ok = isinstance(value, kind) and not isinstance(value, bool) or (kind is float and isinstance(value, int))
            if not ok:
                raise InputError(f"{where}: {key} must be {kind.__name__}, got {value!r}")
        rows.append(row)
    return rows


def make_items(rows: list[dict], args) -> list[Item]:
    items = []
    for i, row in enumerate(rows):
        item = Item(
            index=i,
            prompt=row["prompt"],
            negative_prompt=row.get("negative_prompt", args.negative_prompt),
            seed=row.get("seed", item_seed(args.seed, i)),
            width=row.get("width", args.width),
            height=row.get("height", args.height),
            steps=row.get("steps", args.steps),
            prior_steps=row.get("prior_steps", args.prior_steps),
            guidance_scale=float(row.get("guidance_scale", args.guidance_scale)),
        )
        for key in ("width", "height", "steps", "prior_steps"):
            if getattr(item, key) < 1:
                raise InputError(f"item {i}: {key} must be at least 1, got {getattr(item, key)}")
        items.append(item)
    if not items:
        raise InputError(f"{args.prompts}: no prompts in it")
    return items


def fingerprint(items: list[Item], args) -> str:
    what = {"items": [asdict(item) for item in items], "prior": args.prior, "decoder": args.decoder,
            "demo": args.demo, "random_demo": args.random_demo, "dtype": args.dtype, "scheduler": args.scheduler}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- files


def write_atomically(path: Path, write) -> None:
    """``write(temporary_path)``, then rename it to ``path`` (readers never see half a file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_batch_file(out: Path, items: list[Item], args, rank: int) -> None:
    """Refuse a folder that holds a different batch; rank 0 records this one."""
    record = out / "batch.json"
    fp = fingerprint(items, args)
    if record.exists():
        old = json.loads(record.read_text())
        if old.get("fingerprint") != fp:
            raise InputError(
                f"{out} holds another batch ({old.get('items')} items from {old.get('prompts')!r}, or other "
                "settings): its finished PNGs would be taken as this batch's. Use another --out folder, or pass "
                "--overwrite to start this one over."
            )
    elif rank == 0:
        data = {"prompts": str(args.prompts), "items": len(items), "fingerprint": fp}
        write_atomically(record, lambda p: p.write_text(json.dumps(data, indent=1)))


def merge_manifests(out: Path, items: list[Item]) -> Path:
    """Fold every rank's manifest (and an earlier manifest.jsonl) into manifest.jsonl, one line
    per finished item, by item; a PNG without a line (killed between the two writes) gets one
    marked ``"recovered": true``."""
    entries: dict[int, dict] = {}
    sources = [out / "manifest.jsonl"] + sorted(out.glob("manifest.rank*.jsonl"))
    for source in sources:
        if source.exists():
            for line in source.read_text().splitlines():
                if line.strip():
                    entry = json.loads(line)
                    entries[entry["item"]] = entry
    for item in items:
        if item.index not in entries and (out / item.file).exists():
            entries[item.index] = {"item": item.index, "file": item.file, **_settings(item), "recovered": True}
    manifest = out / "manifest.jsonl"
    text = "".join(json.dumps(entries[i]) + "\n" for i in sorted(entries))
    write_atomically(manifest, lambda p: p.write_text(text))
    for source in sources[1:]:
        source.unlink(missing_ok=True)
    return manifest


def _settings(item: Item) -> dict:
    d = asdict(item)
    d.pop("index")
    return d


# ----------------------------------------------------------------------------- processes


def distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def generate(pipe, item: Item):
    import torch

    generator = torch.Generator().manual_seed(item.seed)
    out = pipe.text2img(
        item.prompt, negative_prompt=item.negative_prompt, height=item.height, width=item.width,
        num_inference_steps=item.steps, prior_num_inference_steps=item.prior_steps,
        guidance_scale=item.guidance_scale, generator=generator, progress=False,
    )
    return out.images[0]


def check_sizes(pipe, items: list[Item]) -> None:
    """Every item's size through the pipelines' one memory check (kandinsky.pipelines.limits), before
    the first picture: a runaway item is refused with its number instead of after hours of the others."""
    for size in sorted({(item.height, item.width) for item in items}):
        try:
            pipe.decoder.check_fits(1, *size)
        except ValueError as e:
            first = next(item for item in items if (item.height, item.width) == size)
            raise InputError(f"item {first.index} ({first.file}): {e}") from None


def start_over(out: Path) -> None:
    """Remove a batch's own files from ``out`` (batch.json, the manifests, the six-digit PNGs), so that the
    next run starts the folder over; anything else in it is left alone."""
    if not out.is_dir():
        return
    for path in out.iterdir():
        if path.name in ("batch.json", "manifest.jsonl") or re.fullmatch(r"manifest\.rank\d+\.jsonl|\d{6}\.png",
                                                                          path.name):
            path.unlink()


def run(args, items: list[Item], open_pipeline, counts: dict | None = None) -> dict:
    """Generate this rank's unfinished ``items`` into ``args.out`` with the pipeline that
    ``open_pipeline()`` (a context manager yielding (pipeline, anything)) loads, only when there is
    work; returns this rank's counts, updated in ``counts`` as each item finishes."""
    from tqdm import tqdm

    rank, world, _ = distributed()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check_batch_file(out, items, args, rank)
    mine = [item for item in items if item.index % world == rank]
    todo = [item for item in mine if not (out / item.file).exists()]
    counts = {} if counts is None else counts
    counts.update(items=len(items), mine=len(mine), done=0, skipped=len(mine) - len(todo), seconds=0.0)
    if args.limit is not None:
        todo = todo[: args.limit]
    if not todo:
        return counts
    start = time.perf_counter()
    with open_pipeline() as (pipe, _):
        check_sizes(pipe, todo)
        manifest = out / f"manifest.rank{rank}.jsonl"
        bar = tqdm(todo, desc=f"rank {rank}/{world}", position=rank, disable=args.no_progress, file=sys.stderr)
        for item in bar:
            t0 = time.perf_counter()
            image = generate(pipe, item)
            write_atomically(out / item.file, lambda p: image.save(p, format="PNG"))
            entry = {"item": item.index, "file": item.file, **_settings(item), "rank": rank,
                     "seconds": round(time.perf_counter() - t0, 3),
                     "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
            with open(manifest, "a") as f:
                f.write(json.dumps(entry) + "\n")
            counts["done"] += 1
    counts["seconds"] = time.perf_counter() - start
    return counts
