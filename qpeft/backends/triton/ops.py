"""Backend "triton": the Triton kernels of ``qpeft.triton_kernels`` on CUDA tensors (and,
forced with ``use_backend("triton")`` under ``TRITON_INTERPRET=1``, on CPU tensors)."""

from __future__ import annotations

import importlib.util
import os

from ..._dispatch import register_backend
from . import qlora, quant


def _unavailable() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    import torch

    if not torch.cuda.is_available():
        return "torch sees no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU)"
    return None


register_backend(
    "triton",
    {
        "quantize_4bit": quant.quantize_4bit,
        "dequantize_4bit": quant.dequantize_4bit,
        "dequantize_4bit_nested": quant.dequantize_4bit_nested,
        "quantize_blockwise": quant.quantize_blockwise,
        "dequantize_blockwise": quant.dequantize_blockwise,
        "qlora_linear": qlora.qlora_linear,
        "qlora_linear_backward": qlora.qlora_linear_backward,
    },
    _unavailable,
)
