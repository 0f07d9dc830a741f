"""How a command ends, written once for every command line (``kandinsky ...`` and ``python -m
weights_convert``):

* an expected error (``EXPECTED``: ValueError and its kin ConfigError, TrainError, DataError,
  LoRAError, InputError; OSError and its kin WeightsError, CheckpointNotFound; TypeError,
  RuntimeError, FloatingPointError) prints one line ``error: <message>`` on stderr: exit status 2,
  never a traceback (any other exception is a bug and keeps its traceback);
* Ctrl-C (KeyboardInterrupt anywhere) prints ``interrupted: <prog> stopped by Ctrl-C; kept <what>``:
  exit status 130; what was kept is what the command last said with ``on_interrupt`` (default
  "nothing written");
* warnings print as ``warning: <message>``.
"""
from __future__ import annotations

import contextlib
import sys

# every one of ConfigError, TrainError, DataError, LoRAError, InputError is a ValueError; WeightsError and
# CheckpointNotFound are OSErrors; the pipelines' NaN guard raises FloatingPointError
EXPECTED = (ValueError, TypeError, OSError, RuntimeError, FloatingPointError)
NOTHING = "nothing written"
_kept = NOTHING


def on_interrupt(kept) -> None:
    """What a Ctrl-C keeps, for the ``interrupted: ...; kept <kept>`` line: a string, or a function
    returning one (called when the interrupt comes)."""
    global _kept
    _kept = kept


def run(prog: str, function, *args, kept=NOTHING) -> int:
    """``function(*args)`` as the command ``prog`` (e.g. "kandinsky text2img"): its exit status (None: 0),
    with the error, Ctrl-C and warning rules above; ``kept``: what a Ctrl-C keeps until the command
    says otherwise (``on_interrupt``)."""
    on_interrupt(kept)
    with plain_warnings():
        try:
            return function(*args) or 0
        except KeyboardInterrupt:
            kept = _kept() if callable(_kept) else _kept
            print(f"interrupted: {prog} stopped by Ctrl-C; kept {kept}", file=sys.stderr)
            return 130
        except EXPECTED as e:
            print(f"error: {e}", file=sys.stderr)
            return 2


@contextlib.contextmanager
def plain_warnings():
    """Warnings printed as `warning: ...` (not as a line of the console-script wrapper)."""
    import warnings

    show = warnings.showwarning
    warnings.showwarning = lambda message, category, *a, **k: print(f"warning: {message}", file=sys.stderr)
    try:
        yield
    finally:
        warnings.showwarning = show
