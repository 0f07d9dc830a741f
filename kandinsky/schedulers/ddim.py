"""DDIM (Song et al. 2020, https://arxiv.org/abs/2010.02502): a faster, deterministic decoder sampler.

Built from the decoder's DDPM ``scheduler_config.json`` (same betas, same "leading"
timesteps), like the reference's ``DDIMScheduler.from_config(ddpm_config)``. With eta = 0
(default) a step draws no noise; eta = 1 gives DDPM-like ancestral noise.
"""
from __future__ import annotations

import dataclasses

import torch

from kandinsky.config import ComponentConfig
from kandinsky.sampling.formulas import x0_from_eps
from kandinsky.schedulers.common import Scheduler, make_betas, randn, require
from kandinsky.schedulers.ddpm import (
    _FIXED,
    _IGNORED,
    DDPMSchedulerConfig,
    _validate_betas_and_spacing,
    leading_timesteps,
)


@dataclasses.dataclass
class DDIMSchedulerConfig(ComponentConfig):
    """Fields mirror the reference's ``scheduler_config.json`` keys (defaults: the reference's)."""

    CLASS_NAME = "DDIMScheduler"
    EXTRA_OUT = {"_class_name": "DDIMScheduler"}
    FIXED = _FIXED
    IGNORED = _IGNORED

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    # True: the step after the last lands on alpha_bar = 1 (clean x_0); False: on alpha_bar_0.
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"  # only value implemented
    timestep_spacing: str = "leading"  # only value implemented

    def validate(self, source: str = "scheduler_config.json") -> None:
        _validate_betas_and_spacing(self, source)
        require(source, "set_alpha_to_one", self.set_alpha_to_one, (True, False))

    @classmethod
    def from_ddpm(cls, ddpm: DDPMSchedulerConfig) -> "DDIMSchedulerConfig":
        """The DDIM config the reference builds from a DDPM config (variance_type has no use here)."""
        shared = {f.name: getattr(ddpm, f.name) for f in dataclasses.fields(cls) if f.name != "set_alpha_to_one"}
        if ddpm.set_alpha_to_one is not None:
            shared["set_alpha_to_one"] = ddpm.set_alpha_to_one
        return cls(**shared)


class DDIMScheduler(Scheduler):
    CONFIG = DDIMSchedulerConfig
    KIND = "ddim"

    def __init__(self, config: DDIMSchedulerConfig, eta: float = 0.0):
        super().__init__(config)
        c = config
        self._set_noise_tables(make_betas(c.beta_schedule, c.beta_start, c.beta_end, c.num_train_timesteps))
        # alpha_bar "before" timestep 0, where the last step lands.
        self.final_alpha_cumprod = self.one if c.set_alpha_to_one else self.alphas_cumprod[0]
        self.eta = eta  # default eta of `step`

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        c = self.config
        timesteps = leading_timesteps(c.num_train_timesteps, num_inference_steps, c.steps_offset)
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.tensor(timesteps, dtype=torch.long, device="cpu").to(device)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prev_timestep: int | torch.Tensor | None = None,
        eta: float | None = None,
    ) -> torch.Tensor:
        """One DDIM step x_t -> x_prev (Song et al. eq. 12); prev = ``prev_timestep``, by default
        t - T // num_inference_steps. Draws noise (shape and dtype of ``model_output``) only
        if eta > 0."""
        eta = self.eta if eta is None else eta
        t = int(timestep)
        if prev_timestep is None:
            if self.num_inference_steps is None:
                raise ValueError("call set_timesteps before step")
            prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        else:
            prev_t = int(prev_timestep)

        alpha_bar_t = self._alpha_bar(t, self.final_alpha_cumprod)
        alpha_bar_prev = self._alpha_bar(prev_t, self.final_alpha_cumprod)
        beta_bar_t = 1 - alpha_bar_t

        # 1. Estimates of x_0 and of the noise: x_0 = (x_t - sqrt(1 - alpha_bar_t) * eps) / sqrt(alpha_bar_t).
        pred_x0 = x0_from_eps(sample, model_output, alpha_bar_t)
        pred_eps = model_output  # kept unclipped, as the reference does by default
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            pred_x0 = pred_x0.clamp(-r, r)

        # 2. sigma_t = eta * sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev))
        #    (eq. 16: eta = 1 is the DDPM posterior standard deviation).
        variance = ((1 - alpha_bar_prev) / beta_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
        std = eta * variance**0.5

        # 3. x_prev = sqrt(alpha_bar_prev) * x_0 + sqrt(1 - alpha_bar_prev - sigma_t^2) * eps + sigma_t * noise
        direction = (1 - alpha_bar_prev - std**2) ** 0.5 * pred_eps
        prev_sample = alpha_bar_prev**0.5 * pred_x0 + direction
        if eta > 0:
            noise = randn(model_output.shape, generator, model_output.device, model_output.dtype)
            prev_sample = prev_sample + std * noise
        return prev_sample
