"""``out=`` support shared by every backend's dequantize kernels."""

from __future__ import annotations

from collections.abc import Callable

import torch


def into(out: torch.Tensor | None, run: Callable[[torch.Tensor | None], torch.Tensor]) -> torch.Tensor:
    """``run(target)`` writes its result into ``target`` (a new tensor when None) and returns it.

    A contiguous ``out`` is written in place; a strided one goes through a temporary,
    because the kernels write dense memory.
    """
    if out is None or out.is_contiguous():
        return run(out)
    out.copy_(run(None))
    return out
