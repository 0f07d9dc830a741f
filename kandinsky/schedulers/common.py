"""What the three samplers share: beta schedules, the random-draw helper, a base class.

Notation used in every scheduler (DDPM paper, https://arxiv.org/abs/2006.11239):

    beta_t          noise added by the forward step t-1 -> t
    alpha_t         1 - beta_t
    alpha_bar_t     prod_{s <= t} alpha_s      (``alphas_cumprod``)
    x_t             sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * eps     (forward process)

The tables (betas, alphas, alphas_cumprod) are float32 CPU tensors, built exactly as the
reference library builds them, so that every coefficient is bit-identical to it. Inside
``step`` they are indexed with Python ints: each coefficient is a 0-dim float32 CPU tensor
that multiplies the (possibly CUDA, possibly half precision) sample, as in the reference.
"""
from __future__ import annotations

import json
import math
import pathlib
from typing import ClassVar, Sequence

import torch

from kandinsky.config import ComponentConfig, ConfigError

CONFIG_NAME = "scheduler_config.json"

# --------------------------------------------------------------------------------------
# Beta schedules (all float32, on CPU)
# --------------------------------------------------------------------------------------


def linear_betas(beta_start: float, beta_end: float, num_train_timesteps: int) -> torch.Tensor:
    """``linear``: betas evenly spaced from beta_start to beta_end (DDPM)."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32, device="cpu")


def scaled_linear_betas(beta_start: float, beta_end: float, num_train_timesteps: int) -> torch.Tensor:
    """``scaled_linear``: sqrt(beta) evenly spaced, then squared (latent diffusion)."""
    sqrt_betas = torch.linspace(
        beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32, device="cpu"
    )
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


def make_betas(beta_schedule: str, beta_start: float, beta_end: float, num_train_timesteps: int) -> torch.Tensor:
    if beta_schedule == "linear":
        return linear_betas(beta_start, beta_end, num_train_timesteps)
    if beta_schedule == "scaled_linear":
        return scaled_linear_betas(beta_start, beta_end, num_train_timesteps)
    if beta_schedule == "squaredcos_cap_v2":
        return cosine_betas(num_train_timesteps)
    raise ConfigError(f"beta_schedule={beta_schedule!r} is not implemented")


# --------------------------------------------------------------------------------------
# Random draws
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------


def require(source: str, key: str, value, allowed: tuple) -> None:
    """Raise ConfigError naming ``key`` unless ``value`` is one of ``allowed``."""
    if not any(value == a and type(value) is type(a) for a in allowed):
        shown = " or ".join(repr(a) for a in allowed)
        raise ConfigError(f"{source}: {key}={value!r} is not supported (supported: {shown}).")


def require_type(source: str, key: str, value, types: tuple) -> None:
    if isinstance(value, bool) and bool not in types:  # True is an int in Python
        raise ConfigError(f"{source}: {key}={value!r} must be a number, not a bool.")
    if not isinstance(value, types):
        names = " or ".join(t.__name__ for t in types)
        raise ConfigError(f"{source}: {key}={value!r} must be of type {names}.")


class Scheduler:
    """A discrete-time sampler over ``num_train_timesteps`` noise levels.

    Subclasses define ``CONFIG`` (their config dataclass), ``KIND`` (the name
    ``scheduler_from_config`` knows them by), ``set_timesteps`` and ``step``.
    """

    CONFIG: ClassVar[type[ComponentConfig]]
    KIND: ClassVar[str]
    # Model evaluations per entry of ``timesteps`` (img2img slices ``timesteps[t_start * order:]``).
    order: ClassVar[int] = 1
    # Standard deviation of the initial noise x_T ~ N(0, init_noise_sigma^2).
    init_noise_sigma: ClassVar[float] = 1.0

    def __init__(self, config: ComponentConfig):
        self.config = config
        self.num_inference_steps: int | None = None
        T = config.num_train_timesteps
        # Before set_timesteps: every training timestep, descending (as the reference).
        self.timesteps = torch.arange(T - 1, -1, -1, dtype=torch.long, device="cpu")
        self.one = torch.tensor(1.0, device="cpu")  # alpha_bar "before" t = 0

    def _set_noise_tables(self, betas: torch.Tensor) -> None:
        self.betas = betas  # (T,) float32
        self.alphas = 1.0 - betas  # (T,)
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # (T,) alpha_bar_t

    # -- loading / saving -------------------------------------------------------------

    @classmethod
    def from_config(cls, config_dict: dict, source: str = CONFIG_NAME) -> "Scheduler":
        """Build this scheduler from a ``scheduler_config.json`` dict (see scheduler_from_config)."""
        from kandinsky.schedulers import scheduler_from_config

        return scheduler_from_config(config_dict, kind=getattr(cls, "KIND", None), source=source)

    @classmethod
    def from_folder(cls, path: str | pathlib.Path, kind: str | None = None) -> "Scheduler":
        """Read ``<path>/scheduler_config.json`` (the checkpoint's ``scheduler`` folder).

        ``Scheduler.from_folder(p)`` builds the class the config names;
        ``DDIMScheduler.from_folder(p)`` (or ``kind="ddim"``) builds DDIM from a DDPM config.
        """
        from kandinsky.schedulers import scheduler_from_config

        path = pathlib.Path(path)
        file = path / CONFIG_NAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {path}")
        config_dict = json.loads(file.read_text())
        return scheduler_from_config(config_dict, kind=kind or getattr(cls, "KIND", None), source=str(file))

    def save_folder(self, path: str | pathlib.Path) -> None:
        """Write ``<path>/scheduler_config.json``, loadable by the reference library too."""
        path = pathlib.Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n")

    # -- shared maths -----------------------------------------------------------------

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """These samplers feed x_t to the model unscaled."""
        return sample

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process q(x_t | x_0): x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * noise.

        ``timesteps`` holds one timestep, or one per batch element. The coefficients are
        computed in ``original``'s dtype, like the reference.
        """
        alphas_cumprod = self.alphas_cumprod.to(device=original.device, dtype=original.dtype)
        timesteps = timesteps.to(original.device)
        alpha_bar = alphas_cumprod[timesteps].flatten()  # (B,) or (1,)
        broadcast = (-1,) + (1,) * (original.ndim - 1)  # (B, 1, 1, 1) for images
        sqrt_alpha_bar = (alpha_bar**0.5).reshape(broadcast)
        sqrt_one_minus_alpha_bar = ((1 - alpha_bar) ** 0.5).reshape(broadcast)
        return sqrt_alpha_bar * original + sqrt_one_minus_alpha_bar * noise

    def _alpha_bar(self, t: int, final: torch.Tensor) -> torch.Tensor:
        """alpha_bar_t as a 0-dim float32 tensor; ``final`` stands for the level "before" t = 0."""
        return self.alphas_cumprod[t] if t >= 0 else final

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"
