"""Input checks of the models' ``forward``: one wording for every model.

Each model keeps its ``forward`` the maths and calls its ``check_inputs`` once at the top;
that method is built from the helpers here. They read types, dtypes, devices and shapes only
(nothing data-dependent, so they compile away under ``torch.compile``) and raise before torch
would fail deep inside a layer with a message that names no argument:

    check_tensor(model, "sample", sample)                  # a float tensor on the model's device
                                                           # in the model's dtype (unless autocast)
    check_tensor(model, "input_ids", ids, kind="int")      # integer ids on the model's device
    check_timestep(timestep, batch)                        # a number, a 0-d or a (B,) tensor
    fail(model, ["x must be (B, 4)", ...])                  # one ValueError for the shape problems

A model names the variable its users hold it in with ``VARIABLE`` (``"unet"``), so each message
says the fix: ``pass sample.to(unet.dtype)``. ``with_article(word)`` ("an integer", "a prior") is the
a/an rule of every message, the pipelines' and the CLI's too.
"""
from __future__ import annotations

import torch

# kind -> (what the dtype must be, the test)
KINDS = {
    "weights": ("floating-point", torch.Tensor.is_floating_point),  # and the model's dtype
    "float": ("floating-point", torch.Tensor.is_floating_point),  # any precision (cast inside)
    "int": ("integer", lambda x: not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool),
    "any": ("", lambda x: True),
}


def with_article(word: str) -> str:
    """``word`` after "a" or "an" (by its first letter: "an integer", "a prior"); every message's one rule."""
    return ("an " if word[:1].lower() in tuple("aeiou") else "a ") + word


def autocasting(device: torch.device) -> bool:
    """True under torch.autocast on ``device`` (weights' and inputs' dtypes may then differ)."""
    return device.type != "meta" and torch.is_autocast_enabled(device.type)


def check_tensor(model, name: str, x, kind: str = "weights", hint: str = "", optional: bool = False) -> None:
    """``x`` is a tensor of ``kind`` on the model's device (and, for "weights", in its dtype).

    hint: what the argument holds and how to make it, appended to the type errors
    (" in [0, 1] (convert a uint8 image with x / 255)")."""
    if x is None and optional:
        return
    family, ok = KINDS[kind]
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{hint}, got {type(x).__name__}.")
    if not ok(x):
        raise TypeError(f"{name} must be {with_article(family)} tensor{hint}, got {x.dtype}.")
    owner, var = type(model).__name__, model.VARIABLE
    if x.device != model.device:
        raise ValueError(f"{name} is on {x.device} but the {owner} is on {model.device}; pass {name}.to({var}.device).")
    if kind == "weights" and x.dtype != model.dtype and not autocasting(x.device):
        raise TypeError(f"{name} is {x.dtype} but the {owner} weights are {model.dtype}; pass {name}.to({var}.dtype).")


def check_timestep(timestep, batch: int) -> str | None:
    """The problem with a timestep for a batch of ``batch`` (None if it is a number, a 0-d or a (B,) tensor)."""
    t = timestep if isinstance(timestep, torch.Tensor) else torch.as_tensor(timestep)
    if t.ndim > 1 or t.numel() not in (1, batch):
        return (f"timestep must be a number, a 0-d tensor or a ({batch},) tensor for a batch of {batch}, "
                f"got shape {tuple(t.shape)}")
    return None


def fail(model, problems: list[str | None]) -> None:
    """Raise one ValueError naming the model and every problem found (None entries are no problem)."""
    problems = [p for p in problems if p]
    if problems:
        raise ValueError(f"{type(model).__name__}: " + "; ".join(problems) + ".")
