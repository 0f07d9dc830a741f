"""What a sampling run tells the outside world: the step state (and, re-exported, the model call).

* :class:`StepState` is handed to a step callback after every sampler step (both stages):
  stage ("prior" / "decoder"), step index, timestep (and sigma for sigma-space samplers),
  the new x, the predicted clean sample x0, the guided model output, and the unguided
  branch outputs when classifier-free guidance ran. A callback may return a tensor to
  replace x.

* The model evaluation running *right now* (:class:`ModelCall`: stage, step, timestep and the
  guidance branches of the batch) is part of the call in progress, owned by
  :mod:`kandinsky.calls`; the denoisers set it with :func:`model_call`, hooks read it with
  :func:`current_call`. The names are re-exported here for callers of this module.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kandinsky.calls import BRANCHES_GUIDED, BRANCHES_SINGLE, ModelCall, current_call, model_call  # noqa: F401


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
