"""The call in progress: which model evaluation, and which hooked attention layer, is running now.

One context variable holds both, as a frozen :class:`InProgress`; code that starts a call sets
its field for the length of the call and puts the old value back after it:

* ``model``: a :class:`ModelCall`, set by the denoisers (``kandinsky.sampling.denoisers``) around
  every model forward with :func:`model_call`: the stage, the sampler step, the timestep, and how
  the batch is laid out into guidance branches (``("uncond", "cond")`` when the [negative,
  positive] batch runs in one pass, ``("cond",)`` otherwise). Hooks (``kandinsky.capture`` /
  ``intervene``) read it with :func:`current_call`; outside a sampling run it is None.
* ``layer``: a :class:`LayerCall`, set by the forward pre-hook that
  :func:`kandinsky.attention.hook_layer` installs on one attention module and reset by its
  forward hook: while that module runs, :func:`kandinsky.attention.attention` passes q, k, v
  through its hooks. None whenever no hooked layer is running.

A context variable (not a module global) keeps threads and asyncio tasks apart. torch.compile
does not trace context variables, so the attention function reads ``layer`` only when it is not
being compiled (a compiled graph runs no hooks added after compiling anyway).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass
from typing import Callable

BRANCHES_GUIDED = ("uncond", "cond")
BRANCHES_SINGLE = ("cond",)


@dataclass(frozen=True)
class ModelCall:
    """The model evaluation in progress (set by the denoisers, read by hooks)."""

    stage: str  # "prior" or "decoder"
    step: int  # sampler step index (several evaluations may share one step: Heun, ...)
    timestep: float
    branches: tuple[str, ...] = BRANCHES_SINGLE  # the batch split into equal chunks, in this order
    cached: bool = False  # decoder feature caching: only the UNet levels above the cut ran (the rest reused)


@dataclass(frozen=True)
class LayerCall:
    """The hooked attention layer running now and its hooks, outermost first."""

    module: object  # the torch module (kept as an object: this layer imports no torch)
    hooks: tuple[Callable, ...]


@dataclass(frozen=True)
class InProgress:
    model: ModelCall | None = None
    layer: LayerCall | None = None


_NOW: contextvars.ContextVar[InProgress] = contextvars.ContextVar("kandinsky_in_progress", default=InProgress())


def now() -> InProgress:
    """The call in progress (both fields None outside any)."""
    return _NOW.get()


def enter(**fields) -> contextvars.Token:
    """Set fields of the call in progress (``model=...``, ``layer=...``); :func:`leave` with the token
    puts the old value back. For hooks that start and end a call in two functions."""
    return _NOW.set(dataclasses.replace(_NOW.get(), **fields))


def leave(token: contextvars.Token) -> None:
    _NOW.reset(token)


@contextlib.contextmanager
def scope(**fields):
    """Set fields of the call in progress for the length of the block."""
    token = enter(**fields)
    try:
        yield
    finally:
        leave(token)


def current_call() -> ModelCall | None:
    """The model call in progress, or None outside a sampling run."""
    return _NOW.get().model


def model_call(stage: str, step: int, timestep, branches: tuple[str, ...] = BRANCHES_SINGLE, cached: bool = False):
    """Mark the model evaluation(s) inside the block as ``stage``/``step``/``timestep``/``branches``
    (``cached``: a decoder evaluation that reused the deep UNet levels' cached output)."""
    return scope(model=ModelCall(stage, int(step), float(timestep), tuple(branches), bool(cached)))
