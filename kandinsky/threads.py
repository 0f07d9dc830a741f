"""How many CPU threads a pipeline call runs on: one for small models, the caller's setting otherwise.

A tiny model's operations are too small to split across threads: the threads only wait on each other,
and on a busy machine they wait for a core too (the shipped demo UNet, one guided evaluation at 64 px:
12-15 ms on one thread, 100-200 ms on two on a loaded 2-core machine; benchmarks/bench_threads.py). The one
rule, applied by every pipeline call (DecoderPipeline.run, PriorPipeline's sampling, Kandinsky.run), however
the pipeline was loaded, by training (the data set's encoding and each step: kandinsky.training.loop), and by
every ``kandinsky`` command for the model calls it makes itself (eval's MoVQ round trip, score's and mix's CLIP
towers: kandinsky.cli.common.keep_threads holds a loaded pipeline's measure until the command ends):

    work = parameters x positions of one picture per model evaluation (the decoder: UNet parameters x
           latent pixels; the prior alone: prior and text encoder parameters x tokens)
    on the CPU and work < SMALL_WORK  -> the call runs on one intra-op thread, and the caller's setting
                                         is restored when it returns (or raises)
    otherwise                         -> the caller's setting, untouched (full-size models always)

The caller wins: ``KANDINSKY_THREADS=n`` runs every pipeline call on n threads, whatever its size;
``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` in the environment, or ``torch.set_num_threads`` called with
another number than torch had when this module was imported, leave the threads alone.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch

# parameters x positions below which a call runs on one thread (benchmarks/bench_threads.py, docs/performance.md):
# the shipped demo UNet is 1.9e8 at 64 px and 1.2e10 at 512 px (one thread); the full-size UNet is 8.0e10 at
# 64 px, its smallest picture (the caller's threads, always).
SMALL_WORK = 2e10
ENV = "KANDINSKY_THREADS"  # n: every pipeline call runs on n threads
TORCH_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # torch reads these: the rule leaves the threads alone

_START = torch.get_num_threads()  # torch's setting when kandinsky was imported: another one was set by the caller
_lock = threading.Lock()
_depth = 0  # calls in progress (nested or concurrent): the first sets the threads, the last restores them
_saved: int | None = None


def parameters(*modules) -> int:
    """The number of parameters of ``modules`` (on any device, the meta device included)."""
    return sum(p.numel() for m in modules for p in m.parameters())


def wanted_threads(work: float, device=None) -> int | None:
    """The intra-op threads a call of ``work`` (parameters x positions) on ``device`` runs on, or None:
    the caller's setting stays."""
    value = os.environ.get(ENV, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{ENV}={value!r}: it must be a positive number of threads (every pipeline call "
                             f"runs on that many); unset it for the automatic rule (kandinsky.threads).")
        return int(value)
    if device is not None and torch.device(device).type != "cpu":
        return None  # intra-op threads are the CPU's
    if any(os.environ.get(name, "").strip() for name in TORCH_ENV):
        return None
    if torch.get_num_threads() != _START:
        return None  # set by the caller
    return 1 if work < SMALL_WORK else None


@contextlib.contextmanager
def threads_for(work: float, device=None):
    """Run the block on :func:`wanted_threads` threads; the caller's setting is restored afterwards."""
    global _depth, _saved
    with _lock:
        if _depth == 0:
            n = wanted_threads(work, device)
            _saved = torch.get_num_threads() if n is not None and n != torch.get_num_threads() else None
            if _saved is not None:
                torch.set_num_threads(n)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved is not None:
                torch.set_num_threads(_saved)
                _saved = None


def per_call(method):
    """Decorator: run a pipeline method under ``self.threads(*args, **kwargs)`` (the pipeline's measure of
    its work, handed to :func:`threads_for`)."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with self.threads(*args, **kwargs):
            return method(self, *args, **kwargs)
    return call
