"""qpeft::gemv_4bit on CPU (csrc/cpu/gemv*.cpp), every ISA level with a GEMV kernel of its own
that this CPU runs (scalar, avx2, avx512), against the exact product, within
cpu_gemv_bound (derived in tests/_helpers.py: the kernel's summation depth and its factoring of
each block's absmax out of the block's sum). The random property over every backend is in
test_backends.py.
"""

from __future__ import annotations

import pytest
import torch

import qpeft
import qpeft.functional as qf
from qpeft import _native
from qpeft._formats import code4, dynamic_map

from ._helpers import DTYPES, cpu_gemv_bound


@pytest.fixture(params=["scalar", "avx2", "avx512"])
def isa(request):
    mod = _native.cpu_module()
    info = mod.cpu_info()
    if request.param not in info["built_levels"]:
        pytest.skip(f"this build has no {request.param} kernels")
    if request.param in info["missing"]:  # the scalar kernel is still tested
        pytest.skip(f"this CPU lacks {info['missing'][request.param]}")
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
    tol = cpu_gemv_bound(x, w_deq, dtype, blocksize)
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


@pytest.mark.parametrize(
    ("m", "blocksize", "nested_blocksize", "blocks_per_row"),
    [
        (1, 32, 256, 9),  # M=1, blocksize 32: 2 accumulators
        (1, 64, 256, 40),  # M=1, blocksize >= 64: 4; rows of 40 blocks: 16 + 16 + 8
        (2, 32, 3, 7),  # nested groups of fewer than 16 blocks: one scale at a time
        (1, 64, 5, 3),
        (4, 64, 16, 21),  # a group of exactly 16 blocks
        (1, 128, 17, 33),  # groups of 17 and 20 blocks end inside 16-block segments
        (7, 64, 20, 18),
        (8, 256, 32, 2),  # rows of fewer than 16 blocks
    ],
)
def test_block_scale_segments(isa, m, blocksize, nested_blocksize, blocks_per_row):
    """Double-quantized scales with any nested block size the native entry takes (the Python
    API only makes 32..4096): the AVX-512 kernel computes 16 block scales at a time, one at a
    time for nested groups under 16 blocks, and steps its nested-group cursor where a group
    ends inside a 16-block segment. Random codes, absmax codes and nested absmax; the weights
    are decoded here in fp32 exactly as nested_absmax_value and dequantize do (two roundings
    per scale, one per weight), the product in fp64."""
    g = torch.Generator().manual_seed(blocksize * 1000 + nested_blocksize)
    n, k = 37, blocks_per_row * blocksize
    blocks = n * k // blocksize
    packed = torch.randint(0, 256, (n * k // 2, 1), dtype=torch.uint8, generator=g)
    absmax_q = torch.randint(0, 256, (blocks,), dtype=torch.uint8, generator=g)
    nested_absmax = torch.rand(-(-blocks // nested_blocksize), generator=g) + 0.5
    nested_code = dynamic_map()
    offset = torch.tensor([0.0625])
    x = torch.randn(m, k, generator=g)
    scale = nested_code[absmax_q.long()] * nested_absmax.repeat_interleave(nested_blocksize)[:blocks]
    scale = scale + offset  # fp32, rounded twice as nested_absmax_value
    codes = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 15], 1).reshape(n, k).long()
    w = code4("nf4")[codes] * scale.repeat_interleave(blocksize).reshape(n, k)
    with qpeft.use_backend("cpu"):
        y = torch.ops.qpeft.gemv_4bit(
            x, packed, absmax_q, nested_absmax, nested_code, offset, blocksize, nested_blocksize, "nf4", n, k
        )
    exact = x.double() @ w.double().T
    err = (y.double() - exact).abs()
    tol = cpu_gemv_bound(x, w, torch.float32, blocksize)
    assert bool((err <= tol).all()), f"worst excess {float((err - tol).max()):.3e}"


@pytest.mark.parametrize(("blocksize", "nested"), [(64, True), (32, False), (256, True)])
def test_one_hot_rows_read_the_dequantized_columns(isa, blocksize, nested):
    """x = 8 one-hot rows: y[i] = W[:, j_i] exactly (one product 1 * w, sums of zeros), so the
    kernel must decode every weight to dequantize_4bit's fp32 value bit for bit, at the
    position the reference puts it: each column j_i goes through a different lane of the
    kernels' decode (the AVX-512 kernel's interleaved lanes 2q / 2q + 1, both nibbles of a
    byte, first and last groups of a block, several blocks)."""
    g = torch.Generator().manual_seed(blocksize)
    n, k = 21, 4 * max(blocksize, 128)
    w = torch.randn(n, k, generator=g)
    packed, state = qf.quantize_4bit(w, blocksize, "nf4", nested)
    cols = [0, 1, 8, 9, 15, blocksize - 1, blocksize + 6, k - 1]
    x = torch.zeros(len(cols), k)
    x[torch.arange(len(cols)), torch.tensor(cols)] = 1.0
    with qpeft.use_backend("cpu"):
        y = qf.gemv_4bit(x, packed, state)
    with qpeft.use_backend("default"):
        w_deq = qf.dequantize_4bit(packed, state, torch.float32)
    assert torch.equal(y, w_deq[:, cols].T)


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
