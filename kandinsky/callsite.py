"""Warnings that point at the user's line, not at ours."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

_INTERNAL = (str(Path(__file__).resolve().parent) + os.sep, str(Path(torch.utils.__file__).parent / "_contextlib"))


def user_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` (called by the function that calls this) naming the
    first line outside kandinsky and torch's no_grad wrapper."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level
