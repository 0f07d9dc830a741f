"""Reading and writing weight files in every form the hub uses.

* ``*.safetensors`` are memory-mapped: tensors are views into the file (copy-on-write
  mapping), so loading a checkpoint does not hold a second copy of the weights.
* ``*.bin`` are read with ``torch.load(weights_only=True, mmap=True)``: a pickle holding Python objects
  other than tensors is refused, never unpickled (that could run code).
* fp16 variants (``model.fp16.safetensors``, ``diffusion_pytorch_model.fp16.bin``, ...)
  and sharded checkpoints (``*.index.json`` + shards) are found automatically.

Every problem is raised as :class:`WeightsError` (an ``OSError``, as in transformers and
diffusers) naming the file and what is wrong; a missing file or folder as
:class:`WeightsNotFoundError`, which is also a ``FileNotFoundError``.
"""
from __future__ import annotations

import json
import mmap
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Iterator

import torch


class WeightsError(OSError):
    """A checkpoint file is missing, corrupt, or does not match the model (``except OSError`` catches it)."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """A component folder, its config.json, a weights file or a shard is missing."""


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}

# The stem of the weight files for a layout: hub stems come from the component's
# row in registry.py (hub_weights), transformers also used "pytorch_model" for .bin files.
KANDINSKY_STEM = "kandinsky"


# --------------------------------------------------------------------------- finding files
def find_weight_files(folder: Path, stems: tuple[str, ...], variant: str | None = None) -> list[Path]:
    """The weight files of a component folder, in order of preference.

    ``variant=None``: full precision first, whatever the format: plain safetensors, sharded
    safetensors, plain ``.bin``, sharded ``.bin``; then the half-precision variants (``.fp16.`` /
    ``.bf16.``, single or sharded; diffusers and transformers name a variant's shard index
    ``<stem>.safetensors.index.fp16.json``), safetensors before ``.bin``. So a folder holding an
    fp32 ``.bin`` and only an fp16 safetensors loads the unrounded weights.
    ``variant="fp16"`` (any variant name): that variant's files only; a folder without them
    raises :class:`WeightsNotFoundError`, as diffusers and transformers do (never a silent
    fallback to other weights).
    """
    if variant is not None and not (isinstance(variant, str) and re.fullmatch(r"[\w-]+", variant)):
        raise ValueError(f"variant must be None or a variant name like 'fp16' or 'bf16', not {variant!r}.")

    def names(v: str | None) -> list[str]:
        out = []
        for ext in ("safetensors", "bin"):
            for stem in stems:
                if v is None:
                    out += [f"{stem}.{ext}", f"{stem}.{ext}.index.json"]
                else:
                    out += [f"{stem}.{v}.{ext}", f"{stem}.{ext}.index.{v}.json", f"{stem}.{v}.{ext}.index.json"]
        return out

    order = [variant] if variant else [None, "fp16", "bf16"]
    candidates = [name for v in order for name in names(v)]
    for name in dict.fromkeys(candidates):
        path = folder / name
        if path.is_file():
            return _expand_index(path) if name.endswith(".json") else [path]
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if variant:
        raise WeightsNotFoundError(
            f"{folder}: no {variant!r} variant (looked for {stems[0]}.{variant}.safetensors, "
            f"{stems[0]}.{variant}.bin and their shard indexes); the folder holds {present or 'nothing'}. "
            f"Pass variant=None to load the weights it has (dtype= casts them)."
        )
    raise WeightsNotFoundError(
        f"{folder}: no weights file found (looked for {stems[0]}.safetensors, {stems[0]}.bin, "
        f"fp16 variants and sharded *.index.json); the folder holds {present or 'nothing'}."
    )


def _expand_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"{index}: not a valid shard index ({e.__class__.__name__}: {e}).") from None
    folder = index.parent.resolve()
    shards = []
    for name in dict.fromkeys(weight_map.values()):
        path = (index.parent / name).resolve()
        if folder not in path.parents:
            raise WeightsError(
                f"{index}: shard {name!r} points outside the checkpoint folder {folder}; refusing to read it."
            )
        if not path.is_file():
            raise WeightsNotFoundError(f"{index}: shard file {name!r} is missing from {folder}.")
        shards.append(path)
    return shards


# --------------------------------------------------------------------------- reading
def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Header dict and the byte offset where tensor data starts."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise WeightsError(f"{path}: truncated or corrupt safetensors file ({size} bytes, no header).")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise WeightsError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes in a {size}-byte file).")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise WeightsError(f"{path}: corrupt safetensors file (header is not valid JSON).") from None
    data_start = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if isinstance(info, dict) and isinstance(info.get("dtype"), str) and info["dtype"] not in _ST_DTYPES:
            raise WeightsError(
                f"{path}: tensor {name!r} is stored as {info['dtype']}, a dtype kandinsky cannot read "
                f"(it reads {', '.join(_ST_DTYPES)})."
            )
        try:
            begin, end = info["data_offsets"]
            dtype = _ST_DTYPES[info["dtype"]]
            numel = 1
            for d in info["shape"]:
                numel *= d
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: corrupt safetensors header entry for {name!r}.") from None
        if end - begin != numel * dtype.itemsize or data_start + end > size:
            raise WeightsError(
                f"{path}: truncated or corrupt safetensors file (tensor {name!r} ends at byte "
                f"{data_start + end}, the file has {size})."
            )
    return header, data_start


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Memory-mapped tensors of a safetensors file (no copy where aligned).

    Each tensor gets its own storage, a window of the one copy-on-write mapping: saving,
    pickling or sending one tensor to another process carries its own bytes, not the
    whole file's.
    """
    header, data_start = read_safetensors_header(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) if size else b""
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        start, nbytes = data_start + begin, end - begin
        if nbytes == 0:
            out[name] = torch.empty(info["shape"], dtype=dtype)
            continue
        raw = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=start)
        if start % dtype.itemsize:
            raw = raw.clone()  # misaligned for this dtype: the one case that copies
        out[name] = raw.view(dtype).view(info["shape"])
    return out


# torch.load(weights_only=True) refuses a pickle that builds anything but tensors and plain containers with an
# UnpicklingError starting with this; its text goes on to advise weights_only=False (running the file's code),
# so it is never shown: the message below says what the file holds and the safe ways on
_REFUSED = "Weights only load failed"
_GLOBAL = re.compile(r"GLOBAL (\S+)")  # the first class or function the pickle asked for, in torch's text


def load_torch(path: Path):
    """What a torch ``.bin`` / ``.pt`` file holds, read with ``weights_only=True`` (tensors and plain containers:
    dicts, lists, numbers, strings), memory-mapped where the file allows it. A file holding other Python objects
    is refused, never unpickled; a damaged one too (:class:`WeightsError` either way). The one reader of torch
    files: weights (``read_bin``), LoRA files, the training caches and train-demo's stage checkpoints."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        if _REFUSED not in str(e):
            raise WeightsError(f"{path}: truncated or corrupt PyTorch weights file (UnpicklingError: {e}).") from None
        found = _GLOBAL.search(str(e))
        raise WeightsError(
            f"{path}: the file holds Python objects other than tensors{f' (the first: {found[1]})' if found else ''}; "
            "kandinsky never unpickles those, as unpickling them could run any code the file carries. Pass a real "
            "weights file (.safetensors, or a .bin / .pt holding only tensors), or convert this one to safetensors "
            "where it came from, with the code that wrote it."
        ) from e
    except (zipfile.BadZipFile, EOFError, RuntimeError, ValueError) as e:
        raise WeightsError(f"{path}: truncated or corrupt PyTorch weights file ({e.__class__.__name__}: {e}).") from None


def read_bin(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a torch ``.bin`` / ``.pt`` weights file (``load_torch``): a flat dict of tensors."""
    sd = load_torch(path)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path}: expected a dict of tensors, found {type(sd).__name__}.")
    return sd


def read_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in files:
        part = read_safetensors(path) if path.suffix == ".safetensors" else read_bin(path)
        clash = out.keys() & part.keys()
        if clash:
            raise WeightsError(f"{path}: tensor {sorted(clash)[0]!r} also appears in another shard.")
        out.update(part)
    return out


def header_shapes(files: list[Path]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor without reading data (safetensors only)."""
    for path in files:
        header, _ = read_safetensors_header(path)
        for name, info in header.items():
            if name != "__metadata__":
                yield name, tuple(info["shape"])


# --------------------------------------------------------------------------- writing
def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """Write a safetensors file (the format is small enough to write by hand, one tensor at a time)."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    items = []
    for name in sorted(tensors):
        t = tensors[name]
        if t.device.type == "meta":
            raise WeightsError(f"cannot save {name!r}: it is on the meta device (never loaded).")
        if t.dtype not in _ST_NAMES:
            raise WeightsError(f"cannot save {name!r}: dtype {t.dtype} has no safetensors name.")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        items.append(t)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in items:
            t = t.detach().to("cpu").contiguous()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)
