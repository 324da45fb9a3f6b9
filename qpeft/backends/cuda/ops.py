"""Backend "cuda": the CUDA C++ module ``qpeft._C_cuda``, launched on torch's current stream
of the tensors' device: quantization, the decode GEMV, the optimizer steps and the fused
QLoRA GEMM (``qlora_linear`` and dx of ``qlora_linear_backward``: csrc/cuda/qlora_gemm.cu,
fp16/bf16 tensor-core MMAs on sm_80+, LoRA ranks up to 4096 in chunks of 64; fp32 activations take the
reference, dA/dB/dbias are torch matmuls: qpeft/backends/native/qlora.py). On CUDA devices
Triton is preferred where installed (qpeft._dispatch.PRIORITY); use_backend("cuda") picks
these kernels."""

from __future__ import annotations

import torch

from ... import _native
from ..._dispatch import register_backend
from ..native import gemv as native_gemv
from ..native import optim as native_optim
from ..native import qlora as native_qlora
from ..native import quant as native_quant


def _stream(device: torch.device) -> tuple:
    return (torch.cuda.current_stream(device).cuda_stream,)


register_backend(
    "cuda",
    {
        **native_quant.kernels(_native.cuda_module, _stream),
        **native_gemv.kernels(_native.cuda_module, _stream),
        **native_optim.kernels(_native.cuda_module, _stream),
        **native_qlora.kernels(_native.cuda_module, _stream),
    },
    _native.cuda_unavailable,
)
