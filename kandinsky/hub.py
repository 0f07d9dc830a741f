"""Finding checkpoint folders: local paths, or hub ids downloaded when online."""
from __future__ import annotations

import re
from pathlib import Path

DEFAULT_PRIOR = "kandinsky-community/kandinsky-2-2-prior"
DEFAULT_DECODER = "kandinsky-community/kandinsky-2-2-decoder"

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class CheckpointNotFound(FileNotFoundError):
    """Neither a local folder nor a hub repo that could be downloaded."""


def resolve(name_or_path: str | Path, what: str = "checkpoint") -> Path:
    """A local folder for ``name_or_path``: the folder itself, or a hub id's snapshot.

    Hub ids (``org/name``) are downloaded with huggingface_hub (a dependency of
    transformers) into its cache; offline, the error names the folder to pass instead.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    if not _REPO_ID.match(text) or text.startswith((".", "/")):
        raise CheckpointNotFound(f"{what} {text!r}: no such folder (and not a hub id like 'org/name').")
    try:
        from huggingface_hub import list_repo_files, snapshot_download

        files = list_repo_files(text)
        return Path(snapshot_download(text, allow_patterns=files_to_download(files)))
    except Exception as e:  # offline, unknown repo, no huggingface_hub ...
        raise CheckpointNotFound(
            f"{what} {text!r} is not a local folder and could not be downloaded from the hub "
            f"({e.__class__.__name__}). Download it where the hub is reachable, e.g. "
            f"`huggingface-cli download {text} --local-dir ./{text.split('/')[-1]}`, "
            f"and pass that folder instead."
        ) from None


_WEIGHTS = re.compile(r"\.(safetensors|bin)(\.index(\.\w+)?\.json)?$")


def _weight_rank(name: str) -> int:
    """Which weight files of a folder to fetch: the loader's preference order
    (full-precision safetensors, half-precision safetensors, full .bin, half .bin)."""
    half = bool(re.search(r"\.(fp16|bf16)[.-]|\.index\.(fp16|bf16)\.json$", name))
    return (0 if ".safetensors" in name else 2) + half


def files_to_download(files: list[str]) -> list[str]:
    """The files of a hub repo a kandinsky pipeline needs: configs, tokenizer files, the
    model card, and for each component folder only the weight files it will load (a repo
    often holds the same weights as .safetensors, .bin and fp16 variants)."""
    keep, weights = [], {}
    for name in files:
        if _WEIGHTS.search(name):
            weights.setdefault(name.rsplit("/", 1)[0] if "/" in name else "", []).append(name)
        elif name.endswith((".json", ".txt", ".md", ".model")):
            keep.append(name)
    for names in weights.values():
        best = min(map(_weight_rank, names))
        keep += [n for n in names if _weight_rank(n) == best]
    return sorted(keep)


def prior_from_model_card(decoder_folder: str | Path) -> str | None:
    """The ``prior:`` entry of a decoder folder's README.md front matter, if any.

    The hub's Kandinsky 2.2 decoder cards carry e.g.::

        ---
        prior:
        - kandinsky-community/kandinsky-2-2-prior
        ---
    """
    card = Path(decoder_folder) / "README.md"
    if not card.is_file():
        return None
    lines = card.read_text(encoding="utf-8", errors="replace").splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    front = []
    for line in lines[1:]:
        if line.strip() == "---":
            break
        front.append(line)
    for i, line in enumerate(front):
        m = re.match(r"^prior:\s*(.*)$", line)
        if not m:
            continue
        value = m.group(1).strip().strip("'\"")
        if value.startswith("[") and value.endswith("]"):
            value = value[1:-1].split(",")[0].strip().strip("'\"")
        if value:
            return value
        for item in front[i + 1 :]:
            m = re.match(r"^\s*-\s*(.+)$", item)
            if m:
                return m.group(1).strip().strip("'\"")
            if item.strip():
                break
    return None
