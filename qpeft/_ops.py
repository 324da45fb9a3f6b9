"""Every qpeft op: its schema (``torch.library.custom_op``) and its fake impl.

The real implementation of each op only picks a kernel (``qpeft._registry``):
the backends in ``qpeft/backends/*/ops.py`` register them. Ops take and return
plain tensors; ``qpeft.functional`` wraps them with validation and QuantState.

Shapes (n = numel of the quantized tensor):
  packed 4-bit codes: uint8 [(n + 1) // 2, 1]; absmax: fp32 [ceil(n / blocksize)];
  8-bit codes: uint8, the input's shape; code maps: fp32 [256].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._registry import kernel_for


def _blocks(n: int, blocksize: int) -> int:
    return -(n // -blocksize)


@torch.library.custom_op("qpeft::quantize_4bit", mutates_args=())
def quantize_4bit(x: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit blockwise quantization: (packed codes, fp32 absmax per block)."""
    return kernel_for("quantize_4bit", x.device)(x, blocksize, quant_type)


@quantize_4bit.register_fake
def _(x, blocksize, quant_type):
    n = x.numel()
    packed = x.new_empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = x.new_empty((_blocks(n, blocksize),), dtype=torch.float32)
    return packed, absmax


@torch.library.custom_op("qpeft::dequantize_4bit", mutates_args=())
def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Decode packed 4-bit codes with fp32 absmax into a ``shape``/``dtype`` tensor."""
    return kernel_for("dequantize_4bit", packed.device)(packed, absmax, blocksize, quant_type, shape, dtype)


@dequantize_4bit.register_fake
def _(packed, absmax, blocksize, quant_type, shape, dtype):
    return packed.new_empty(tuple(shape), dtype=dtype)


@torch.library.custom_op("qpeft::dequantize_4bit_nested", mutates_args=())
def dequantize_4bit_nested(
    packed: torch.Tensor,
    absmax_codes: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_code: torch.Tensor,
    offset: torch.Tensor,
    blocksize: int,
    nested_blocksize: int,
    quant_type: str,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Decode packed 4-bit codes whose absmax is double-quantized, in one pass.

    absmax[b] = nested_code[absmax_codes[b]] * nested_absmax[b // nested_blocksize] + offset.
    """
    return kernel_for("dequantize_4bit_nested", packed.device)(
        packed, absmax_codes, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape, dtype
    )


@dequantize_4bit_nested.register_fake
def _(packed, absmax_codes, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape, dtype):
    return packed.new_empty(tuple(shape), dtype=dtype)


@torch.library.custom_op("qpeft::quantize_blockwise", mutates_args=())
def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization with a sorted 256-value map: (uint8 codes, fp32 absmax)."""
    return kernel_for("quantize_blockwise", x.device)(x, code, blocksize)


@quantize_blockwise.register_fake
def _(x, code, blocksize):
    q = x.new_empty(x.shape, dtype=torch.uint8)
    absmax = x.new_empty((_blocks(x.numel(), blocksize),), dtype=torch.float32)
    return q, absmax


@torch.library.custom_op("qpeft::dequantize_blockwise", mutates_args=())
def dequantize_blockwise(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    """Decode 8-bit blockwise codes: code[q] * absmax[block], cast to ``dtype``."""
    return kernel_for("dequantize_blockwise", q.device)(q, absmax, code, blocksize, dtype)


@dequantize_blockwise.register_fake
def _(q, absmax, code, blocksize, dtype):
    return q.new_empty(q.shape, dtype=dtype)
