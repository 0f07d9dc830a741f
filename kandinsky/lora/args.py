"""The ``FILE[:SCALE]`` form of a LoRA argument (the CLI's ``--lora``, kandinsky.cli.common): parse it,
load the files into a pipeline."""
from __future__ import annotations

from pathlib import Path

from kandinsky.lora import LoRAError, check_scale  # (no torch here: parsers build fast; load_lora is imported on use)


def parse_lora_arg(arg: str) -> tuple[str, float]:
    """"style.safetensors:0.8" -> ("style.safetensors", 0.8); "style.safetensors" -> (..., 1.0).

    The scale is what follows the last ':' when it is a number, so paths holding ':' still work; it must
    be a usable strength (``check_scale``: finite, within +-MAX_SCALE).
    """
    if not isinstance(arg, str) or not arg.strip():
        raise LoRAError(f"--lora: expected FILE[:SCALE], e.g. style.safetensors:0.8, got {arg!r}.")
    path, sep, tail = arg.rpartition(":")
    if not sep or Path(arg).exists():
        return arg, 1.0
    try:
        scale = float(tail)
    except ValueError:
        raise LoRAError(f"--lora {arg}: {tail!r} after the last ':' is not a number; expected FILE[:SCALE], "
                        "e.g. style.safetensors:0.8.") from None
    if not path:
        raise LoRAError(f"--lora {arg}: no file before ':'; expected FILE[:SCALE].")
    return path, check_scale(scale, f"--lora {arg}")


def apply_lora_args(pipeline, args) -> list[str]:
    """Load every ``--lora`` argument into ``pipeline``; returns the adapter names.

    Errors (missing file, wrong format, a LoRA for another model) are LoRAError (a ValueError)
    whose message starts with the argument, ready for ``error: ...``.
    """
    from kandinsky.lora.files import load_lora

    names = []
    for arg in args or ():
        path, scale = parse_lora_arg(arg)
        if not Path(path).exists():
            raise LoRAError(f"--lora {arg}: {path}: no such file or folder.")
        taken = set(names)
        try:
            name = load_lora(pipeline, path, scale=scale,
                             name=_unique(Path(path), taken) if taken else None)
        except LoRAError as e:
            raise LoRAError(f"--lora {arg}: {e}") from None
        names.append(name)
    return names


def _unique(path: Path, taken: set[str]) -> str:
    """Adapter name for a file: its stem, numbered if another --lora already used it."""
    from kandinsky.lora.files import default_name

    base = default_name(path if path.is_file() else path / "adapter_model.safetensors")
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name
