"""qpeft::gemv_4bit on CPU (csrc/cpu/gemv*.cpp), both ISAs, against the exact product.

The C++ kernel factors each block's absmax out of its sum: it computes
sum_b s_b * sum_{k in b} x_k t_k (t the code's table value) where the reference sums
x_k * fl(t_k s_b). Exactly, the two differ by sum_k x_k (t_k s_b - fl(t_k s_b)), at most
u * sum|x_k w_k| (u = 2^-24; one rounding per decoded weight). Each product then reaches
the result through at most h roundings: the scalar kernel's chain within a block
(2 per term: multiply, add), the block's scaling and its add into the row total (2 per
block), and, in the AVX2 kernel, a shorter lane chain plus a 3-level horizontal sum;
h = 2 * (blocksize + K / blocksize) + 8 covers both. The bound is
gamma_h * sum|x w| + u * sum|x w| (gemv_bound of test_cuda_emulated.py, derived there),
plus the output dtype's half ulp.
"""

from __future__ import annotations

import pytest
import torch

import qpeft
import qpeft.functional as qf
from qpeft import _native

from .conftest import DTYPES
from .test_cuda_emulated import gemv_bound

U32 = 2.0**-24


def _depth(k: int, blocksize: int) -> int:
    return 2 * (blocksize + -(-k // blocksize)) + 8


@pytest.fixture(params=["scalar", "avx2"])
def isa(request):
    mod = _native.cpu_module()
    if request.param == "avx2" and not mod.cpu_features()["avx2"]:
        pytest.skip("this CPU has no AVX2")  # the scalar kernel is still tested
    prev = mod.set_isa(request.param)
    yield request.param
    mod.set_isa(prev)


def _check(m, n, k, dtype, quant_type, blocksize, nested, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(m, k, generator=g).to(dtype)
    packed, state = qf.quantize_4bit(w, blocksize, quant_type, nested)
    with qpeft.use_backend("cpu"):
        y = qf.gemv_4bit(x, packed, state)
    assert y.shape == (m, n) and y.dtype == dtype
    with qpeft.use_backend("default"):
        w_deq = qf.dequantize_4bit(packed, state, torch.float32)
    exact = x.double() @ w_deq.double().T
    tol = gemv_bound(x, w_deq, dtype, _depth(k, blocksize)) + U32 * (
        x.double().abs() @ w_deq.double().abs().T
    )
    err = (y.double() - exact).abs()
    what = f"m={m} n={n} k={k} {dtype} {quant_type} bs{blocksize} nested={nested}"
    assert bool((err <= tol).all()), f"{what}: worst excess {float((err - tol).max()):.3e}"


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_and_dtypes(isa, m, dtype):
    _check(m, 70, 256, dtype, "nf4", 64, True)  # whole blocks per row: the AVX2 path


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 128, 4096])
@pytest.mark.parametrize("nested", [False, True])
def test_quant_states(isa, quant_type, blocksize, nested):
    _check(3, 33, 4096 if blocksize == 4096 else 384, torch.float32, quant_type, blocksize, nested)


@pytest.mark.parametrize("k", [1, 37, 83, 100])  # blocks straddle rows, odd rows start mid-byte
def test_rows_not_whole_blocks(isa, k):
    _check(2, 45, k, torch.bfloat16, "nf4", 32, True)


def test_many_threads_and_rows_agree(isa):
    # more threads than rows, and the multi-threaded split of a wide W: same values
    w = torch.randn(300, 512)
    x = torch.randn(2, 512)
    packed, state = qf.quantize_4bit(w)
    with qpeft.use_backend("cpu"):
        prev = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = qf.gemv_4bit(x, packed, state)
            torch.set_num_threads(2)
            two = qf.gemv_4bit(x, packed, state)
        finally:
            torch.set_num_threads(prev)
    assert torch.equal(one, two)  # rows of W are split, never the sum of one output


def test_opcheck_and_errors():
    w = torch.randn(16, 64)
    packed, state = qf.quantize_4bit(w)
    args = (
        torch.randn(2, 64),
        packed,
        state.absmax,
        state.state2.absmax,
        state.state2.code,
        state.offset.reshape(1),
        64,
        256,
        "nf4",
        16,
        64,
    )
    with qpeft.use_backend("cpu"):
        torch.library.opcheck(torch.ops.qpeft.gemv_4bit.default, args)
        with pytest.raises(ValueError, match="1 to 8 rows"):
            qf.gemv_4bit(torch.randn(9, 64), packed, state)
        with pytest.raises(ValueError, match="in_features"):
            qf.gemv_4bit(torch.randn(1, 63), packed, state)
    with pytest.raises(ValueError, match="packed holds"):  # the C++ entry re-checks sizes
        x, out = torch.randn(1, 64), torch.empty(1, 16)
        _native.cpu_module().gemv_4bit(
            x.data_ptr(),
            x.numel(),
            1,
            16,
            64,
            packed.data_ptr(),
            packed.numel() - 1,
            state.absmax.data_ptr(),
            state.absmax.numel(),
            64,
            2,
            0,
            0,
            0,
            0,
            256,
            out.data_ptr(),
            out.numel(),
            1,
        )
