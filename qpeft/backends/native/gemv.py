"""The decode GEMV (``qpeft::gemv_4bit``) of the CUDA modules: ``qpeft._C_cuda`` on CUDA
tensors and ``qpeft._C_cuda_emu`` (the same kernel, emulated) on CPU tensors (ABI:
csrc/cuda/ops.h, gemv_4bit). The CPU module's GEMV has its own ABI
(``qpeft/backends/cpu/gemv.py``)."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch

from ..._dispatch import KernelTable, on_device
from ..._formats import DTYPE_IDS, QUANT_TYPE_IDS


def kernels(module: Callable[[], ModuleType], extra_args: Callable[[torch.device], tuple]) -> KernelTable:
    kernel = KernelTable()

    @kernel("gemv_4bit")
    def gemv_4bit(
        x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, n, k
    ):
        x = x.contiguous()
        packed = packed.contiguous()
        absmax = absmax.contiguous()
        m = x.shape[0]
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
        if nested_absmax is None:
            nested_args = (0, 0, 0, 0, nested_blocksize)
        else:
            nested_absmax, nested_code, offset = (
                t.contiguous() for t in (nested_absmax, nested_code, offset)
            )
            nested_args = (
                nested_absmax.data_ptr(),
                nested_absmax.numel(),
                nested_code.data_ptr(),
                offset.data_ptr(),
                nested_blocksize,
            )
        with on_device(x.device):
            module().gemv_4bit(
                x.data_ptr(),
                DTYPE_IDS[x.dtype],
                x.numel(),
                m,
                k,
                packed.data_ptr(),
                packed.numel(),
                absmax.data_ptr(),
                absmax.numel(),
                n,
                blocksize,
                QUANT_TYPE_IDS[quant_type],
                *nested_args,
                out.data_ptr(),
                out.numel(),
                *extra_args(x.device),
            )
        return out

    return kernel
