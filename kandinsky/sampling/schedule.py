"""The noise schedule: one object for sampling and training alike (guided-diffusion's GaussianDiffusion).

    schedule = NoiseSchedule.from_folder("kandinsky-2-2-decoder/scheduler")   # scheduler_config.json
    schedule.alphas_cumprod                                                  # (T,) float32, alpha_bar_t
    x_t = schedule.add_noise(x0, noise, t)                                   # q(x_t | x_0)
    leading_timesteps(T, n, steps_offset)                                    # the reference's spacings

Notation (DDPM paper, https://arxiv.org/abs/2006.11239):

    beta_t          noise added by the forward step t-1 -> t
    alpha_t         1 - beta_t
    alpha_bar_t     prod_{s <= t} alpha_s      (``alphas_cumprod``)
    x_t             sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps     (forward process)
    sigma_t         sqrt((1 - alpha_bar_t) / alpha_bar_t), the noise-to-signal ratio (sigma samplers)

The tables are float32 CPU tensors built exactly as the reference library builds them, so every
coefficient is bit-identical to it. Samplers index them with Python ints: each coefficient is a
0-dim float32 CPU tensor that multiplies the (possibly CUDA, possibly half precision) sample.

This module is the one home of: the ``scheduler_config.json`` configs (the reference's
UnCLIPScheduler / DDPMScheduler / DDIMScheduler keys, anything else refused by name), the beta
tables, every timestep spacing the samplers use, ``add_noise``, the x_0 / eps conversions and the
posterior formulas, and ``randn`` (seeded noise with the reference's semantics).
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Sequence

import numpy as np
import torch

from kandinsky.config import ComponentConfig, ConfigError, any_sign

CONFIG_NAME = "scheduler_config.json"

# ---------------------------------------------------------------------------------------------
# Configs: the keys of the reference's scheduler_config.json, per _class_name
# ---------------------------------------------------------------------------------------------


def require(source: str, key: str, value, allowed: tuple) -> None:
    """Raise ConfigError naming ``key`` unless ``value`` is one of ``allowed`` (the field types
    themselves are checked by ComponentConfig.validate, from the declarations)."""
    if value not in allowed:
        shown = " or ".join(repr(a) for a in allowed)
        raise ConfigError(f"{source}: {key}={value!r} is not supported (supported: {shown}).")


# Keys the reference's DDPM / DDIM write that must keep the one value implemented here.
_FIXED = {"thresholding": False, "trained_betas": None, "rescale_betas_zero_snr": False}
# Keys only read when thresholding=True: no effect here.
_IGNORED = frozenset({"dynamic_thresholding_ratio", "sample_max_value"})
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _check_linear_family(cfg, source: str) -> None:
    """The values implemented, shared by the DDPM and DDIM configs."""
    require(source, "beta_schedule", cfg.beta_schedule, BETA_SCHEDULES)
    require(source, "prediction_type", cfg.prediction_type, ("epsilon",))
    require(source, "timestep_spacing", cfg.timestep_spacing, ("leading",))


@dataclasses.dataclass
class UnCLIPSchedulerConfig(ComponentConfig):
    """The prior's config (defaults: the reference's)."""

    CLASS_NAME = "UnCLIPScheduler"
    EXTRA_OUT = {"_class_name": "UnCLIPScheduler"}

    num_train_timesteps: int = 1000
    variance_type: str = "fixed_small_log"  # only value implemented
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    prediction_type: str = "epsilon"  # "sample" (Kandinsky 2.2's prior) or "epsilon"
    beta_schedule: str = "squaredcos_cap_v2"  # only value implemented

    def check_sizes(self, source: str = CONFIG_NAME) -> None:
        if self.num_train_timesteps < 2:
            raise ConfigError(f"{source}: num_train_timesteps={self.num_train_timesteps!r} must be >= 2.")
        require(source, "variance_type", self.variance_type, ("fixed_small_log",))
        require(source, "prediction_type", self.prediction_type, ("sample", "epsilon"))
        require(source, "beta_schedule", self.beta_schedule, ("squaredcos_cap_v2",))


@dataclasses.dataclass
class DDPMSchedulerConfig(ComponentConfig):
    """The decoder's config (defaults: the reference's)."""

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
    steps_offset: int = any_sign(0)
    # A DDIM key the hub's DDPM configs carry: used by DDIM on this schedule (None: absent, DDIM's True).
    set_alpha_to_one: bool | None = None

    def check_sizes(self, source: str = CONFIG_NAME) -> None:
        _check_linear_family(self, source)
        require(source, "variance_type", self.variance_type, ("fixed_small",))

    def to_dict(self) -> dict:
        out = super().to_dict()
        if out["set_alpha_to_one"] is None:
            del out["set_alpha_to_one"]
        return out


@dataclasses.dataclass
class DDIMSchedulerConfig(ComponentConfig):
    """A DDIM config (defaults: the reference's); the decoder's DDPM config converts to it."""

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
    steps_offset: int = any_sign(0)
    prediction_type: str = "epsilon"  # only value implemented
    timestep_spacing: str = "leading"  # only value implemented

    def check_sizes(self, source: str = CONFIG_NAME) -> None:
        _check_linear_family(self, source)


# The config class of each schedule kind (the sampler the config was written for).
CONFIGS: dict[str, type[ComponentConfig]] = {
    "unclip": UnCLIPSchedulerConfig,
    "ddpm": DDPMSchedulerConfig,
    "ddim": DDIMSchedulerConfig,
}
_KIND_OF_CLASS_NAME = {cls.CLASS_NAME: kind for kind, cls in CONFIGS.items()}


def _convert(config, kind: str):
    """A DDPM config as DDIM or back (the reference's ``DDIMScheduler.from_config(ddpm_config)``)."""
    target = CONFIGS[kind]
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(target) if hasattr(config, f.name)}
    if shared.get("set_alpha_to_one", False) is None:  # absent from the DDPM config: DDIM's default
        del shared["set_alpha_to_one"]
    return target(**shared)


# ---------------------------------------------------------------------------------------------
# Beta tables (float32, on the CPU)
# ---------------------------------------------------------------------------------------------


def linear_betas(beta_start: float, beta_end: float, num_train_timesteps: int) -> torch.Tensor:
    """``linear``: betas evenly spaced from beta_start to beta_end (DDPM)."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32, device="cpu")


def scaled_linear_betas(beta_start: float, beta_end: float, num_train_timesteps: int) -> torch.Tensor:
    """``scaled_linear``: sqrt(beta) evenly spaced, then squared (latent diffusion)."""
    sqrt_betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32, device="cpu")
    return sqrt_betas**2


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """``squaredcos_cap_v2``: the cosine schedule of Improved DDPM (Nichol & Dhariwal 2021).

    alpha_bar(s) = cos^2(((s + 0.008) / 1.008) * pi / 2) for s in [0, 1], and
    beta_t = 1 - alpha_bar((t + 1) / T) / alpha_bar(t / T), capped at max_beta.
    Computed in float64 Python floats, stored as float32.
    """

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    betas = [min(1 - alpha_bar((t + 1) / T) / alpha_bar(t / T), max_beta) for t in range(T)]
    return torch.tensor(betas, dtype=torch.float32, device="cpu")


def make_betas(config) -> torch.Tensor:
    """(T,) float32 betas of a scheduler config."""
    T = config.num_train_timesteps
    if config.beta_schedule == "squaredcos_cap_v2":
        return cosine_betas(T)
    if config.beta_schedule == "linear":
        return linear_betas(config.beta_start, config.beta_end, T)
    if config.beta_schedule == "scaled_linear":
        return scaled_linear_betas(config.beta_start, config.beta_end, T)
    raise ConfigError(f"beta_schedule={config.beta_schedule!r} is not implemented (one of {BETA_SCHEDULES}).")


def alpha_tables(betas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alphas = 1 - betas and alphas_cumprod = prod_{s <= t} alpha_s, in the betas' dtype. (T,), (T,)"""
    alphas = 1.0 - betas
    return alphas, torch.cumprod(alphas, dim=0)


# ---------------------------------------------------------------------------------------------
# The schedule
# ---------------------------------------------------------------------------------------------


class NoiseSchedule:
    """The noise tables of one ``scheduler_config.json`` (any of the three kinds), and q(x_t | x_0).

    ``kind`` is the sampler the config was written for ("unclip", "ddpm" or "ddim"); every sampler
    reads the same tables. ``prediction_type`` and the clipping keys are the config's.
    """

    def __init__(self, config: ComponentConfig):
        self.config = config
        self.kind = next(kind for kind, cls in CONFIGS.items() if isinstance(config, cls))
        self.betas = make_betas(config)  # (T,) float32
        self.alphas, self.alphas_cumprod = alpha_tables(self.betas)  # (T,), (T,) alpha_bar_t
        self.one = torch.tensor(1.0, device="cpu")  # alpha_bar "before" t = 0
        # DDIM's level after the last step: 1 (clean), or alpha_bar_0 when set_alpha_to_one=False.
        final_is_one = getattr(config, "set_alpha_to_one", None) is not False
        self.final_alpha_cumprod = self.one if final_is_one else self.alphas_cumprod[0]

    # -- loading / saving -------------------------------------------------------------

    @classmethod
    def from_config(cls, config_dict: dict, kind: str | None = None, source: str = CONFIG_NAME) -> "NoiseSchedule":
        """Build from a ``scheduler_config.json`` dict.

        The config is checked as what its ``_class_name`` says (``kind`` when it has none).
        ``kind`` ("unclip", "ddpm", "ddim") also converts: a DDPM config read as "ddim" is the
        reference's ``DDIMScheduler.from_config(ddpm_config)`` (and back); the tables are the same.
        """
        if kind is not None and kind not in CONFIGS:
            raise ValueError(f"kind={kind!r}: expected one of {sorted(CONFIGS)}")
        class_name = config_dict.get("_class_name")
        if class_name is None:
            if kind is None:
                raise ConfigError(f"{source}: no '_class_name'; pass kind= one of {sorted(CONFIGS)}")
            written_as = kind
        elif class_name in _KIND_OF_CLASS_NAME:
            written_as = _KIND_OF_CLASS_NAME[class_name]
        else:
            raise ConfigError(
                f"{source}: _class_name={class_name!r} is not supported (supported: {sorted(_KIND_OF_CLASS_NAME)})."
            )
        kind = kind or written_as
        config = CONFIGS[written_as].from_dict(config_dict, source=source)
        if kind != written_as:
            if "unclip" in (kind, written_as):
                raise ConfigError(f"{source}: a {CONFIGS[written_as].CLASS_NAME} config cannot build a "
                                  f"{kind!r} schedule.")
            config = _convert(config, kind)
        return cls(config)

    @classmethod
    def from_folder(cls, path: str | pathlib.Path, kind: str | None = None) -> "NoiseSchedule":
        """Read ``<path>/scheduler_config.json`` (the checkpoint's ``scheduler`` folder)."""
        path = pathlib.Path(path)
        file = path / CONFIG_NAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {path}")
        return cls.from_config(json.loads(file.read_text()), kind=kind, source=str(file))

    def save_folder(self, path: str | pathlib.Path) -> None:
        """Write ``<path>/scheduler_config.json``, loadable by the reference library too."""
        path = pathlib.Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n")

    # -- the tables -------------------------------------------------------------------

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    @property
    def prediction_type(self) -> str:
        """What the model predicts: "epsilon" or "sample" (x_0)."""
        return self.config.prediction_type

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def alpha_bar(self, t: int, final: torch.Tensor | None = None) -> torch.Tensor:
        """alpha_bar_t, a 0-dim float32 tensor; t < 0 is the level "before" t = 0: ``final`` (default 1)."""
        if t >= 0:
            return self.alphas_cumprod[t]
        return self.one if final is None else final

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR_t = alpha_bar_t / (1 - alpha_bar_t) at timesteps ``t`` (B,), as the reference's
        ``compute_snr`` computes it (Min-SNR loss weights). (B,) float32 on t's device"""
        alphas_cumprod = self.alphas_cumprod.to(t.device)
        alpha, sigma = (alphas_cumprod**0.5)[t].float(), ((1.0 - alphas_cumprod) ** 0.5)[t].float()
        return (alpha / sigma) ** 2

    def sigma_table(self) -> np.ndarray:
        """(T,) float32: the noise-to-signal ratio sigma_t of every training timestep."""
        return sigma_from_alpha_bar(self.alphas_cumprod).numpy()

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise.

        ``timesteps``: one timestep (0-dim or (1,)), or one per batch element (B,). The
        coefficients are computed in ``original``'s dtype, like the reference.
        """
        alphas_cumprod = self.alphas_cumprod.to(device=original.device, dtype=original.dtype)
        alpha_bar = alphas_cumprod[timesteps.to(original.device)].flatten()  # (B,) or (1,)
        broadcast = (-1,) + (1,) * (original.ndim - 1)  # (B, 1, 1, 1) for images
        sqrt_alpha_bar = (alpha_bar**0.5).reshape(broadcast)
        sqrt_one_minus_alpha_bar = ((1 - alpha_bar) ** 0.5).reshape(broadcast)
        return sqrt_alpha_bar * original + sqrt_one_minus_alpha_bar * noise

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.config})"


# ---------------------------------------------------------------------------------------------
# Timestep spacings (the reference's, per sampler family)
# ---------------------------------------------------------------------------------------------

SPACINGS = ("linspace", "leading", "trailing")
DEFAULT_SPACING = "linspace"  # the reference's default for the DPM-Solver++ / UniPC / Euler / Heun family
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5


def _leading(T: int, n: int, steps_offset: int) -> list[int]:
    """0, r, 2r, ... (r = T // n), shifted by steps_offset, descending."""
    step_ratio = T // n
    return [i * step_ratio + steps_offset for i in reversed(range(n))]


def _trailing(T: int, n: int) -> np.ndarray:
    """T - 1, T - 1 - T/n, ... rounded, descending (float64)."""
    return np.arange(T, 0, -T / n).round() - 1


def leading_timesteps(num_train_timesteps: int, num_inference_steps: int, steps_offset: int) -> list[int]:
    """DDPM / DDIM: "leading" spacing, checked (every timestep must be in the table)."""
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} must be between 1 and num_train_timesteps="
            f"{num_train_timesteps}."
        )
    timesteps = _leading(num_train_timesteps, num_inference_steps, steps_offset)
    if timesteps[0] >= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} with steps_offset={steps_offset} gives timestep "
            f"{timesteps[0]}, past the last training timestep {num_train_timesteps - 1}."
        )
    return timesteps


def unclip_timesteps(num_train_timesteps: int, num_inference_steps: int) -> list[int]:
    """UnCLIP: n timesteps from T-1 down to 0, evenly spread, rounded half to even (needs n >= 2:
    the reference divides by n - 1)."""
    T = num_train_timesteps
    if not 2 <= num_inference_steps <= T:
        raise ValueError(f"UnCLIPScheduler needs 2 <= num_inference_steps <= {T}, got {num_inference_steps}.")
    step_ratio = (T - 1) / (num_inference_steps - 1)
    return [round(i * step_ratio) for i in reversed(range(num_inference_steps))]


def multistep_timesteps(spacing: str, T: int, n: int, steps_offset: int) -> np.ndarray:
    """DPM-Solver++ / UniPC: n int64 timesteps, descending; "linspace" and "leading" space
    n + 1 levels over [0, T) and drop the lowest."""
    if spacing == "linspace":
        t = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
    elif spacing == "leading":
        t = np.array(_leading(T, n + 1, steps_offset)[:-1])
    else:  # trailing
        t = _trailing(T, n)
    return t.astype(np.int64)


def sigma_space_timesteps(spacing: str, T: int, n: int, steps_offset: int) -> np.ndarray:
    """Euler / Euler a / Heun: n float32 timesteps, descending ("linspace" is not rounded)."""
    if spacing == "linspace":
        t = np.linspace(0, T - 1, n)[::-1]
    elif spacing == "leading":
        t = np.array(_leading(T, n, steps_offset))
    else:  # trailing
        t = _trailing(T, n)
    return t.astype(np.float32)


def sigmas_at(timesteps: np.ndarray, table: np.ndarray) -> np.ndarray:
    """sigma at (possibly fractional) timesteps: linear interpolation in sigma between training steps."""
    return np.interp(timesteps, np.arange(len(table)), table)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = KARRAS_RHO) -> np.ndarray:
    """n levels evenly spaced in sigma^(1/rho) from sigma_max down to sigma_min (Karras et al. 2022)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def timestep_of_sigma(sigma: np.ndarray, table: np.ndarray) -> np.ndarray:
    """The fractional timestep of each sigma: linear interpolation in log sigma between training steps."""
    log_table = np.log(table)  # increasing in t
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    low = np.clip(np.searchsorted(log_table, log_sigma, side="right") - 1, 0, len(table) - 2)
    w = np.clip((log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


# ---------------------------------------------------------------------------------------------
# Formulas (operation order: the reference's, so results stay bit-identical)
# ---------------------------------------------------------------------------------------------


def x0_from_eps(x_t, eps, alpha_bar):
    """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)   (DDPM eq. 15)."""
    return (x_t - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5


def eps_from_x0(x_t, x0, alpha_bar):
    """eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t)."""
    return (x_t - alpha_bar**0.5 * x0) / (1 - alpha_bar) ** 0.5


def sigma_from_alpha_bar(alpha_bar):
    """The noise-to-signal ratio of a level: sigma = sqrt((1 - alpha_bar) / alpha_bar)."""
    return ((1 - alpha_bar) / alpha_bar) ** 0.5


def posterior_coefficients(alpha_bar_t, alpha_bar_prev, beta, alpha):
    """The two coefficients of the mean of q(x_prev | x_t, x_0) (DDPM eq. 7):
    sqrt(alpha_bar_prev) beta / (1 - alpha_bar_t) (of x_0), sqrt(alpha) (1 - alpha_bar_prev) / (1 - alpha_bar_t) (of x_t)."""
    beta_bar_t, beta_bar_prev = 1 - alpha_bar_t, 1 - alpha_bar_prev
    coef_x0 = (alpha_bar_prev**0.5 * beta) / beta_bar_t
    coef_xt = alpha**0.5 * beta_bar_prev / beta_bar_t
    return coef_x0, coef_xt


def posterior_mean(x0, x_t, alpha_bar_t, alpha_bar_prev, beta, alpha):
    """Mean of q(x_prev | x_t, x_0) (DDPM eq. 7)."""
    coef_x0, coef_xt = posterior_coefficients(alpha_bar_t, alpha_bar_prev, beta, alpha)
    return coef_x0 * x0 + coef_xt * x_t


def posterior_variance(alpha_bar_t, alpha_bar_prev, beta):
    """Variance of q(x_prev | x_t, x_0): (1 - alpha_bar_prev) / (1 - alpha_bar_t) beta ("fixed_small")."""
    return (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta


def posterior_tables(betas: torch.Tensor) -> dict[str, torch.Tensor]:
    """The q(x_{t-1} | x_t, x_0) coefficients of every timestep in float64, as guided-diffusion's
    GaussianDiffusion tabulates them (the training losses' variational bound). Each (T,)."""
    betas = betas.double()
    alphas, ac = alpha_tables(betas)
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])  # alpha_bar_{t-1}, 1 before t = 0
    coef_x0, coef_xt = posterior_coefficients(ac, ac_prev, betas, alphas)
    var = posterior_variance(ac, ac_prev, betas)  # 0 at t = 0
    return {
        "sqrt_recip_ac": torch.sqrt(1.0 / ac),
        "sqrt_recipm1_ac": torch.sqrt(1.0 / ac - 1),
        "log_var_clipped": torch.log(torch.cat([var[1:2], var[1:]])),  # t = 0 uses t = 1's
        "log_betas": torch.log(betas),
        "coef1": coef_x0,  # multiplies x_0
        "coef2": coef_xt,  # multiplies x_t
    }


# ---------------------------------------------------------------------------------------------
# Seeded noise
# ---------------------------------------------------------------------------------------------


def randn(
    shape: Sequence[int],
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal noise of ``shape``, drawn so that a seed means the same thing everywhere.

    Same semantics as the reference library's ``randn_tensor``:
      * a CPU generator always draws on the CPU (then the tensor moves to ``device``), so a
        seed gives the same noise whatever the device;
      * a CUDA generator draws on ``device`` (asking for another device is an error);
      * a list of generators draws one batch element per generator (``shape[0]`` of them),
        each of shape ``(1, *shape[1:])``; a list of one is the same as that generator.
      * ``generator=None`` draws from torch's global generator, on ``device``.
    """
    shape = tuple(shape)
    if isinstance(device, str):
        device = torch.device(device)
    draw_device = device
    device = device or torch.device("cpu")

    if generator is not None:
        generator_type = (generator[0] if isinstance(generator, list) else generator).device.type
        if generator_type != device.type and generator_type == "cpu":
            draw_device = "cpu"
        elif generator_type != device.type and generator_type == "cuda":
            raise ValueError(f"Cannot generate a {device} tensor from a generator of type {generator_type}.")

    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]

    if isinstance(generator, list):
        one = (1,) + shape[1:]
        draws = [torch.randn(one, generator=generator[i], device=draw_device, dtype=dtype) for i in range(shape[0])]
        return torch.cat(draws, dim=0).to(device)
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)
