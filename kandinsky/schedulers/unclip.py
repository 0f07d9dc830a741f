"""The prior's sampler: DDPM ancestral sampling as in Karlo's unCLIP (the reference's UnCLIPScheduler).

Differences from plain DDPM: cosine betas, timesteps spread over [0, T-1] with both ends
included, and the step's beta re-derived for the jump t -> prev_timestep when steps are
skipped. The Kandinsky 2.2 prior predicts x_0 directly (``prediction_type="sample"``) and
clips it to [-clip_sample_range, clip_sample_range].
"""
from __future__ import annotations

import dataclasses

import torch

from kandinsky.config import ComponentConfig, ConfigError
from kandinsky.sampling.formulas import posterior_mean, posterior_variance, x0_from_eps
from kandinsky.schedulers.common import Scheduler, cosine_betas, randn, require, require_type


@dataclasses.dataclass
class UnCLIPSchedulerConfig(ComponentConfig):
    """Fields mirror the reference's ``scheduler_config.json`` keys (defaults: the reference's)."""

    CLASS_NAME = "UnCLIPScheduler"
    EXTRA_OUT = {"_class_name": "UnCLIPScheduler"}

    num_train_timesteps: int = 1000
    variance_type: str = "fixed_small_log"  # only value implemented
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    prediction_type: str = "epsilon"  # "sample" (Kandinsky 2.2's prior) or "epsilon"
    beta_schedule: str = "squaredcos_cap_v2"  # only value implemented

    def validate(self, source: str = "scheduler_config.json") -> None:
        require_type(source, "num_train_timesteps", self.num_train_timesteps, (int,))
        if self.num_train_timesteps < 2:
            raise ConfigError(f"{source}: num_train_timesteps={self.num_train_timesteps!r} must be >= 2.")
        require(source, "variance_type", self.variance_type, ("fixed_small_log",))
        require(source, "clip_sample", self.clip_sample, (True, False))
        require_type(source, "clip_sample_range", self.clip_sample_range, (int, float))
        require(source, "prediction_type", self.prediction_type, ("sample", "epsilon"))
        require(source, "beta_schedule", self.beta_schedule, ("squaredcos_cap_v2",))


def unclip_timesteps(num_train_timesteps: int, num_inference_steps: int) -> list[int]:
    """n timesteps from T-1 down to 0, evenly spread, rounded half to even (needs n >= 2)."""
    T = num_train_timesteps
    if not 2 <= num_inference_steps <= T:
        raise ValueError(f"UnCLIPScheduler needs 2 <= num_inference_steps <= {T}, got {num_inference_steps}.")
    step_ratio = (T - 1) / (num_inference_steps - 1)
    return [round(i * step_ratio) for i in reversed(range(num_inference_steps))]


class UnCLIPScheduler(Scheduler):
    CONFIG = UnCLIPSchedulerConfig
    KIND = "unclip"

    def __init__(self, config: UnCLIPSchedulerConfig):
        super().__init__(config)
        self._set_noise_tables(cosine_betas(config.num_train_timesteps))

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """``num_inference_steps`` timesteps from T-1 down to 0, evenly spread, rounded half to even.

        (The reference divides by num_inference_steps - 1, so at least 2 steps are needed.)
        """
        timesteps = unclip_timesteps(self.config.num_train_timesteps, num_inference_steps)
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.tensor(timesteps, dtype=torch.long, device="cpu").to(device)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prev_timestep: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One ancestral step x_t -> x_prev, prev = ``prev_timestep`` (None: t - 1).

        The Kandinsky prior pipeline passes ``prev_timestep=timesteps[i + 1]``, and None on
        the last step (t = 0). Draws noise (shape and dtype of ``model_output``) only if t > 0.
        """
        t = int(timestep)
        prev_t = t - 1 if prev_timestep is None else int(prev_timestep)

        # 1. Noise levels of the jump t -> prev_t. When steps are skipped, the jump's beta is
        #    re-derived from alpha_bar: 1 - beta = alpha_bar_t / alpha_bar_prev.
        alpha_bar_t = self._alpha_bar(t, self.one)
        alpha_bar_prev = self._alpha_bar(prev_t, self.one)
        if prev_t == t - 1:
            beta = self.betas[t]
            alpha = self.alphas[t]
        else:
            beta = 1 - alpha_bar_t / alpha_bar_prev
            alpha = 1 - beta

        # 2. Estimate of x_0 (DDPM eq. 15 when the model predicts the noise), then clip it.
        if self.config.prediction_type == "epsilon":
            pred_x0 = x0_from_eps(sample, model_output, alpha_bar_t)
        else:  # "sample"
            pred_x0 = model_output
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            pred_x0 = torch.clamp(pred_x0, -r, r)

        # 3. Mean of the posterior q(x_prev | x_t, x_0) (DDPM eq. 7).
        prev_sample = posterior_mean(pred_x0, sample, alpha_bar_t, alpha_bar_prev, beta, alpha)

        # 4. Add noise with the posterior variance ("fixed_small"), std = exp(log(max(var, 1e-20)) / 2).
        if t > 0:
            noise = randn(model_output.shape, generator, model_output.device, model_output.dtype)
            variance = posterior_variance(alpha_bar_t, alpha_bar_prev, beta)
            std = torch.exp(0.5 * torch.log(torch.clamp(variance, min=1e-20)))
            prev_sample = prev_sample + std * noise
        return prev_sample
