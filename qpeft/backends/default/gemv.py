"""Pure-torch reference of ``qpeft::gemv_4bit`` (the decode GEMV).

W is dequantized to fp32 through the registered dequantize ops (exact: the decoded
values are fp32 products, the same ones the CUDA kernel forms), the product runs as
one fp32 torch matmul, and the result is cast to x's dtype.
"""

from __future__ import annotations

from .qlora import dequantize_weight


def gemv_4bit(
    x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, n, k
):
    w = dequantize_weight(
        packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, n, k
    )
    return (x.float() @ w.T).to(x.dtype)
