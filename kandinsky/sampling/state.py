"""What a sampling run tells the outside world: the step state and the model call in progress.

Two objects, both plain data:

* :class:`StepState` is handed to a step callback after every sampler step (both stages):
  stage ("prior" / "decoder"), step index, timestep (and sigma for sigma-space samplers),
  the new x, the predicted clean sample x0, the guided model output, and the unguided
  branch outputs when classifier-free guidance ran. A callback may return a tensor to
  replace x.

* :class:`ModelCall` describes the model evaluation that is running *right now*: which
  stage, which step, which timestep, and how the batch is laid out into guidance branches
  (``("uncond", "cond")`` when the [negative, positive] batch is evaluated in one pass,
  ``("cond",)`` otherwise). The denoisers set it around every model forward with
  :func:`model_call`; hooks (capture / intervene in ``kandinsky.research``) read it with
  :func:`current_call`. Outside a sampling run it is None.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch

BRANCHES_GUIDED = ("uncond", "cond")
BRANCHES_SINGLE = ("cond",)


@dataclass
class StepState:
    """The state after one sampler step (what callbacks and recorders receive)."""

    stage: str  # "prior" or "decoder"
    step: int  # 0-based index of the sampler step in this run
    timestep: float  # the model's timestep at this step
    x: torch.Tensor  # the sample after the step
    x0: torch.Tensor | None = None  # the predicted clean sample at this step
    model_output: torch.Tensor | None = None  # the guided model output (what the sampler used)
    uncond: torch.Tensor | None = None  # the unconditional branch's output (guidance only)
    cond: torch.Tensor | None = None  # the conditional branch's output (guidance only)
    sigma: float | None = None  # the noise level, for sigma-space samplers
    num_steps: int | None = None  # the number of sampler steps in this run


@dataclass(frozen=True)
class ModelCall:
    """The model evaluation in progress (set by the denoisers, read by hooks)."""

    stage: str  # "prior" or "decoder"
    step: int  # sampler step index (several evaluations may share one step: Heun, ...)
    timestep: float
    branches: tuple[str, ...] = BRANCHES_SINGLE  # the batch split into equal chunks, in this order
    extra: dict = field(default_factory=dict, compare=False)


_CURRENT: contextvars.ContextVar[ModelCall | None] = contextvars.ContextVar("kandinsky_model_call", default=None)


def current_call() -> ModelCall | None:
    """The model call in progress, or None outside a sampling run."""
    return _CURRENT.get()


@contextlib.contextmanager
def model_call(stage: str, step: int, timestep, branches: tuple[str, ...] = BRANCHES_SINGLE, **extra):
    """Mark the model evaluation(s) inside the block as ``stage``/``step``/``timestep``/``branches``."""
    token = _CURRENT.set(ModelCall(stage, int(step), float(timestep), tuple(branches), dict(extra)))
    try:
        yield
    finally:
        _CURRENT.reset(token)
