"""The decoder's default sampler: DDPM ancestral sampling (Ho et al. 2020) over a subset of timesteps.

Kandinsky 2.2's decoder config: linear betas 0.00085 -> 0.012 over 1000 steps, "leading"
timesteps shifted by ``steps_offset=1``, an epsilon-predicting UNet, the "fixed_small"
posterior variance and no clipping of the x_0 estimate.
"""
from __future__ import annotations

import dataclasses

import torch

from kandinsky.config import ComponentConfig, ConfigError
from kandinsky.sampling.formulas import posterior_mean, posterior_variance, x0_from_eps
from kandinsky.schedulers.common import Scheduler, make_betas, randn, require, require_type


def _validate_betas_and_spacing(cfg, source: str) -> None:
    """Checks shared by the DDPM and DDIM configs."""
    require_type(source, "num_train_timesteps", cfg.num_train_timesteps, (int,))
    if cfg.num_train_timesteps < 1:
        raise ConfigError(f"{source}: num_train_timesteps={cfg.num_train_timesteps!r} must be >= 1.")
    require(source, "beta_schedule", cfg.beta_schedule, ("linear", "scaled_linear", "squaredcos_cap_v2"))
    require_type(source, "beta_start", cfg.beta_start, (int, float))
    require_type(source, "beta_end", cfg.beta_end, (int, float))
    require(source, "clip_sample", cfg.clip_sample, (True, False))
    require_type(source, "clip_sample_range", cfg.clip_sample_range, (int, float))
    require(source, "prediction_type", cfg.prediction_type, ("epsilon",))
    require(source, "timestep_spacing", cfg.timestep_spacing, ("leading",))
    require_type(source, "steps_offset", cfg.steps_offset, (int,))


# Keys the reference writes that must keep the one value implemented here.
_FIXED = {"thresholding": False, "trained_betas": None, "rescale_betas_zero_snr": False}
# Keys only read when thresholding=True: no effect here.
_IGNORED = frozenset({"dynamic_thresholding_ratio", "sample_max_value"})


def leading_timesteps(num_train_timesteps: int, num_inference_steps: int, steps_offset: int) -> list[int]:
    """"leading" spacing: 0, r, 2r, ... (r = T // n), shifted by steps_offset, descending."""
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} must be between 1 and num_train_timesteps="
            f"{num_train_timesteps}."
        )
    step_ratio = num_train_timesteps // num_inference_steps
    timesteps = [i * step_ratio + steps_offset for i in reversed(range(num_inference_steps))]
    if timesteps[0] >= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} with steps_offset={steps_offset} gives timestep "
            f"{timesteps[0]}, past the last training timestep {num_train_timesteps - 1}."
        )
    return timesteps


@dataclasses.dataclass
class DDPMSchedulerConfig(ComponentConfig):
    """Fields mirror the reference's ``scheduler_config.json`` keys (defaults: the reference's)."""

    CLASS_NAME = "DDPMScheduler"
    EXTRA_OUT = {"_class_name": "DDPMScheduler"}
    FIXED = _FIXED
    IGNORED = _IGNORED

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    variance_type: str = "fixed_small"  # only value implemented
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    prediction_type: str = "epsilon"  # only value implemented
    timestep_spacing: str = "leading"  # only value implemented
    steps_offset: int = 0
    # A DDIM key the hub's DDPM configs carry: no effect on DDPM, used by a DDIM built from
    # this config (None: absent, DDIM then uses its default True).
    set_alpha_to_one: bool | None = None

    def validate(self, source: str = "scheduler_config.json") -> None:
        _validate_betas_and_spacing(self, source)
        require(source, "variance_type", self.variance_type, ("fixed_small",))
        require(source, "set_alpha_to_one", self.set_alpha_to_one, (None, True, False))

    def to_dict(self) -> dict:
        out = super().to_dict()
        if out["set_alpha_to_one"] is None:
            del out["set_alpha_to_one"]
        return out


class DDPMScheduler(Scheduler):
    CONFIG = DDPMSchedulerConfig
    KIND = "ddpm"

    def __init__(self, config: DDPMSchedulerConfig):
        super().__init__(config)
        c = config
        self._set_noise_tables(make_betas(c.beta_schedule, c.beta_start, c.beta_end, c.num_train_timesteps))
        self._prev_timestep: dict[int, int] = {}

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        c = self.config
        timesteps = leading_timesteps(c.num_train_timesteps, num_inference_steps, c.steps_offset)
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.tensor(timesteps, dtype=torch.long, device="cpu").to(device)
        # Each step jumps to the next timestep of the schedule; the last one to -1 (x_0).
        self._prev_timestep = {}
        for t, prev_t in zip(timesteps, timesteps[1:] + [-1]):
            self._prev_timestep.setdefault(t, prev_t)

    def previous_timestep(self, timestep: int) -> int:
        """The timestep a step from ``timestep`` lands on (t - 1 before set_timesteps)."""
        if self.num_inference_steps is None:
            return timestep - 1
        if timestep not in self._prev_timestep:
            raise ValueError(f"timestep {timestep} is not in this scheduler's timesteps {self.timesteps.tolist()}")
        return self._prev_timestep[timestep]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prev_timestep: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One ancestral step x_t -> x_prev; prev = ``prev_timestep``, by default the next
        timestep of the schedule (-1 after the last). Draws noise (shape and dtype of
        ``model_output``) only if t > 0."""
        t = int(timestep)
        prev_t = self.previous_timestep(t) if prev_timestep is None else int(prev_timestep)

        # 1. Noise levels of the jump t -> prev_t; its alpha is alpha_bar_t / alpha_bar_prev.
        alpha_bar_t = self._alpha_bar(t, self.one)
        alpha_bar_prev = self._alpha_bar(prev_t, self.one)
        alpha = alpha_bar_t / alpha_bar_prev
        beta = 1 - alpha

        # 2. Estimate of x_0 from the predicted noise (DDPM eq. 15), clipped if the config says so.
        pred_x0 = x0_from_eps(sample, model_output, alpha_bar_t)
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            pred_x0 = pred_x0.clamp(-r, r)

        # 3. Mean of the posterior q(x_prev | x_t, x_0) (DDPM eq. 7).
        prev_sample = posterior_mean(pred_x0, sample, alpha_bar_t, alpha_bar_prev, beta, alpha)

        # 4. Add noise with the posterior variance ("fixed_small"), floored at 1e-20.
        if t > 0:
            noise = randn(model_output.shape, generator, model_output.device, model_output.dtype)
            variance = torch.clamp(posterior_variance(alpha_bar_t, alpha_bar_prev, beta), min=1e-20)
            prev_sample = prev_sample + variance**0.5 * noise
        return prev_sample
