"""Triton kernels (``qpeft.triton_kernels``) for CUDA tensors.

With ``TRITON_INTERPRET=1`` set before triton is imported, Triton's interpreter
runs the same kernels on CPU tensors: that is how CI executes them without a GPU
(forced with ``qpeft.use_backend("triton")``; never chosen by default on CPU).
Registration imports nothing from triton; the first kernel call does.
"""

from __future__ import annotations

from . import ops  # noqa: F401
