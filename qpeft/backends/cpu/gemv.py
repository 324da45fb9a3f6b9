"""``qpeft::gemv_4bit`` on CPU: the C++ kernel of csrc/cpu/gemv*.cpp (AVX-512, AVX2/FMA or
scalar, by the ISA level), which reads the packed codes once and never writes a decoded W.

x is widened to fp32 (at most 8 rows: nothing to speak of) and the fp32 result is
cast to x's dtype, as the reference does.
"""

from __future__ import annotations

import torch

from ... import _native
from ..._formats import QUANT_TYPE_IDS


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def gemv_4bit(
    x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, n, k
):
    xf = x.to(torch.float32).contiguous()
    packed, absmax = packed.contiguous(), absmax.contiguous()
    nested = nested_absmax is not None
    if nested:
        nested_absmax, nested_code, offset = (t.contiguous() for t in (nested_absmax, nested_code, offset))
    out = torch.empty((x.shape[0], n), dtype=torch.float32)
    _native.cpu_module().gemv_4bit(
        _ptr(xf),
        xf.numel(),
        x.shape[0],
        n,
        k,
        _ptr(packed),
        packed.numel(),
        _ptr(absmax),
        absmax.numel(),
        blocksize,
        QUANT_TYPE_IDS[quant_type],
        _ptr(nested_absmax),
        nested_absmax.numel() if nested else 0,
        _ptr(nested_code),
        _ptr(offset),
        nested_blocksize,
        _ptr(out),
        out.numel(),
        torch.get_num_threads(),
    )
    return out.to(x.dtype)
