"""Kernels of the two native modules, which share one raw-pointer ABI (csrc/README.md).

``register_native(backend, module, extra_args)`` registers the same five wrappers
for ``qpeft._C`` (CPU: trailing thread count) and ``qpeft._C_cuda`` (CUDA:
trailing stream handle). Each wrapper validates, makes inputs contiguous,
allocates outputs and passes pointers and element counts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from math import prod
from types import ModuleType

import torch

from .. import _validate
from .._formats import DTYPE_IDS, QUANT_TYPE_IDS
from .._registry import register_kernel
from ._out import into


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def register_native(
    backend: str,
    module: Callable[[], ModuleType],
    extra_args: Callable[[torch.device], tuple],
) -> None:
    def guard(device: torch.device):
        if device.type == "cuda":
            return torch.cuda.device(device)
        return contextlib.nullcontext()

    @register_kernel("quantize_4bit", backend)
    def quantize_4bit(x, blocksize, quant_type):
        _validate.quantize_4bit(x, blocksize, quant_type)
        x = x.contiguous()
        n = x.numel()
        packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=x.device)
        absmax = torch.empty((-(n // -blocksize),), dtype=torch.float32, device=x.device)
        with guard(x.device):
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
        with guard(packed.device):
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

    @register_kernel("dequantize_4bit", backend)
    def dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype, out=None):
        _validate.dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype, out)
        return into(
            out, lambda target: _dequantize(packed, absmax, blocksize, quant_type, shape, dtype, None, target)
        )

    @register_kernel("dequantize_4bit_nested", backend)
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
        _validate.dequantize_4bit_nested(
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
            out,
        )
        nested = (nested_absmax.contiguous(), nested_code.contiguous(), offset.contiguous(), nested_blocksize)
        return into(
            out,
            lambda target: _dequantize(
                packed, absmax_codes, blocksize, quant_type, shape, dtype, nested, target
            ),
        )

    @register_kernel("quantize_blockwise", backend)
    def quantize_blockwise(x, code, blocksize):
        _validate.quantize_blockwise(x, code, blocksize)
        x = x.contiguous()
        code = code.contiguous()
        n = x.numel()
        q = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
        absmax = torch.empty((-(n // -blocksize),), dtype=torch.float32, device=x.device)
        with guard(x.device):
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

    @register_kernel("dequantize_blockwise", backend)
    def dequantize_blockwise(q, absmax, code, blocksize, dtype, out=None):
        _validate.dequantize_blockwise(q, absmax, code, blocksize, dtype, out)
        q = q.contiguous()
        absmax = absmax.contiguous()
        code = code.contiguous()

        def run(target):
            if target is None:
                target = torch.empty(q.shape, dtype=dtype, device=q.device)
            with guard(q.device):
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

        return into(out, run)
