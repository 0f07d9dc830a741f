"""Renaming tensor keys between the hub's names and kandinsky's, driven by a table.

A table is a list of ``(hub_prefix, our_prefix)`` pairs. Prefixes are dotted module
paths and may hold integer placeholders such as ``{i}``; a key is renamed by the
longest matching prefix (matching whole dotted components) and keeps the rest
(``.weight``, ``.bias``, ...). The same table renames the other way by swapping the
pair. Keys that no rule matches keep their name, so a table lists only what differs.

    >>> table = [("text_model.encoder.layers.{i}.self_attn", "blocks.{i}.attn")]
    >>> rename("text_model.encoder.layers.3.self_attn.q_proj.weight", table)
    'blocks.3.attn.q_proj.weight'
    >>> rename("blocks.3.attn.q_proj.weight", table, reverse=True)
    'text_model.encoder.layers.3.self_attn.q_proj.weight'
"""
from __future__ import annotations

import functools
import re
from typing import Sequence

Table = Sequence[tuple[str, str]]

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _compile(pattern: str) -> re.Pattern:
    parts = []
    pos = 0
    for m in _PLACEHOLDER.finditer(pattern):
        parts.append(re.escape(pattern[pos : m.start()]))
        parts.append(f"(?P<{m.group(1)}>\\d+)")
        pos = m.end()
    parts.append(re.escape(pattern[pos:]))
    return re.compile("^" + "".join(parts) + r"(?=\.|$)")


@functools.lru_cache(maxsize=None)
def _compiled(table: tuple[tuple[str, str], ...], reverse: bool):
    rules = []
    for hub, ours in table:
        src, dst = (ours, hub) if reverse else (hub, ours)
        if sorted(_PLACEHOLDER.findall(src)) != sorted(_PLACEHOLDER.findall(dst)):
            raise ValueError(f"rename rule {hub!r} <-> {ours!r}: placeholders differ")
        # literal length ranks rules: the most specific prefix wins
        literal = len(_PLACEHOLDER.sub("", src))
        rules.append((literal, _compile(src), dst))
    rules.sort(key=lambda r: -r[0])
    return rules


def rename(key: str, table: Table, reverse: bool = False) -> str:
    """Rename one key with ``table`` (hub -> ours, or ours -> hub if ``reverse``)."""
    for _, pattern, dst in _compiled(tuple(map(tuple, table)), reverse):
        m = pattern.match(key)
        if m:
            return dst.format(**m.groupdict()) + key[m.end() :]
    return key


def rename_all(keys, table: Table, reverse: bool = False) -> dict[str, str]:
    """Map every key to its new name; raises if two keys would get the same name."""
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for key in keys:
        new = rename(key, table, reverse)
        if new in seen:
            raise ValueError(f"rename table maps both {seen[new]!r} and {key!r} to {new!r}")
        seen[new] = key
        out[key] = new
    return out
