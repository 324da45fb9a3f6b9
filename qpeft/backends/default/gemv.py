"""Pure-torch reference of ``qpeft::gemv_4bit`` (the decode GEMV), and its argument checks.

W is dequantized to fp32 through the registered dequantize ops (exact: the decoded
values are fp32 products, the same ones the CUDA kernel forms), the product runs as
one fp32 torch matmul, and the result is cast to x's dtype. The checks are shared
with the native kernels (qpeft/backends/native_gemv.py).
"""

from __future__ import annotations

import torch

from ... import _validate
from ..._formats import FLOAT_DTYPES
from ..._registry import register_kernel
from .qlora import dequantize_weight

MAX_ROWS = 8  # the GEMV is the decode path; csrc/cuda/gemv_4bit.cu instantiates M <= 8


def validate(
    x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, n, k
) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, in_features], got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    m = x.shape[0]
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(
            f"gemv_4bit takes 1 to {MAX_ROWS} rows of x (decoding), got {m}; use qlora_linear or "
            "dequantize_4bit + a matmul for more rows"
        )
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} features but the weight has in_features={k}")
    if n < 1 or k < 1:
        raise ValueError(f"the weight must be non-empty, got out_features={n}, in_features={k}")
    nested = (nested_absmax, nested_code, offset)
    if any(t is None for t in nested) and not all(t is None for t in nested):
        raise ValueError("double quantization needs nested_absmax, nested_code and offset together")
    if nested_absmax is None:
        _validate.dequantize_4bit(packed, absmax, blocksize, quant_type, [n, k], torch.float32)
    else:
        _validate.dequantize_4bit_nested(
            packed,
            absmax,
            nested_absmax,
            nested_code,
            offset,
            blocksize,
            nested_blocksize,
            quant_type,
            [n, k],
            torch.float32,
        )
    _validate.same_device(("x", x), ("packed", packed), ("absmax", absmax))


@register_kernel("gemv_4bit", "default")
def gemv_4bit(
    x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, n, k
):
    validate(
        x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, n, k
    )
    w = dequantize_weight(
        packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, n, k
    )
    return (x.float() @ w.T).to(x.dtype)
