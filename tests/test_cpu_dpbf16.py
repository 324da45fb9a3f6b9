"""The fused decode + vdpbf16ps GEMM of the avx512_bf16 level (csrc/cpu/qgemm_avx512bf16.cpp,
qpeft/backends/cpu/dpbf16.py) against an fp64 oracle on the exactly decoded W, and the CPU
QLoRA layer with it (QPEFT_CPU_ISA=avx512_bf16, M in 9..64) against the same layer on
oneDNN's panels, both within the bf16 mode's bounds.

The kernel's bound (``dp_bound``). vdpbf16ps (Intel SDM) multiplies bf16 pairs exactly in
fp32 and adds both products into the fp32 accumulator with round-to-nearest-even; it reads
bf16 subnormal inputs as zero (DAZ) and flushes subnormal fp32 results to zero (FTZ). Each
output is the sum of k products in 16 lanes per accumulator: a lane adds 2 products per
32-element chunk (at most 2 * ceil(min(k, 2048) / 32) additions per 2048-element chunk of
the reduction), a transpose-add tree sums the 16 lanes (4 additions), and the chunks' sums
are added to the output one after another (ceil(k / 2048) - 1 additions). So every product
passes through at most d = 2 ceil(min(k, 2048) / 32) + 4 + ceil(k / 2048) roundings and
    |y - x W^T| <= gamma(d) sum_k |x_k| |w_k| + 2^-126 (sum_k |x_k| + sum_k |w_k| + 2 k)
where the absolute term is the flushes: a subnormal x_k read as zero loses |x_k w_k| <
2^-126 |w_k| (a subnormal w_k: < 2^-126 |x_k|), a product below 2^-126 flushed loses < 2^-126,
and each of the k fp32 partial sums flushed loses < 2^-126. The term is below 1e-33 for
unit-sized operands; test_tiny_values_within_the_flush_bound feeds values near 2^-126.

Runs only on a CPU (and OS) with AVX512-BF16 (the avx512_bf16 level or above); elsewhere
the tests skip naming what is missing.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qpeft
from qpeft import _native
from qpeft.backends.cpu import capability, dpbf16
from qpeft.functional import _quant_args, dequantize_4bit, quantize_4bit

from ._bf16_bounds import gamma
from ._helpers import assert_within, check_qlora_linear, make_problem

try:
    _INFO = qpeft.cpu_info()
except Exception as e:  # no native module: nothing to run
    _INFO = {"detected_level": None, "missing": {"avx512_bf16": str(e)}}
pytestmark = pytest.mark.skipif(
    _INFO["detected_level"] not in ("avx512_bf16", "amx"),
    reason=f"this CPU lacks the avx512_bf16 level: {_INFO.get('missing', {}).get('avx512_bf16', '?')}",
)

TINY32 = 2.0**-126


def dp_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The bound above on |qgemm_4bit_dpbf16(x) - x @ w^T| (x [M, k], w [N, k] in fp64,
    holding bf16 values exactly)."""
    k = x.shape[1]
    d = 2 * math.ceil(min(k, 2048) / 32) + 4 + math.ceil(k / 2048)
    ax, aw = x.abs(), w.abs()
    flush = TINY32 * (ax.sum(1, keepdim=True) + aw.sum(1)[None, :] + 2 * k)
    return gamma(d) * (ax @ aw.T) + flush


def _problem(m, n, k, bs, qt, dq, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    packed, state = quantize_4bit(w, bs, qt, double_quant=dq)
    absmax, nested_absmax, nested_code, offset, rest = _quant_args(state)
    quant = (packed, absmax, nested_absmax, nested_code, offset, *rest)
    wq = dequantize_4bit(packed, state, torch.bfloat16).double()  # W exactly as decoded to bf16
    x = (torch.randn(m, k, generator=g) * scale).bfloat16()
    return quant, wq, x


# (M, N, K, blocksize, quant_type, double_quant): M over the 4-row micro-tile's tails
# (9, 16, 17, 33, 64) and several passes of 128 rows (300); N off the 4-row W tiles; K an odd multiple of the blocksize, K past
# one 2048-element reduction chunk, K not a multiple of 32 (blocks spanning rows, rows
# starting mid-byte: the element-wise decode), blocksize 32 and 4096 > K.
CASES = [
    (9, 1000, 768, 64, "nf4", True),
    (16, 1001, 768, 256, "fp4", False),
    (17, 130, 384, 128, "nf4", False),
    (33, 63, 2304, 64, "fp4", True),
    (64, 45, 4160, 128, "nf4", True),
    (16, 37, 95, 64, "nf4", True),
    (33, 50, 100, 32, "fp4", False),
    (9, 40, 576, 4096, "nf4", False),
    (300, 21, 160, 64, "nf4", True),  # three passes of x's rows (kDpRowsPerPass = 128)
]


def _id(c):
    m, n, k, bs, qt, dq = c
    return f"{m}x{n}x{k}-bs{bs}-{qt}{'-dq' if dq else ''}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward_within_bound(case):
    m, n, k, bs, qt, dq = case
    quant, wq, x = _problem(m, n, k, bs, qt, dq)
    y = dpbf16.qgemm_4bit(x, quant)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert_within(y, x.double() @ wq.T, dp_bound(x.double(), wq), "forward")


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(0, 70),
    n=st.integers(1, 23),
    k=st.one_of(st.integers(1, 300), st.sampled_from([32, 64, 96, 2048, 2080])),
    bs=st.sampled_from([32, 64, 128, 256]),
    qt=st.sampled_from(["nf4", "fp4"]),
    dq=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_forward_within_bound_any_shape(m, n, k, bs, qt, dq, seed):
    quant, wq, x = _problem(m, n, k, bs, qt, dq, seed=seed)
    y = dpbf16.qgemm_4bit(x, quant, num_threads=2)
    assert y.shape == (m, n)
    assert_within(y, x.double() @ wq.T, dp_bound(x.double(), wq), "forward")


def test_threads_and_strides_do_not_change_results():
    # each output is one task's sum in a fixed order: threads only split W's row tiles;
    # a non-contiguous x is made contiguous first (the same values)
    # 203 x 1024: 3 tasks of ~64K weights at least (qgemm_dpbf16.cpp caps tasks by work)
    quant, wq, x = _problem(21, 203, 1024, 64, "nf4", True, seed=1)
    y1 = dpbf16.qgemm_4bit(x, quant, num_threads=1)
    assert torch.equal(dpbf16.qgemm_4bit(x, quant, num_threads=3), y1)
    xt = x.t().contiguous().t()  # column-major view
    assert not xt.is_contiguous()
    assert torch.equal(dpbf16.qgemm_4bit(xt, quant), y1)
    xs = torch.zeros(21, 2048, dtype=torch.bfloat16)[:, ::2]
    xs.copy_(x)
    assert torch.equal(dpbf16.qgemm_4bit(xs, quant), y1)
    assert_within(y1, x.double() @ wq.T, dp_bound(x.double(), wq), "forward")


def test_decode_is_exact():
    # one-hot rows of x pick W's columns: each output is one exact product 1 * w, so the
    # kernel's W equals dequantize_4bit to bf16 bit for bit (normal values: vdpbf16ps reads
    # a subnormal bf16 as zero). Both decode paths, plain and nested, a partial last block.
    for n, k, bs, qt, dq in [
        (37, 95, 64, "nf4", True),
        (13, 128, 32, "fp4", False),
        (9, 192, 64, "nf4", True),
    ]:
        quant, wq, _ = _problem(1, n, k, bs, qt, dq, seed=2)
        eye = torch.eye(k, dtype=torch.bfloat16)
        assert torch.equal(dpbf16.qgemm_4bit(eye, quant).double(), wq.T)


def test_tiny_values_within_the_flush_bound():
    # x near fp32's smallest normal number: many bf16 inputs and fp32 partial sums are
    # subnormal and vdpbf16ps flushes them; the absolute term of the bound covers it
    quant, wq, x = _problem(20, 48, 256, 64, "nf4", False, seed=3, scale=2.0**-125)
    assert bool((x.abs() < TINY32).any())  # subnormal inputs present
    y = dpbf16.qgemm_4bit(x, quant)
    assert_within(y, x.double() @ wq.T, dp_bound(x.double(), wq), "forward tiny")


def test_nonfinite_absmax_propagates():
    g = torch.Generator().manual_seed(4)
    packed, state = quantize_4bit(torch.randn(40, 128, generator=g), 64, "nf4", double_quant=False)
    state.absmax[3], state.absmax[17] = float("inf"), float("nan")
    absmax, nested_absmax, nested_code, offset, rest = _quant_args(state)
    quant = (packed, absmax, nested_absmax, nested_code, offset, *rest)
    wq = dequantize_4bit(packed, state, torch.bfloat16).double()  # the reference's W
    x = torch.randn(18, 128, generator=g).bfloat16()
    want = x.double() @ wq.T
    y = dpbf16.qgemm_4bit(x, quant).double()
    assert bool(torch.isnan(want).any())
    assert torch.equal(torch.isnan(y), torch.isnan(want))
    assert torch.equal(torch.isinf(y), torch.isinf(want))
    fin = torch.isfinite(want)
    tol = dp_bound(x.double(), wq.nan_to_num(0.0, 0.0, 0.0))
    assert_within(y[fin], want[fin], tol[fin], "finite y")


def test_empty_and_zero_reduction():
    quant, _, x = _problem(3, 40, 64, 64, "nf4", True)
    assert dpbf16.qgemm_4bit(x[:0], quant).shape == (0, 40)
    q0 = (torch.zeros(0, 1, dtype=torch.uint8), torch.zeros(0), None, None, None, 64, 256, "nf4", 5, 0)
    assert torch.equal(dpbf16.qgemm_4bit(torch.zeros(4, 0, dtype=torch.bfloat16), q0), torch.zeros(4, 5))


# --- the CPU QLoRA layer with the kernel -----------------------------------------------------

LAYER_CASES = [
    # (dtype, M, N, K, r, quant_type, double_quant, blocksize, bias, rank_scale, out_scale)
    (torch.bfloat16, 9, 45, 96, 8, "nf4", True, 64, True, True, True),
    (torch.bfloat16, 33, 70, 256, 16, "fp4", False, 128, False, True, False),
    (torch.bfloat16, 64, 61, 192, 4, "nf4", True, 32, True, False, True),
]


@pytest.fixture
def dp_calls(monkeypatch):
    monkeypatch.setenv(capability.COMPUTE_ENV, "bf16")
    calls = []
    real = dpbf16.qgemm_4bit

    def spy(x, quant, **kw):
        calls.append(x.shape[0])
        return real(x, quant, **kw)

    monkeypatch.setattr(dpbf16, "qgemm_4bit", spy)
    return calls


@pytest.fixture
def isa():
    c = _native.cpu_module()
    prev = c.set_isa("avx512_bf16")
    yield c
    c.set_isa(prev)


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: f"{c[1]}x{c[2]}x{c[3]}")
def test_qlora_layer_kernel_and_panels_within_bounds(case, dp_calls, isa, monkeypatch):
    p = make_problem(case)
    assert dpbf16._usable() and dpbf16.active()
    check_qlora_linear(p, "cpu")  # the avx512_bf16 level: qpeft's kernel for x @ W^T
    assert dp_calls == [case[1]]
    monkeypatch.setattr(dpbf16, "MAX_ROWS", 0)  # oneDNN's panels at the same level
    check_qlora_linear(p, "cpu")
    assert dp_calls == [case[1]]


def test_layer_paths_by_rows_and_shape(dp_calls, isa):
    # M <= 8: the GEMV; M > MAX_ROWS or K off 32: the panels; the amx level: not this kernel
    for m, k, want in [
        (8, 64, False),
        (9, 64, True),
        (dpbf16.MAX_ROWS, 64, True),
        (dpbf16.MAX_ROWS + 1, 64, False),
        (16, 80, False),
    ]:
        p = make_problem((torch.bfloat16, m, 24, k, 4, "nf4", True, 64, False, False, False))
        dp_calls.clear()
        check_qlora_linear(p, "cpu")
        assert (len(dp_calls) == 1) == want, (m, k)
    if _INFO["detected_level"] == "amx":
        isa.set_isa("amx")
        assert not dpbf16.active()


def test_linear4bit_forward_matches_kernel(dp_calls, isa):
    torch.manual_seed(1)
    layer = qpeft.nn.Linear4bit.from_linear(torch.nn.Linear(128, 48, bias=False))
    x = torch.randn(20, 128).bfloat16()
    with qpeft.use_backend("cpu"), torch.no_grad():
        y = layer(x)
    assert dp_calls == [20] and y.dtype == torch.bfloat16
    absmax, nested_absmax, nested_code, offset, rest = _quant_args(layer.quant_state)
    quant = (layer.weight.packed, absmax, nested_absmax, nested_code, offset, *rest)
    assert torch.equal(y, dpbf16.qgemm_4bit(x, quant).bfloat16())  # fp32 sums, one rounding


# --- errors -------------------------------------------------------------------------------------


def test_python_argument_errors():
    quant, _, x = _problem(4, 40, 64, 64, "nf4", True)
    with pytest.raises(TypeError, match="x must be torch.bfloat16"):
        dpbf16.qgemm_4bit(x.float(), quant)
    with pytest.raises(ValueError, match="x must have k = 64 columns"):
        dpbf16.qgemm_4bit(x[:, :32], quant)
    with pytest.raises(ValueError, match="2-D"):
        dpbf16.qgemm_4bit(x.reshape(2, 2, 64), quant)
    with pytest.raises(TypeError, match="x must be a tensor"):
        dpbf16.qgemm_4bit(x.tolist(), quant)
    with pytest.raises(TypeError, match="absmax must be torch.uint8"):
        dpbf16.qgemm_4bit(x, (quant[0], quant[1].float(), *quant[2:]))
    with pytest.raises(ValueError, match="nested_code must hold 256"):
        dpbf16.qgemm_4bit(x, (*quant[:3], quant[3][:10], *quant[4:]))
    with pytest.raises(ValueError, match="quant_type"):
        dpbf16.qgemm_4bit(x, (*quant[:7], "int4", *quant[8:]))


def test_native_size_checks():
    # the C++ entry re-checks every size before touching memory (a direct call with
    # inconsistent lengths: an error, never an out-of-bounds read)
    quant, _, x = _problem(4, 40, 64, 64, "nf4", False)
    packed, absmax = quant[0], quant[1]
    out = torch.empty(4, 40)
    c = _native.cpu_module()

    def call(**kw):
        args = dict(
            x=x.data_ptr(), x_len=x.numel(), m=4, n=40, k=64, packed=packed.data_ptr(),
            packed_len=packed.numel(), absmax=absmax.data_ptr(), absmax_len=absmax.numel(),
            blocksize=64, quant_type=2, nested_absmax=0, nested_absmax_len=0, nested_code=0,
            offset=0, nested_blocksize=0, out=out.data_ptr(), out_len=out.numel(), num_threads=1,
        )  # fmt: skip
        args.update(kw)
        c.qgemm_4bit_dpbf16(**args)

    call()
    for kw, msg in [
        ({"x_len": 255}, "x holds 255"),
        ({"packed_len": 1279}, "packed holds 1279"),
        ({"absmax_len": 39}, "absmax holds 39"),
        ({"out_len": 159}, "out holds 159"),
        ({"blocksize": 0}, "blocksize must be an even number"),
        ({"blocksize": 63}, "blocksize must be an even number"),
        ({"quant_type": 3}, "quant_type"),
        ({"m": -1}, "m must be"),
        ({"n": 2**40, "k": 2**40}, "n"),
        (
            {"nested_absmax": absmax.data_ptr(), "nested_absmax_len": 0, "nested_blocksize": 256},
            "nested_absmax",
        ),
        ({"x": 0}, "x"),
    ]:
        with pytest.raises(ValueError, match=msg):
            call(**kw)


# --- dx = dy @ W (qgemm_4bit_dx) ---------------------------------------------------------------
#
# The bound (``dx_bound``). Each output dx[i, c] = sum_n dy[i, n] W[n, c] is one lane of an
# accumulator: per chunk of kDpDxRedRows = 128 rows of W (pairs of rows, interleaved) the
# lane starts at zero and each vdpbf16ps adds the pair's 2 products, 2 roundings; the chunk's
# sum is then stored (first chunk) or added to dx (one rounding). A product therefore passes
# through at most d = min(n + n % 2, 128) + ceil(n / 128) roundings, and
#     |dx - dy W| <= gamma(d) sum_n |dy_n| |w_n| + 2^-126 (sum_n |dy_n| + sum_n |w_n| + 2 n)
# with the flush term of the forward's (DAZ inputs, FTZ products and partial sums).

DX_RED_ROWS = 128


def dx_bound(dy: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The bound above on |qgemm_4bit_dpbf16_dx(dy) - dy @ w| (dy [M, n], w [n, k] fp64)."""
    n = dy.shape[1]
    d = min(n + n % 2, DX_RED_ROWS) + math.ceil(n / DX_RED_ROWS)
    ady, aw = dy.abs(), w.abs()
    flush = TINY32 * (ady.sum(1, keepdim=True) + aw.sum(0)[None, :] + 2 * n)
    return gamma(d) * (ady @ aw) + flush


def _dy(m, n, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed + 1000)
    return (torch.randn(m, n, generator=g) * scale).bfloat16()


# (M, N, K, blocksize, quant_type, double_quant): M at the layer's range edges (1, 8, 9, 128)
# and past one pass (300); N odd (the last pair half zero, dy's element past the row unread),
# N past one 128-row chunk and not a multiple of it; K a partial 128-column strip and a
# partial 64-column sub-strip, K off 32 (the element-wise decode), blocksize 4096 > K.
DX_CASES = [
    (1, 257, 768, 64, "nf4", True),
    (8, 1001, 384, 256, "fp4", False),
    (9, 1000, 768, 64, "nf4", True),
    (16, 129, 160, 128, "nf4", False),
    (17, 63, 2304, 64, "fp4", True),
    (33, 300, 96, 32, "fp4", False),
    (64, 45, 4160, 128, "nf4", True),
    (128, 130, 224, 64, "nf4", True),
    (16, 37, 95, 64, "nf4", True),
    (33, 50, 100, 32, "fp4", False),
    (9, 40, 576, 4096, "nf4", False),
    (300, 21, 192, 64, "nf4", True),  # three passes of dy's rows (kDpRowsPerPass = 128)
]


@pytest.mark.parametrize("case", DX_CASES, ids=_id)
def test_dx_within_bound(case):
    m, n, k, bs, qt, dq = case
    quant, wq, _ = _problem(1, n, k, bs, qt, dq)
    dy = _dy(m, n, seed=m)
    dx = dpbf16.qgemm_4bit_dx(dy, quant)
    assert dx.dtype == torch.float32 and dx.shape == (m, k)
    assert_within(dx, dy.double() @ wq, dx_bound(dy.double(), wq), "dx")


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(0, 40),
    n=st.integers(1, 300),
    k=st.one_of(st.integers(1, 300), st.sampled_from([32, 64, 96, 128, 192, 256])),
    bs=st.sampled_from([32, 64, 128, 256]),
    qt=st.sampled_from(["nf4", "fp4"]),
    dq=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_dx_within_bound_any_shape(m, n, k, bs, qt, dq, seed):
    quant, wq, _ = _problem(1, n, k, bs, qt, dq, seed=seed)
    dy = _dy(m, n, seed)
    dx = dpbf16.qgemm_4bit_dx(dy, quant, num_threads=2)
    assert dx.shape == (m, k)
    assert_within(dx, dy.double() @ wq, dx_bound(dy.double(), wq), "dx")


def test_dx_decode_is_exact():
    # one-hot rows of dy pick W's rows: each output is 1 * w (+ exact zeros), so the kernel's
    # pairs equal dequantize_4bit to bf16 bit for bit, odd n (the half-empty last pair)
    # and both decode paths included
    for n, k, bs, qt, dq in [
        (37, 95, 64, "nf4", True),
        (13, 128, 32, "fp4", False),
        (131, 192, 64, "nf4", True),
    ]:
        quant, wq, _ = _problem(1, n, k, bs, qt, dq, seed=2)
        eye = torch.eye(n, dtype=torch.bfloat16)
        assert torch.equal(dpbf16.qgemm_4bit_dx(eye, quant).double(), wq)


def test_dx_odd_n_does_not_read_past_the_row():
    # odd n: row i's last pair would be (dy[i, n - 1], dy[i + 1, 0]) in memory; with
    # dy[i + 1, 0] = Inf a read of it would make row i's dx NaN (Inf * the zero row)
    quant, wq, _ = _problem(1, 33, 64, 64, "nf4", False, seed=5)
    dy = _dy(6, 33, seed=5)
    dy[1:, 0] = float("inf")  # rows > 0 start with Inf; row i's last pair must not see it
    got = dpbf16.qgemm_4bit_dx(dy, quant)
    want = dy.double() @ wq
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    fin = torch.isfinite(want)
    assert_within(got[fin], want[fin], dx_bound(dy.double().nan_to_num(0.0, 0.0, 0.0), wq)[fin], "dx")
    assert bool(torch.isfinite(got[0]).all())


def test_dx_threads_and_strides_do_not_change_results():
    # threads split dx's 128-column strips; each output's sum order is fixed
    quant, wq, _ = _problem(1, 200, 1000, 64, "nf4", True, seed=1)
    dy = _dy(21, 200, seed=1)
    d1 = dpbf16.qgemm_4bit_dx(dy, quant, num_threads=1)
    assert torch.equal(dpbf16.qgemm_4bit_dx(dy, quant, num_threads=3), d1)
    dyt = dy.t().contiguous().t()
    assert not dyt.is_contiguous()
    assert torch.equal(dpbf16.qgemm_4bit_dx(dyt, quant), d1)
    assert_within(d1, dy.double() @ wq, dx_bound(dy.double(), wq), "dx")


def test_dx_tiny_values_within_the_flush_bound():
    quant, wq, _ = _problem(1, 48, 256, 64, "nf4", False, seed=3)
    dy = _dy(20, 48, seed=3, scale=2.0**-125)
    assert bool((dy.abs() < TINY32).any())
    dx = dpbf16.qgemm_4bit_dx(dy, quant)
    assert_within(dx, dy.double() @ wq, dx_bound(dy.double(), wq), "dx tiny")


def test_dx_nonfinite_absmax_propagates():
    g = torch.Generator().manual_seed(4)
    packed, state = quantize_4bit(torch.randn(40, 128, generator=g), 64, "nf4", double_quant=False)
    state.absmax[3], state.absmax[17] = float("inf"), float("nan")
    absmax, nested_absmax, nested_code, offset, rest = _quant_args(state)
    quant = (packed, absmax, nested_absmax, nested_code, offset, *rest)
    wq = dequantize_4bit(packed, state, torch.bfloat16).double()
    dy = torch.randn(18, 40, generator=g).bfloat16()
    want = dy.double() @ wq
    got = dpbf16.qgemm_4bit_dx(dy, quant).double()
    assert bool(torch.isnan(want).any())
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    tol = dx_bound(dy.double(), wq.nan_to_num(0.0, 0.0, 0.0))
    assert_within(got[fin], want[fin], tol[fin], "finite dx")


def test_dx_empty_and_zero_reduction():
    quant, _, _ = _problem(1, 40, 64, 64, "nf4", True)
    assert dpbf16.qgemm_4bit_dx(torch.zeros(0, 40, dtype=torch.bfloat16), quant).shape == (0, 64)
    q0 = (torch.zeros(0, 1, dtype=torch.uint8), torch.zeros(0), None, None, None, 64, 256, "nf4", 0, 5)
    assert torch.equal(dpbf16.qgemm_4bit_dx(torch.zeros(4, 0, dtype=torch.bfloat16), q0), torch.zeros(4, 5))


@pytest.fixture
def dx_calls(monkeypatch):
    calls = []
    real = dpbf16.qgemm_4bit_dx

    def spy(dy, quant, **kw):
        calls.append(dy.shape[0])
        return real(dy, quant, **kw)

    monkeypatch.setattr(dpbf16, "qgemm_4bit_dx", spy)
    return calls


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: f"{c[1]}x{c[2]}x{c[3]}")
def test_qlora_layer_dx_kernel_and_panels_within_bounds(case, dp_calls, dx_calls, isa, monkeypatch):
    p = make_problem(case)
    check_qlora_linear(p, "cpu")  # forward and dx on qpeft's kernels
    assert dx_calls == [case[1]]
    monkeypatch.setattr(dpbf16, "MAX_ROWS", 0)  # oneDNN's panels for both
    check_qlora_linear(p, "cpu")
    assert dx_calls == [case[1]]


def test_layer_dx_paths_by_rows_and_shape(dp_calls, dx_calls, isa):
    # dx takes the kernel for M <= MAX_ROWS and K a multiple of 32, else the panels; the
    # amx level takes the AMX kernel
    for m, k, want in [
        (1, 64, True),
        (9, 64, True),
        (dpbf16.MAX_ROWS, 64, True),
        (dpbf16.MAX_ROWS + 1, 64, False),
        (16, 80, False),
    ]:
        p = make_problem((torch.bfloat16, m, 24, k, 4, "nf4", True, 64, False, False, False))
        dx_calls.clear()
        check_qlora_linear(p, "cpu")
        assert (len(dx_calls) == 1) == want, (m, k)
    if _INFO["detected_level"] == "amx":
        isa.set_isa("amx")
        dx_calls.clear()
        check_qlora_linear(
            make_problem((torch.bfloat16, 16, 24, 64, 4, "nf4", True, 64, False, False, False)), "cpu"
        )
        assert dx_calls == []


def test_dx_python_argument_errors():
    quant, _, _ = _problem(1, 40, 64, 64, "nf4", True)
    dy = _dy(4, 40, seed=0)
    with pytest.raises(TypeError, match="dy must be torch.bfloat16"):
        dpbf16.qgemm_4bit_dx(dy.float(), quant)
    with pytest.raises(ValueError, match="dy must have n = 40 columns"):
        dpbf16.qgemm_4bit_dx(dy[:, :32], quant)
    with pytest.raises(ValueError, match="2-D"):
        dpbf16.qgemm_4bit_dx(dy.reshape(2, 2, 40), quant)
    with pytest.raises(ValueError, match="quant_type"):
        dpbf16.qgemm_4bit_dx(dy, (*quant[:7], "int4", *quant[8:]))


def test_dx_native_size_checks():
    quant, _, _ = _problem(1, 40, 64, 64, "nf4", False)
    packed, absmax = quant[0], quant[1]
    dy = _dy(4, 40, seed=0)
    out = torch.empty(4, 64)
    c = _native.cpu_module()

    def call(**kw):
        args = dict(
            x=dy.data_ptr(), x_len=dy.numel(), m=4, n=40, k=64, packed=packed.data_ptr(),
            packed_len=packed.numel(), absmax=absmax.data_ptr(), absmax_len=absmax.numel(),
            blocksize=64, quant_type=2, nested_absmax=0, nested_absmax_len=0, nested_code=0,
            offset=0, nested_blocksize=0, out=out.data_ptr(), out_len=out.numel(), num_threads=1,
        )  # fmt: skip
        args.update(kw)
        c.qgemm_4bit_dpbf16_dx(**args)

    call()
    for kw, msg in [
        ({"x_len": 159}, "x holds 159"),
        ({"packed_len": 1279}, "packed holds 1279"),
        ({"absmax_len": 39}, "absmax holds 39"),
        ({"out_len": 255}, "out holds 255"),
        ({"blocksize": 63}, "blocksize must be an even number"),
        ({"quant_type": 3}, "quant_type"),
        ({"m": -1}, "m must be"),
        ({"n": 2**40, "k": 2**40}, "n"),
        ({"x": 0}, "x"),
    ]:
        with pytest.raises(ValueError, match=msg):
            call(**kw)
