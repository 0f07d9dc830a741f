"""What every sampler shares: the plan of a run, the denoiser's answer, the per-step callback.

A *plan* holds the timesteps (and sigmas) of one run, in the reference scheduler's exact
spacing, and where the run begins (img2img and emb2emb run the tail of a plan). Its ``space``
says what x is between steps:
  "vp"     x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps   (DDPM, DDIM, UnCLIP, DPM-Solver++, UniPC)
  "sigma"  x = x_0 + sigma eps, fed to the model as x / sqrt(sigma^2 + 1)   (Euler, Euler ancestral, Heun)
and its ``levels`` where a noise level is read: the schedule's alpha_bar at the plan's
timesteps, or the plan's own sigmas (the solvers, whose levels may fall between timesteps).

A *denoiser* is a callable ``denoiser(x, t, step) -> Guided`` (see denoisers.py). After every
sampler step the callback receives a :class:`StepState`; a tensor it returns replaces x.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Literal

import torch

from kandinsky.sampling.schedule import NoiseSchedule, randn
from kandinsky.sampling.state import StepState


@dataclass
class Plan:
    """The noise levels of one sampling run (built by ``samplers.make_plan``)."""

    schedule: NoiseSchedule  # the tables (and config) the plan was made from
    timesteps: torch.Tensor  # (n,) the model timestep of each step (CPU; long, or float for sigma samplers)
    prev_timesteps: list[int] | None = None  # discrete samplers: the level each step lands on (-1: clean)
    sigmas: torch.Tensor | None = None  # (n + 1,) float32 for the solvers, ending at 0
    space: Literal["vp", "sigma"] = "vp"  # what x is between steps (module doc)
    levels: Literal["timesteps", "sigmas"] = "timesteps"  # where add_noise reads a noise level
    begin: int = 0  # first step run (img2img: the tail of the plan)
    init_noise_sigma: float = 1.0  # x_T ~ N(0, init_noise_sigma^2) when starting from noise

    @property
    def num_steps(self) -> int:
        """Sampler steps in the whole plan (the run does ``num_steps - begin`` of them)."""
        return len(self.timesteps)

    def tail(self, steps: int) -> "Plan":
        """The same plan run for its last ``steps`` steps only (img2img with strength < 1)."""
        if not 1 <= steps <= self.num_steps:
            raise ValueError(f"a plan of {self.num_steps} steps has no tail of {steps}.")
        return replace(self, begin=self.num_steps - steps)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, index: int | None = None) -> torch.Tensor:
        """x_0 noised to the level the sampler is at before step ``index`` (default: the first step
        run); ``index == num_steps`` is the clean end. In the plan's space, computed in x0's dtype."""
        index = self.begin if index is None else index
        if index >= self.num_steps:
            return x0
        if self.levels == "timesteps":
            t = self.timesteps[index : index + 1].repeat(x0.shape[0])  # (B,)
            return self.schedule.add_noise(x0, noise, t)
        sigma = self.sigmas[index].to(x0.device, x0.dtype)
        if self.space == "sigma":
            return x0 + noise * sigma
        alpha_t = (sigma**2 + 1) ** -0.5  # a VP level given by its sigma (DPM-Solver++, UniPC)
        return alpha_t * x0 + sigma * alpha_t * noise

    def model_input(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """What the model sees at step ``index``: x itself, or x / sqrt(sigma^2 + 1) in sigma space."""
        if self.space == "sigma":
            return x / ((self.sigmas[index] ** 2 + 1) ** 0.5)
        return x


@dataclass
class Guided:
    """A denoiser's answer: the guided model output, and the branches when guidance ran."""

    output: torch.Tensor
    uncond: torch.Tensor | None = None
    cond: torch.Tensor | None = None


Denoiser = Callable[[torch.Tensor, torch.Tensor, int], Guided]
Callback = Callable[[StepState], "torch.Tensor | None"]


def run_callback(callback, state: StepState) -> torch.Tensor:
    """The callback's replacement x (checked), or the state's x."""
    if callback is None:
        return state.x
    out = callback(state)
    if out is None:
        return state.x
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"a step callback must return None or a tensor (the replacement x), got {type(out).__name__}."
        )
    if out.shape != state.x.shape:
        raise ValueError(f"the step callback returned x of shape {tuple(out.shape)}, expected {tuple(state.x.shape)}.")
    return out.to(state.x.device, state.x.dtype)


def step_state(denoiser, plan: Plan, i: int, x, x0, guided: Guided, sigma=None) -> StepState:
    """The state after step ``i`` of ``plan``: the new x, the x_0 estimate, the model's outputs."""
    return StepState(
        stage=getattr(denoiser, "stage", "decoder"),
        step=i - plan.begin,
        timestep=float(plan.timesteps[i]),
        x=x,
        x0=x0,
        model_output=guided.output,
        uncond=guided.uncond,
        cond=guided.cond,
        sigma=sigma,
        num_steps=plan.num_steps - plan.begin,
    )


def noise_like(out: torch.Tensor, generator) -> torch.Tensor:
    """Fresh noise of the model output's shape, device and dtype (the reference's draw)."""
    return randn(out.shape, generator, out.device, out.dtype)
