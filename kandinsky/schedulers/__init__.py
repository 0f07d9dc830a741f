"""Samplers: UnCLIP (the prior's), DDPM (the decoder's) and DDIM (a faster decoder choice).

    scheduler = Scheduler.from_folder("kandinsky-2-2-decoder/scheduler")              # DDPM
    scheduler = Scheduler.from_folder("kandinsky-2-2-decoder/scheduler", kind="ddim")  # DDIM
    scheduler.set_timesteps(50, device="cuda")
    x = randn(shape, generator, device, dtype) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x, generator=generator)
"""
from __future__ import annotations

import dataclasses

from kandinsky.config import ConfigError
from kandinsky.schedulers.common import CONFIG_NAME, Scheduler, randn
from kandinsky.schedulers.ddim import DDIMScheduler, DDIMSchedulerConfig
from kandinsky.schedulers.ddpm import DDPMScheduler, DDPMSchedulerConfig
from kandinsky.schedulers.unclip import UnCLIPScheduler, UnCLIPSchedulerConfig

SCHEDULERS: dict[str, type[Scheduler]] = {
    "unclip": UnCLIPScheduler,
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
}
_BY_CLASS_NAME = {cls.CONFIG.CLASS_NAME: kind for kind, cls in SCHEDULERS.items()}


def scheduler_from_config(config_dict: dict, kind: str | None = None, source: str = CONFIG_NAME) -> Scheduler:
    """Build a scheduler from a ``scheduler_config.json`` dict.

    ``kind`` (None, "unclip", "ddpm" or "ddim") picks the sampler; None builds the one the
    config's ``_class_name`` names. DDPM and DDIM configs convert into each other, as the
    reference's ``DDIMScheduler.from_config(ddpm_config)``: the config is first checked as
    what it says it is, then the shared keys carry over.
    """
    if kind is not None and kind not in SCHEDULERS:
        raise ValueError(f"kind={kind!r}: expected one of {sorted(SCHEDULERS)}")
    class_name = config_dict.get("_class_name")
    if class_name is None:
        if kind is None:
            raise ConfigError(f"{source}: no '_class_name'; pass kind= one of {sorted(SCHEDULERS)}")
        written_as = kind
    elif class_name in _BY_CLASS_NAME:
        written_as = _BY_CLASS_NAME[class_name]
    else:
        raise ConfigError(
            f"{source}: _class_name={class_name!r} is not supported (supported: {sorted(_BY_CLASS_NAME)})."
        )
    kind = kind or written_as

    config = SCHEDULERS[written_as].CONFIG.from_dict(config_dict, source=source)
    if written_as == kind:
        return SCHEDULERS[kind](config)
    if (written_as, kind) == ("ddpm", "ddim"):
        return DDIMScheduler(DDIMSchedulerConfig.from_ddpm(config))
    if (written_as, kind) == ("ddim", "ddpm"):
        shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(DDIMSchedulerConfig)}
        return DDPMScheduler(DDPMSchedulerConfig(**shared))
    raise ConfigError(f"{source}: a {class_name} config cannot build a {kind!r} scheduler.")


__all__ = [
    "Scheduler",
    "UnCLIPScheduler",
    "UnCLIPSchedulerConfig",
    "DDPMScheduler",
    "DDPMSchedulerConfig",
    "DDIMScheduler",
    "DDIMSchedulerConfig",
    "SCHEDULERS",
    "scheduler_from_config",
    "randn",
]
