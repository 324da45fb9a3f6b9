"""A Triton kernel applying the fused kernels' interpreter prmt (triton_kernels/qlora.py,
``_prmt`` with ASM=False) element-wise, for tests/test_qlora_triton.py."""

from __future__ import annotations

import triton
import triton.language as tl

from qpeft.triton_kernels.qlora import _prmt


@triton.jit
def prmt_probe(a_ptr, b_ptr, s_ptr, d_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + i).to(tl.uint32, bitcast=True)
    b = tl.load(b_ptr + i).to(tl.uint32, bitcast=True)
    s = tl.load(s_ptr + i).to(tl.uint32, bitcast=True)
    tl.store(d_ptr + i, _prmt(a, b, s, False).to(tl.int32, bitcast=True))
