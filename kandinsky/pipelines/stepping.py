"""What the pipelines share around a run: the device check, chaining step callbacks, the progress bar."""
from __future__ import annotations

import contextlib
import math
import numbers

import numpy as np
import torch
from tqdm.auto import tqdm


def callbacks(*callbacks):
    """One step callback running ``callbacks`` in order, each seeing the x the previous returned."""
    callbacks = [finite_guard] + [c for c in callbacks if c is not None]

    def run(state):
        for callback in callbacks:
            out = _call_back(callback, state)
            if out is not None:
                state.x = out
        return state.x

    return run


_CALLBACK_SIGNATURE = (
    "callback_on_step_end(state) receives one kandinsky.sampling.StepState (stage, step, timestep, x, x0, "
    "model_output, uncond, cond, sigma) and returns None or a replacement x (diffusers' (pipe, step, "
    "timestep, kwargs) form and the old (step, timestep, latents) form are not used)"
)


def _call_back(callback, state):
    try:
        out = callback(state)
    except TypeError as e:
        if e.__traceback__.tb_next is None:  # raised by the call itself: the wrong arguments
            raise TypeError(f"{_CALLBACK_SIGNATURE}; calling it failed: {e}") from e
        raise
    if out is not None and not isinstance(out, torch.Tensor):
        raise TypeError(f"{_CALLBACK_SIGNATURE}; it returned a {type(out).__name__}.")
    if out is not None and out.shape != state.x.shape:
        raise ValueError(f"callback_on_step_end returned x of shape {tuple(out.shape)}, expected "
                         f"{tuple(state.x.shape)}.")
    return None if out is None else out.to(state.x.device, state.x.dtype)


@contextlib.contextmanager
def progress(plan, enabled: bool, desc: str):
    with tqdm(total=plan.num_steps - plan.begin, disable=not enabled, desc=desc) as bar:
        yield bar


class ticking:
    """The denoiser, ticking the progress bar once per sampler step."""

    def __init__(self, denoiser, bar):
        self.denoiser, self.bar, self.stage, self.last = denoiser, bar, denoiser.stage, None

    def __call__(self, x, t, step):
        if step != self.last:
            self.bar.update(1)
            self.last = step
        return self.denoiser(x, t, step)


def check_device(device) -> torch.device | None:
    """``device`` as a torch.device, refused (before any weights are read) if this machine lacks it."""
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device name (cpu, cuda, cuda:1, mps, ...).") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r}: this machine (or this torch build) has no CUDA device; "
                             "use device='cpu'.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={str(device)!r}: there are {torch.cuda.device_count()} CUDA device(s).")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device={str(device)!r}: MPS is not available here; use device='cpu'.")
    return device


def real_number(value, name: str) -> float:
    """A finite real number from a Python / numpy number or a one-element tensor; a clear error otherwise."""
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value.item()
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"`{name}` must be a number, got a tensor of shape {tuple(value.shape)} ({value.dtype}).")
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number, got {value!r}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value}.")
    return value


def check_generator(generator, batch: int, what: str) -> None:
    """None, a torch.Generator, or a list of 1 or ``batch`` of them (one per sampled row)."""
    gens = generator if isinstance(generator, list) else [generator]
    if generator is None:
        return
    bad = [g for g in gens if not isinstance(g, torch.Generator)]
    if bad or (isinstance(generator, list) and not generator):
        got = type(bad[0]).__name__ if bad else "an empty list"
        raise TypeError(f"`generator` must be a torch.Generator (e.g. torch.Generator().manual_seed(0)) or a list "
                        f"of them, got {got}; to seed, pass torch.Generator().manual_seed(seed).")
    if isinstance(generator, list) and len(generator) not in (1, batch):
        raise ValueError(f"got a list of {len(generator)} generators for {batch} {what}: pass one generator, or "
                         "one generator per row.")


def check_finite_tensor(x: torch.Tensor, name: str) -> None:
    """Refuse NaN / inf in an input tensor, naming the argument."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"`{name}` holds NaN or inf values; pass finite numbers.")


def finite_guard(state):
    """A step callback: stop a run whose sample became NaN / inf, naming the stage and the step."""
    if not bool(torch.isfinite(state.x).all()):
        raise FloatingPointError(
            f"the {state.stage} sample became NaN or inf at step {state.step} (timestep {state.timestep:g}); in "
            "float16 this is usually an overflow: use bfloat16 or float32 (--dtype bf16 / fp32), or a lower "
            "guidance scale. No picture was written."
        )
    return None


def to_arguments(device, dtype):
    """``pipe.to(torch.float16)`` (the diffusers idiom) means a dtype, not a device."""
    if isinstance(device, torch.dtype) and dtype is None:
        return None, device
    return device, dtype
