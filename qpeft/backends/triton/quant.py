"""The Triton backend's quantization kernels (``qpeft.triton_kernels.quant``): each makes
its inputs contiguous and calls the launcher under ``on_device`` (Triton launches on the
current device and that device's current stream, which must be the tensors'). The kernel
module, and with it triton, is imported on the first call, so ``import qpeft`` never
imports triton."""

from __future__ import annotations

import torch

from ..._dispatch import on_device


def _kernels():
    from ...triton_kernels import quant

    return quant


def quantize_4bit(x: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    with on_device(x.device):
        return _kernels().quantize_4bit(x.contiguous(), blocksize, quant_type)


def dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype, out=None):
    with on_device(packed.device):
        return _kernels().dequantize_4bit(
            packed.contiguous(),
            absmax.contiguous(),
            blocksize,
            quant_type,
            shape,
            dtype,
            out,
        )


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
    with on_device(packed.device):
        return _kernels().dequantize_4bit_nested(
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
            out,
        )


def quantize_blockwise(
    x: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    with on_device(x.device):
        return _kernels().quantize_blockwise(x.contiguous(), code.contiguous(), blocksize)


def dequantize_blockwise(q, absmax, code, blocksize, dtype, out=None):
    with on_device(q.device):
        return _kernels().dequantize_blockwise(
            q.contiguous(),
            absmax.contiguous(),
            code.contiguous(),
            blocksize,
            dtype,
            out,
        )
