"""Finding checkpoint folders: local paths, or hub ids from the Hugging Face cache or the hub.

    resolve(name_or_path, what, revision=None, token=None, local_files_only=False) -> Path

A folder is returned as is. A hub id (``org/name``) is looked up as every Hugging Face tool
does, through huggingface_hub and its cache (``HF_HUB_CACHE`` / ``HF_HOME``):

* offline (``local_files_only=True``, or ``HF_HUB_OFFLINE=1`` in the environment): the cached
  snapshot of ``revision`` and nothing else: no network call at all;
* online: one request for the repo's file list at ``revision`` (at most ``HF_HUB_ETAG_TIMEOUT``
  seconds, no retries), then only the files the loader needs that are not cached yet are
  downloaded. If the hub cannot be reached, the cached snapshot is used (with a warning).

``revision`` is a branch, tag or commit hash; ``token`` reaches gated and private repos
(``None``: the token of ``hf auth login``, if any). Every failure is one CheckpointNotFound
(a FileNotFoundError) that says what to do.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

DEFAULT_PRIOR = "kandinsky-community/kandinsky-2-2-prior"
DEFAULT_DECODER = "kandinsky-community/kandinsky-2-2-decoder"

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_TRUE = {"1", "ON", "YES", "TRUE"}


class CheckpointNotFound(FileNotFoundError):
    """Neither a local folder nor a hub repo that could be found in the cache or downloaded."""


def resolve(
    name_or_path: str | Path,
    what: str = "checkpoint",
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local folder for ``name_or_path``: the folder itself, or a hub id's snapshot (see the module doc)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    if path.is_file():
        raise CheckpointNotFound(
            f"{what} {text!r} is a file; pass the checkpoint folder that holds it ({path.parent})."
        )
    if not is_hub_id(text):
        raise CheckpointNotFound(f"{what} {text!r}: no such folder (and not a hub id like 'org/name').")
    if local_files_only or hub_offline():
        return _from_cache(text, what, revision, token)
    return _from_hub(text, what, revision, token)


def is_hub_id(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and not text.startswith((".", "/", "~"))


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as huggingface_hub reads it, also when it was
    set after huggingface_hub was imported."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.upper() in _TRUE


def _download_hint(repo: str, revision: str | None) -> str:
    pin = f" --revision {revision}" if revision else ""
    return (
        f"download it once where the hub is reachable: `hf download {repo}{pin}` (into the cache, "
        f"then it loads offline), or `hf download {repo}{pin} --local-dir ./{repo.split('/')[-1]}` "
        f"and pass that folder"
    )


def _cached_files(repo: str, revision: str | None) -> list[str] | None:
    """The repo's file list as cached by an earlier download (huggingface_hub >= 1.x), else None."""
    try:
        from huggingface_hub import get_cached_repo_tree
    except ImportError:
        return None
    try:
        return [f.path for f in get_cached_repo_tree(repo, revision=revision)]
    except Exception:  # no listing cached for this revision
        return None


def _from_cache(repo: str, what: str, revision: str | None, token) -> Path:
    """The cached snapshot of ``repo`` at ``revision``, without any network call."""
    from huggingface_hub import snapshot_download

    listed = _cached_files(repo, revision)
    try:
        return Path(
            snapshot_download(
                repo,
                revision=revision,
                token=token,
                local_files_only=True,
                allow_patterns=files_to_download(listed) if listed else None,
            )
        )
    except Exception as e:
        at = f" at revision {revision!r}" if revision else ""
        why = "is incomplete" if type(e).__name__ == "IncompleteSnapshotError" else "is not"
        raise CheckpointNotFound(
            f"{what} {repo!r}{at} is not a local folder and {why} in the Hugging Face cache, and downloads are off "
            f"({'local_files_only=True' if not hub_offline() else 'HF_HUB_OFFLINE=1'}). "
            f"Unset HF_HUB_OFFLINE to download it, or {_download_hint(repo, revision)}."
        ) from None


def _kind(error: Exception) -> str:
    """The huggingface_hub error class (by name: its module moved between versions)."""
    names = [c.__name__ for c in type(error).__mro__]
    for kind in ("GatedRepoError", "RevisionNotFoundError", "RepositoryNotFoundError"):
        if kind in names:
            return kind
    status = getattr(getattr(error, "response", None), "status_code", None)
    return "Unauthorized" if status in (401, 403) else "unreachable"


def _from_hub(repo: str, what: str, revision: str | None, token) -> Path:
    """One request for the file list, then the needed files into the cache (cached ones are kept)."""
    from huggingface_hub import HfApi, constants, snapshot_download

    at = f" at revision {revision!r}" if revision else ""
    try:
        info = HfApi(token=token).model_info(repo, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as e:
        kind = _kind(e)
        if kind == "GatedRepoError":
            raise CheckpointNotFound(
                f"{what} {repo!r} is gated: accept its conditions on https://huggingface.co/{repo}, "
                f"then pass token=... (CLI: log in with `hf auth login`)."
            ) from None
        if kind == "RevisionNotFoundError":
            raise CheckpointNotFound(
                f"{what} {repo!r} has no revision {revision!r}: pass a branch, tag or commit hash of the repo."
            ) from None
        if kind in ("RepositoryNotFoundError", "Unauthorized"):
            raise CheckpointNotFound(
                f"{what} {repo!r} is not a local folder, and there is no such repo on the hub, or it is private "
                f"and the token cannot read it "
                f"(check the id; for a private repo pass token=... or log in with `hf auth login`)."
            ) from None
        try:  # the hub is unreachable: the cached snapshot, if there is one
            folder = _from_cache(repo, what, revision, token)
        except CheckpointNotFound:
            raise CheckpointNotFound(
                f"{what} {repo!r}{at} is not a local folder; the hub could not be reached ({e.__class__.__name__}) "
                f"and it is not in the Hugging Face cache. Check the connection, or {_download_hint(repo, revision)}."
            ) from None
        warnings.warn(
            f"the hub could not be reached ({e.__class__.__name__}); using the cached snapshot of {repo!r} "
            f"({folder}). Set HF_HUB_OFFLINE=1 to skip the check.",
            stacklevel=3,
        )
        return folder
    files = [s.rfilename for s in info.siblings or ()]
    try:
        return Path(snapshot_download(repo, revision=revision, token=token, allow_patterns=files_to_download(files)))
    except Exception as e:
        raise CheckpointNotFound(
            f"{what} {repo!r}{at}: the download failed ({e.__class__.__name__}: {e}). Try again, or "
            f"{_download_hint(repo, revision)}."
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

    The hub's Kandinsky 2.2 decoder cards carry a hub id, e.g.::

        ---
        prior:
        - kandinsky-community/kandinsky-2-2-prior
        ---

    A path (``../prior``, ``./x``, ``/abs/x``, ``~/x``) is relative to the card's folder and is
    returned resolved (absolute), so the folder works wherever it is used from; anything else is
    returned as written (a hub id).
    """
    card = Path(decoder_folder) / "README.md"
    if not card.is_file():
        return None
    value = _front_matter_value(card.read_text(encoding="utf-8", errors="replace"), "prior")
    if value is None or is_hub_id(value):
        return value
    return str((Path(decoder_folder) / Path(value).expanduser()).resolve())


def _front_matter_value(text: str, key: str) -> str | None:
    """``key: value``, ``key: [a, b]`` or ``key:`` followed by ``- a`` lines: the first value."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    front = []
    for line in lines[1:]:
        if line.strip() == "---":
            break
        front.append(line)
    for i, line in enumerate(front):
        m = re.match(rf"^{key}:\s*(.*)$", line)
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
