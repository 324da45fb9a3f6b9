"""The Triton backend's quantization kernels (``qpeft.triton_kernels.quant``).

Each wrapper validates (``qpeft._validate``), makes its inputs contiguous and calls
the launcher; the kernel module, and with it triton, is imported on the first call
so ``import qpeft`` never imports triton.
"""

from __future__ import annotations

import torch

from ... import _validate
from ..._registry import register_kernel
from .._out import into


def _kernels():
    from ...triton_kernels import quant

    return quant


@register_kernel("quantize_4bit", "triton")
def quantize_4bit(x: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    _validate.quantize_4bit(x, blocksize, quant_type)
    return _kernels().quantize_4bit(x.contiguous(), blocksize, quant_type)


@register_kernel("dequantize_4bit", "triton")
def dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype, out=None):
    _validate.dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype, out)
    return into(
        out,
        lambda target: _kernels().dequantize_4bit(
            packed.contiguous(), absmax.contiguous(), blocksize, quant_type, shape, dtype, target
        ),
    )


@register_kernel("dequantize_4bit_nested", "triton")
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
    return into(
        out,
        lambda target: _kernels().dequantize_4bit_nested(
            packed.contiguous(),
            absmax_codes.contiguous(),
            nested_absmax.contiguous(),
            nested_code.contiguous(),
            offset.contiguous(),
            blocksize,
            nested_blocksize,
            quant_type,
            shape,
            dtype,
            target,
        ),
    )


@register_kernel("quantize_blockwise", "triton")
def quantize_blockwise(
    x: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    _validate.quantize_blockwise(x, code, blocksize)
    return _kernels().quantize_blockwise(x.contiguous(), code.contiguous(), blocksize)


@register_kernel("dequantize_blockwise", "triton")
def dequantize_blockwise(q, absmax, code, blocksize, dtype, out=None):
    _validate.dequantize_blockwise(q, absmax, code, blocksize, dtype, out)
    return into(
        out,
        lambda target: _kernels().dequantize_blockwise(
            q.contiguous(), absmax.contiguous(), code.contiguous(), blocksize, dtype, target
        ),
    )
