"""Edge cases of the CUDA decode GEMV (csrc/cuda/gemv_4bit.cu), run by the emulation module.

The kernel's indexing (packed codes, absmax per quant block, and the nested absmax through
the 32-bit magic-number divider) is checked bit for bit with one-hot rows of x: row i of x
is e_{k_i}, so y[i, r] = W[r, k_i] exactly, whatever the summation order (every other
product is an exact zero), and any wrong code, block or nested block shows as a different
value. Random x is checked against the derived summation bound (tests/_helpers.py,
gemv_bound / cuda_gemv_roundings) and against the reference within both bounds.
"""

from __future__ import annotations

import pytest
import torch

import qpeft
import qpeft.functional as qf

from ._helpers import DTYPES, cuda_gemv_roundings, gemv_bound
from .emu_support import emu_module


@pytest.fixture(autouse=True)
def _emulated():
    emu_module()
    with qpeft.use_backend("cuda_emulated"):
        yield


def _reference(fn, *args, **kwargs):
    with qpeft.use_backend("default"):
        return fn(*args, **kwargs)


def _quantized(n, k, blocksize, quant_type="nf4", nested=True, nested_blocksize=256, seed=0):
    """(packed, state, W dequantized in fp32) with double quantization in blocks of
    ``nested_blocksize`` (any size > 0: 8-bit blockwise quantization takes any)."""
    g = torch.Generator().manual_seed(seed)
    # a different scale per row, so neighbouring quant blocks have distinct absmax
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g).add(0.1)
    packed, state = _reference(qf.quantize_4bit, w, blocksize, quant_type, False)
    if nested:
        absmax = state.absmax
        offset = absmax.mean()
        codes, state2 = _reference(qf.quantize_blockwise, absmax - offset, blocksize=nested_blocksize)
        state.absmax, state.offset, state.state2 = codes, offset, state2
    w_deq = _reference(qf.dequantize_4bit, packed, state, torch.float32)
    return packed, state, w_deq


def _one_hot_rows(cols, k, dtype):
    x = torch.zeros(len(cols), k, dtype=dtype)
    x[torch.arange(len(cols)), torch.tensor(cols)] = 1
    return x


def _check_columns(packed, state, w_deq, cols, dtype=torch.float32):
    """y = x @ W^T for one-hot rows of x at columns ``cols``: exactly columns of W."""
    k = w_deq.shape[1]
    x = _one_hot_rows(cols, k, dtype)
    y = qf.gemv_4bit(x, packed, state)
    expected = w_deq[:, cols].T.to(dtype)
    assert torch.equal(y, expected), (
        f"cols={cols}: {int((y != expected).sum())} of {y.numel()} outputs differ; worst "
        f"{float((y.float() - expected.float()).abs().max()):.3e}"
    )


def _every_column(packed, state, w_deq, dtype=torch.float32):
    k = w_deq.shape[1]
    for c0 in range(0, k, 8):
        _check_columns(packed, state, w_deq, list(range(c0, min(c0 + 8, k))), dtype)


@pytest.mark.parametrize("m", range(1, 9))
def test_rows_one_to_eight_are_exact_columns(m):
    # K = 1024 + 96: lanes with 1 or 2 chunks; every row count instantiates its own kernel
    packed, state, w_deq = _quantized(5, 1120, 64, seed=m)
    cols = [(37 * i + 5 * m) % 1120 for i in range(m)]
    _check_columns(packed, state, w_deq, cols)


@pytest.mark.parametrize("blocksize", [32, 64, 128])
def test_nested_blocksize_boundaries_power_of_two(blocksize):
    # N * K / blocksize = 640 quant blocks: nested blocks 0, 1, 2 (256 each), the last
    # partial; every column of every row reads its own absmax through the divider
    packed, state, w_deq = _quantized(160, 128 * blocksize // 32, blocksize, seed=blocksize)
    assert state.absmax.numel() > 2 * 256
    _every_column(packed, state, w_deq)


@pytest.mark.parametrize("nested_blocksize", [1, 3, 100, 255, 257])
def test_nested_blocksize_any_divisor(nested_blocksize):
    # The public API keeps nested blocksizes to the 4-bit list (powers of two); the native
    # entry point takes any > 0, so the ops are called directly (they trust their inputs):
    # non-powers of two exercise the magic-number divider's rounding (1: the identity).
    n, k, bs = 24, 256, 32
    packed, state, _ = _quantized(n, k, bs, nested=False, seed=nested_blocksize)
    offset = state.absmax.mean()
    codes, state2 = _reference(qf.quantize_blockwise, state.absmax - offset, blocksize=nested_blocksize)
    nested = (codes, state2.absmax, state2.code, offset.reshape(1))
    with qpeft.use_backend("default"):
        w_deq = torch.ops.qpeft.dequantize_4bit_nested(
            packed, *nested, bs, nested_blocksize, "nf4", [n, k], torch.float32
        )
    for c0 in range(0, k, 8):
        cols = list(range(c0, c0 + 8))
        x = _one_hot_rows(cols, k, torch.float32)
        y = torch.ops.qpeft.gemv_4bit(x, packed, *nested, bs, nested_blocksize, "nf4", n, k)
        assert torch.equal(y, w_deq[:, cols].T), f"nested_blocksize={nested_blocksize} cols={cols}"


@pytest.mark.parametrize("k", [32, 96, 1056])
@pytest.mark.parametrize("nested", [False, True])
def test_vector_path_partial_last_block(k, nested):
    # N * K not a multiple of the blocksize (blocksize 4096 > N * K for k=32, 96): the
    # last quant block is partial and blocks span rows
    packed, state, w_deq = _quantized(3, k, 4096, "fp4", nested, seed=k)
    _every_column(packed, state, w_deq, torch.bfloat16)


@pytest.mark.parametrize("k", [1, 17, 33, 100])
@pytest.mark.parametrize("blocksize", [32, 64])
def test_per_element_path_k_not_multiple_of_chunk(k, blocksize):
    # K % 32 != 0: rows start mid-byte and mid-block, the per-element path
    packed, state, w_deq = _quantized(7, k, blocksize, seed=k + blocksize)
    _every_column(packed, state, w_deq, torch.float16)


@pytest.mark.parametrize("m", [1, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_x_within_the_derived_bound(m, dtype):
    n, k = 6, 2048 + 32  # lanes with 2 and 3 chunks (K / 32 = 65 chunks)
    packed, state, w_deq = _quantized(n, k, 64, seed=10 + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    y = qf.gemv_4bit(x, packed, state)
    exact = x.double() @ w_deq.double().T
    tol = gemv_bound(x, w_deq, dtype, cuda_gemv_roundings(k))
    assert bool(((y.double() - exact).abs() <= tol).all())
    y_ref = _reference(qf.gemv_4bit, x, packed, state)
    assert bool(((y.double() - y_ref.double()).abs() <= tol + gemv_bound(x, w_deq, dtype, k)).all())


def test_the_schedule_does_not_change_the_bits():
    from qpeft.backends.cuda_emulated import emulation

    packed, state, w_deq = _quantized(9, 1088, 64, seed=3)
    x = torch.randn(3, 1088, dtype=torch.bfloat16)
    outs = []
    for seed, workers in ((0, 1), (1, 2), (5, 2)):
        with emulation(seed=seed, workers=workers):
            outs.append(qf.gemv_4bit(x, packed, state))
    for y in outs[1:]:
        assert torch.equal(y, outs[0])


def test_block_counts_of_2_pow_31_are_refused():
    # The kernel divides 32-bit block indices; the host refuses >= 2^31 quant blocks
    # before any memory is touched (the pointers below are never read).
    mod = emu_module()
    x = torch.zeros(64)
    dummy = torch.zeros(16)
    n, k, blocksize = 2**26, 2**10, 32  # 2^36 elements, 2^31 blocks
    with pytest.raises(ValueError, match="quant blocks of W is 2147483648"):
        mod.gemv_4bit(
            x.data_ptr(), 0, k, 1, k, dummy.data_ptr(), 2**35, dummy.data_ptr(), 2**31, n, blocksize, 2,
            0, 0, 0, 0, 256, dummy.data_ptr(), n, 0,
        )  # fmt: skip
