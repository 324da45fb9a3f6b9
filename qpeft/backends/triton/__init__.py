"""Triton kernels (``qpeft.triton_kernels``) for CUDA tensors.

With ``TRITON_INTERPRET=1`` set before triton is imported, Triton's interpreter
runs the same kernels on CPU tensors: that is how CI executes them without a GPU
(forced with ``qpeft.use_backend("triton")``; never chosen by default on CPU).
Registration imports nothing from triton; the first kernel call does.
"""

from __future__ import annotations

import importlib.util
import os

from ..._registry import register_availability


def _unavailable() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    import torch

    if not torch.cuda.is_available():
        return "torch sees no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU)"
    return None


register_availability("triton", _unavailable)

from . import qlora, quant  # noqa: E402,F401  (registration after availability)
