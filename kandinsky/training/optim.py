"""What every training step shares: the learning-rate schedule, the end of a step (clip, step,
zero the gradients, update the EMA) and the EMA of the weights.

Both trainings use these and only these: ``kandinsky train`` (kandinsky.training.loop, a
constant rate after a warm-up in steps, a constant EMA decay) and ``kandinsky train-demo``
(kandinsky.data.train_demo, a cosine over the stage's share of its time budget, an EMA whose
decay ramps up over the first updates).

    lr = lr_at(t, base=1e-4, warmup=100)                         # constant after 100 steps
    lr = lr_at(0.5, base=1e-3, warmup=0.03, end=1.0, floor=0.02) # a cosine over a run's fraction
    set_lr(optimizer, lr)
    loss.backward()
    grad_norm = optimizer_step(optimizer, params, max_grad_norm=1.0, ema=ema)
"""
from __future__ import annotations

import contextlib
import math

import torch


def lr_at(t: float, base: float, warmup: float = 0.0, end: float | None = None, floor: float = 0.0) -> float:
    """The learning rate at ``t`` (steps, or a fraction of the run: ``warmup`` and ``end`` in the same unit).

    A linear warm-up ``base * t / warmup`` while ``t < warmup``; then ``base`` (``end`` None) or the
    cosine ``base * (1 + cos(pi * min(t / end, 1))) / 2``; never below ``floor * base``."""
    if warmup and t < warmup:
        lr = base * (t / warmup)
    elif end is None:
        lr = base
    else:
        lr = base * 0.5 * (1 + math.cos(math.pi * min(t / end, 1)))
    return max(lr, base * floor)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Every parameter group of ``optimizer`` at ``lr``; returns ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def optimizer_step(optimizer: torch.optim.Optimizer, params, max_grad_norm: float | None = None,
                   ema: EMA | None = None) -> float:
    """The end of a training step, after ``backward``: clip the gradients' total norm to
    ``max_grad_norm`` (None or 0: no clipping), step, drop the gradients, update ``ema``.
    Returns the gradient norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update(params)
    return float(grad_norm)


class EMA:
    """Exponential moving average of the trained parameters: ``ema = decay * ema + (1 - decay) * p``.

    ``ramp=True``: after ``n`` updates the decay is ``min(decay, (1 + n) / (10 + n))`` (0.1, 0.18, 0.25,
    ...), so the first updates follow the weights closely instead of averaging in the random start."""

    def __init__(self, params, decay: float, ramp: bool = False):
        self.decay, self.ramp, self.updates = decay, ramp, 0
        self.shadow = [p.detach().clone().float() for p in params]  # fp32 copies of the parameters

    def decay_now(self) -> float:
        """The decay of the next update."""
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n)) if self.ramp else self.decay

    @torch.no_grad()
    def update(self, params) -> None:
        weight = 1.0 - self.decay_now()
        for s, p in zip(self.shadow, params):
            s.lerp_(p.detach().float(), weight)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, params) -> None:
        """The parameters take the EMA weights (for good)."""
        for s, p in zip(self.shadow, params):
            p.copy_(s)

    @contextlib.contextmanager
    def applied(self, params):
        """Inside: the parameters hold the EMA weights; restored after."""
        saved = [p.detach().clone() for p in params]
        self.copy_to(params)
        try:
            yield
        finally:
            with torch.no_grad():
                for s, p in zip(saved, params):
                    p.copy_(s)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        for s, saved in zip(self.shadow, state["shadow"]):
            s.copy_(saved)
        self.updates = state.get("updates", 0)  # checkpoints written before the count was kept: 0
