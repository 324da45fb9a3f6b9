"""CUDA kernels: the CUDA C++ module ``qpeft._C_cuda``, launched on torch's current stream."""

from __future__ import annotations

import torch

from ... import _native
from ..._registry import register_availability
from ..native_abi import register_native
from ..native_gemv import register_native_gemv


def _stream(device: torch.device) -> tuple:
    return (torch.cuda.current_stream(device).cuda_stream,)


register_availability("cuda", _native.cuda_unavailable)

register_native("cuda", _native.cuda_module, _stream)
register_native_gemv("cuda", _native.cuda_module, _stream)
