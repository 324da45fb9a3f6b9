"""Backend "cuda": the CUDA C++ module ``qpeft._C_cuda``, launched on torch's current stream
of the tensors' device: quantization, the decode GEMV and the optimizer steps. The fused
QLoRA GEMM has no CUDA C++ kernel yet: on CUDA it runs on Triton or the reference."""

from __future__ import annotations

import torch

from ... import _native
from ..._dispatch import register_backend
from ..native import gemv as native_gemv
from ..native import optim as native_optim
from ..native import quant as native_quant


def _stream(device: torch.device) -> tuple:
    return (torch.cuda.current_stream(device).cuda_stream,)


register_backend(
    "cuda",
    {
        **native_quant.kernels(_native.cuda_module, _stream),
        **native_gemv.kernels(_native.cuda_module, _stream),
        **native_optim.kernels(_native.cuda_module, _stream),
    },
    _native.cuda_unavailable,
)
