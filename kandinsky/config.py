"""Config dataclasses that mirror a checkpoint's ``config.json``.

Every model config is a dataclass whose fields are the ``config.json`` keys that
change the network's *sizes* (channels, layers, heads, ...). Keys whose value is
fixed by the Kandinsky 2.2 architecture live in ``FIXED``: a checkpoint may state
them, but only with the value we implement. Keys that change nothing we compute
(library versions, init ranges, ...) live in ``IGNORED``. Anything else is an
error that names the key: we never silently build a different network.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A checkpoint config asks for something this implementation does not build."""


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return False
    return a == b


@dataclasses.dataclass
class ComponentConfig:
    """Base class: subclasses are dataclasses named after what they configure."""

    # The value of ``_class_name`` (diffusers) or ``architectures[0]`` (transformers).
    CLASS_NAME: ClassVar[str] = ""
    # Keys that must have exactly this value (Kandinsky 2.2's architecture). A key
    # may allow several values: give a tuple wrapped in ``AnyOf``.
    FIXED: ClassVar[dict[str, Any]] = {}
    # Keys that do not change the computation and are accepted with any value.
    IGNORED: ClassVar[frozenset[str]] = frozenset()
    # Extra keys written by ``to_dict`` so the reference library can load the folder.
    EXTRA_OUT: ClassVar[dict[str, Any]] = {}

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> "ComponentConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in config.items():
            if key in fields:
                if isinstance(value, list):
                    value = tuple(value)
                kwargs[key] = value
            elif key in cls.FIXED:
                allowed = cls.FIXED[key]
                options = allowed.values if isinstance(allowed, AnyOf) else (allowed,)
                if not any(_same(value, option) for option in options):
                    shown = " or ".join(repr(o) for o in options)
                    raise ConfigError(
                        f"{source}: {key}={value!r} is not supported by kandinsky's "
                        f"{cls.__name__} (Kandinsky 2.2 uses {shown})."
                    )
            elif key.startswith("_") or key in cls.IGNORED or key in _ALWAYS_IGNORED:
                continue
            else:
                raise ConfigError(
                    f"{source}: unknown key {key!r} (value {value!r}) for {cls.__name__}; "
                    "this implementation does not know what it would change, so it refuses "
                    "to guess. Remove the key if it is a no-op for your checkpoint."
                )
        try:
            cfg = cls(**kwargs)
        except TypeError as e:  # pragma: no cover - defensive
            raise ConfigError(f"{source}: {e}") from None
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config.json") -> None:
        """Subclasses check relations between sizes here (raise ConfigError)."""

    def to_dict(self) -> dict:
        """The config as the reference library writes it (loadable by it)."""
        out = dict(self.EXTRA_OUT)
        for key, value in self.FIXED.items():
            out[key] = value.values[0] if isinstance(value, AnyOf) else value
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}


@dataclasses.dataclass(frozen=True)
class AnyOf:
    """Several accepted values for a FIXED key; the first is the one written out."""

    values: tuple

    def __init__(self, *values):
        object.__setattr__(self, "values", tuple(values))


# Keys that any diffusers / transformers config may carry and that change nothing.
_ALWAYS_IGNORED = frozenset(
    {
        "transformers_version",
        "torch_dtype",
        "dtype",
        "initializer_range",
        "initializer_factor",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
        "use_return_dict",
        "id2label",
        "label2id",
        "name_or_path",
        "_name_or_path",
    }
)
