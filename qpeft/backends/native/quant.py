"""The quantize/dequantize kernels (4-bit, double-quantized 4-bit, 8-bit blockwise) of
every native module of the shared ABI (see the package docstring)."""

from __future__ import annotations

from collections.abc import Callable
from math import prod
from types import ModuleType

import torch

from ..._dispatch import KernelTable, on_device
from ..._formats import DTYPE_IDS, QUANT_TYPE_IDS


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def kernels(
    module: Callable[[], ModuleType], extra_args: Callable[[torch.device], tuple]
) -> dict[str, Callable]:
    """``{op: kernel}`` over ``module()`` (see the package docstring)."""
    kernel = KernelTable()

    @kernel("quantize_4bit")
    def quantize_4bit(x, blocksize, quant_type):
        x = x.contiguous()
        n = x.numel()
        packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=x.device)
        absmax = torch.empty((-(n // -blocksize),), dtype=torch.float32, device=x.device)
        with on_device(x.device):
            module().quantize_4bit(
                _ptr(x),
                DTYPE_IDS[x.dtype],
                n,
                blocksize,
                QUANT_TYPE_IDS[quant_type],
                _ptr(packed),
                packed.numel(),
                _ptr(absmax),
                absmax.numel(),
                *extra_args(x.device),
            )
        return packed, absmax

    def _dequantize(packed, absmax, blocksize, quant_type, shape, dtype, nested, out):
        packed = packed.contiguous()
        absmax = absmax.contiguous()
        n = prod(int(s) for s in shape)
        if out is None:
            out = torch.empty(tuple(shape), dtype=dtype, device=packed.device)
        if nested is None:
            nested_args = (0, 0, 0, 0, 0)
        else:
            nested_absmax, nested_code, offset, nested_blocksize = nested
            nested_args = (
                _ptr(nested_absmax),
                nested_absmax.numel(),
                _ptr(nested_code),
                _ptr(offset),
                nested_blocksize,
            )
        with on_device(packed.device):
            module().dequantize_4bit(
                _ptr(packed),
                packed.numel(),
                _ptr(absmax),
                absmax.numel(),
                n,
                blocksize,
                QUANT_TYPE_IDS[quant_type],
                _ptr(out),
                DTYPE_IDS[dtype],
                *nested_args,
                *extra_args(packed.device),
            )
        return out

    @kernel("dequantize_4bit")
    def dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype, out=None):
        return _dequantize(packed, absmax, blocksize, quant_type, shape, dtype, None, out)

    @kernel("dequantize_4bit_nested")
    def dequantize_4bit_nested(
        packed,
        absmax_codes,
        nested_absmax,
        nested_code,
        offset,
        blocksize,
        nested_blocksize,
        quant_type,
        shape,
        dtype,
        out=None,
    ):
        nested = (nested_absmax.contiguous(), nested_code.contiguous(), offset.contiguous(), nested_blocksize)
        return _dequantize(packed, absmax_codes, blocksize, quant_type, shape, dtype, nested, out)

    @kernel("quantize_blockwise")
    def quantize_blockwise(x, code, blocksize):
        x = x.contiguous()
        code = code.contiguous()
        n = x.numel()
        q = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
        absmax = torch.empty((-(n // -blocksize),), dtype=torch.float32, device=x.device)
        with on_device(x.device):
            module().quantize_blockwise(
                _ptr(x),
                DTYPE_IDS[x.dtype],
                n,
                blocksize,
                _ptr(code),
                _ptr(q),
                q.numel(),
                _ptr(absmax),
                absmax.numel(),
                *extra_args(x.device),
            )
        return q, absmax

    @kernel("dequantize_blockwise")
    def dequantize_blockwise(q, absmax, code, blocksize, dtype, out=None):
        q = q.contiguous()
        absmax = absmax.contiguous()
        code = code.contiguous()

        target = out if out is not None else torch.empty(q.shape, dtype=dtype, device=q.device)
        with on_device(q.device):
            module().dequantize_blockwise(
                _ptr(q),
                q.numel(),
                _ptr(absmax),
                absmax.numel(),
                _ptr(code),
                q.numel(),
                blocksize,
                _ptr(target),
                DTYPE_IDS[dtype],
                *extra_args(q.device),
            )
        return target

    return kernel
