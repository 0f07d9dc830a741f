"""Config dataclasses that mirror a checkpoint's ``config.json``.

Every model config is a dataclass whose fields are the ``config.json`` keys that
change the network's *sizes* (channels, layers, heads, ...). Keys whose value is
fixed by the Kandinsky 2.2 architecture live in ``FIXED``: a checkpoint may state
them, but only with the value we implement. Keys that change nothing we compute
(library versions, init ranges, ...) live in ``IGNORED``. Anything else is an
error that names the key: we never silently build a different network.

Every field's value is checked against its declared type, once, here (``check_field_types``):
``int`` fields hold positive integers (a field declared with ``any_sign(default)`` takes any
integer), ``int | None`` fields null or a positive integer, ``float`` fields positive numbers,
``bool`` / ``str`` fields booleans / strings, ``tuple[int, ...]`` fields non-empty lists of
positive integers (``tuple[str, ...]``, ``tuple[float, ...]`` likewise). A subclass's
``check_sizes`` then checks the relations between sizes (divisibility, level counts, ...).
"""
from __future__ import annotations

import dataclasses
import types
import typing
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
        """Raise ConfigError naming the key, the value and ``source`` unless every field has its
        declared type (check_field_types) and the sizes fit together (check_sizes)."""
        check_field_types(self, source)
        self.check_sizes(source)

    def check_sizes(self, source: str = "config.json") -> None:
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


class ResolutionLevels:
    """For the configs of the convolutional models (UNet, MoVQ): one width per resolution level in
    ``block_out_channels``, each level but the last halving the resolution."""

    @property
    def depth(self) -> int:
        """Number of resolution levels (4 in Kandinsky 2.2)."""
        return len(self.block_out_channels)

    @property
    def downsampling_factor(self) -> int:
        """How much the model halves the resolution: sizes must be multiples of it (8 for depth 4)."""
        return 2 ** (self.depth - 1)


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


# ----------------------------------------------------------------------------- field types
ANY_SIGN = "any_sign"  # field metadata key: numbers of any sign, not only positive ones


def any_sign(default):
    """A dataclass field of numbers (``int``, ``float`` or a tuple of them) that may be zero or
    negative: a token id, a mean."""
    return dataclasses.field(default=default, metadata={ANY_SIGN: True})


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_positive_int(v) -> bool:
    return _is_int(v) and v > 0


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_positive_number(v) -> bool:
    return _is_number(v) and v > 0


# declared type -> (test of one value, what it must be, what a list of them must hold)
_ANY_SIGN = {int: (_is_int, "a single integer", "integers"), float: (_is_number, "a number", "numbers")}
_SCALARS = {
    int: (_is_positive_int, "a positive integer", "positive integers"),
    float: (_is_positive_number, "a positive number", "positive numbers"),
    bool: (lambda v: isinstance(v, bool), "true or false", "booleans"),
    str: (lambda v: isinstance(v, str), "a string", "strings"),
}


def _rule(tp, any_sign: bool) -> tuple:
    """(test, what the value must be) of a declared field type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    scalars = {**_SCALARS, **_ANY_SIGN} if any_sign else _SCALARS
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        test, what = _rule(inner, any_sign)
        return (lambda v: v is None or test(v)), f"null or {what}"
    if origin is tuple:  # tuple[X, ...]
        test, _, plural = scalars[args[0]]
        return (lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(test(x) for x in v)), \
            f"a non-empty list of {plural}"
    test, what, _ = scalars[tp]
    return test, what


def check_field_types(config, source: str) -> None:
    """Raise ConfigError naming the key, the value and the file for the first field whose value
    is not of its declared type."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        test, what = _rule(hints[f.name], f.metadata.get(ANY_SIGN, False))
        value = getattr(config, f.name)
        if not test(value):
            raise ConfigError(f"{source}: {f.name}={value!r} must be {what}.")
