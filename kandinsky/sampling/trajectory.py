"""Trajectories: the x and predicted x0 of every step of a run, and a picture of them.

    traj = Trajectory()                                   # a recorder: pass it as the step callback
    pipe.text2img(e, n, callback_on_step_end=traj)        # or return_trajectory=True -> out.trajectory
    traj.x0            # (steps, B, 4, h, w) on the CPU
    save_x0_grid(traj, decoder.movq, "grid.png")          # steps across, batch down
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import torch

from kandinsky.sampling.state import StepState


class Trajectory:
    """Records each step's x and x0 (copied to ``device``, default CPU) and the timesteps."""

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        self.device, self.dtype = torch.device(device), dtype
        self.stage: str | None = None
        self.steps: list[int] = []
        self.timesteps: list[float] = []
        self.sigmas: list[float | None] = []
        self._x: list[torch.Tensor] = []
        self._x0: list[torch.Tensor] = []

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(self.device, self.dtype or t.dtype, copy=True)

    def __call__(self, state: StepState) -> None:
        self.stage = state.stage
        self.steps.append(state.step)
        self.timesteps.append(state.timestep)
        self.sigmas.append(state.sigma)
        self._x.append(self._keep(state.x))
        if state.x0 is not None:
            self._x0.append(self._keep(state.x0))
        return None

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def x(self) -> torch.Tensor:
        """(steps, B, ...) the sample after each step."""
        return torch.stack(self._x)

    @property
    def x0(self) -> torch.Tensor:
        """(steps, B, ...) the predicted clean sample at each step."""
        if not self._x0:
            raise ValueError("this trajectory recorded no x0 (the sampler gave none).")
        return torch.stack(self._x0)

    def __repr__(self) -> str:
        return f"Trajectory(stage={self.stage!r}, steps={len(self)})"


@torch.no_grad()
def x0_previews(trajectory: Trajectory, movq, every: int = 1, size: int | None = None) -> torch.Tensor:
    """Decode the decoder's x0 of every ``every``-th step (and the last) with MoVQ:
    (steps', B, 3, H, W) in [0, 1] on the CPU."""
    if trajectory.stage not in (None, "decoder"):
        raise ValueError(f"x0 previews decode decoder latents; this trajectory is the {trajectory.stage}'s.")
    x0 = trajectory.x0  # (S, B, 4, h, w)
    picks = sorted(set(range(0, len(x0), max(1, every))) | {len(x0) - 1})
    param = next(movq.parameters())
    frames = []
    for i in picks:
        image = movq.decode(x0[i].to(param.device, param.dtype), force_not_quantize=True)  # (B, 3, H, W)
        image = (image.float() * 0.5 + 0.5).clamp(0, 1).cpu()
        if size is not None:
            image = torch.nn.functional.interpolate(image, size=(size, size), mode="bilinear", antialias=True)
        frames.append(image)
    return torch.stack(frames)


def grid_image(frames: torch.Tensor, pad: int = 2) -> PIL.Image.Image:
    """(S, B, 3, H, W) in [0, 1] -> one picture: steps across, batch down."""
    S, B, _, H, W = frames.shape
    canvas = np.full((B * (H + pad) + pad, S * (W + pad) + pad, 3), 255, dtype=np.uint8)
    pixels = (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()
    for s in range(S):
        for b in range(B):
            y, x = pad + b * (H + pad), pad + s * (W + pad)
            canvas[y : y + H, x : x + W] = pixels[s, b]
    return PIL.Image.fromarray(canvas)


def save_x0_grid(trajectory: Trajectory, movq, path, every: int = 1, size: int | None = 128) -> Path:
    """Write the x0 preview grid of a decoder trajectory (steps across, batch down) to ``path``."""
    path = Path(path)
    grid_image(x0_previews(trajectory, movq, every=every, size=size)).save(path)
    return path
