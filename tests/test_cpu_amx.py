"""The AMX-BF16 GEMM on packed 4-bit W (csrc/cpu/qgemm_amx.cpp, qpeft/backends/cpu/amx.py)
against an fp64 oracle on the exactly decoded W, within the bound derived in
qpeft/testing.py (``amx_gemm_bound``: exact bf16 products, fp32 accumulation, AMX's
subnormal flushes), and the CPU QLoRA layer with it (amx level) against the same layer at
the avx512_bf16 level (``set_isa("avx512_bf16")``: oneDNN's panels, and for the forward at
9 <= M <= 128 qpeft's vdpbf16ps kernel, tests/test_cpu_dpbf16.py), both within the bf16
mode's bounds.

Runs only on a CPU (and OS) with the amx level: AMX-TILE, AMX-BF16 and Linux's tile
permission; elsewhere the tests skip naming what is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import qpeft
from qpeft import _native
from qpeft.backends.cpu import amx, capability
from qpeft.functional import _quant_args, dequantize_4bit, quantize_4bit

from ._bf16_bounds import U_BF16, amx_gemm_bound, gamma
from ._helpers import assert_within, check_qlora_linear, make_problem

try:
    _INFO = qpeft.cpu_info()
except Exception as e:  # no native module: nothing to run
    _INFO = {"detected_level": None, "missing": {"amx": str(e)}}
pytestmark = pytest.mark.skipif(
    _INFO["detected_level"] != "amx",
    reason=f"this CPU lacks the amx level: {_INFO.get('missing', {}).get('amx', '?')}",
)


def _problem(m, n, k, bs, qt, dq, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    packed, state = quantize_4bit(w, bs, qt, double_quant=dq)
    absmax, nested_absmax, nested_code, offset, rest = _quant_args(state)
    quant = (packed, absmax, nested_absmax, nested_code, offset, *rest)
    wq = dequantize_4bit(packed, state, torch.bfloat16).double()  # W exactly as decoded to bf16
    x = (torch.randn(m, k, generator=g) * scale).bfloat16()
    dy = (torch.randn(m, n, generator=g) * scale).bfloat16()
    return quant, wq, x, dy


# (M, N, K, blocksize, quant_type, double_quant): M over the tile and micro-block tails
# (9, 16, 17, 37, 300, 512); N, K off the 16/32 tiles; blocks spanning rows (K %
# blocksize != 0, K < blocksize), rows starting mid-byte (odd K), several column and
# reduction blocks (N > 256 or K > 1024 forward, K > 1024 or N > 256 for dx).
CASES = [
    (9, 1000, 777, 64, "nf4", True),
    (16, 256, 512, 64, "nf4", False),
    (17, 130, 288, 128, "fp4", True),
    (37, 64, 100, 256, "nf4", False),
    (300, 333, 320, 128, "fp4", False),
    (512, 520, 1056, 64, "nf4", True),
    (33, 47, 65, 32, "nf4", True),
    (16, 40, 4096, 4096, "fp4", False),
]


def _id(c):
    m, n, k, bs, qt, dq = c
    return f"{m}x{n}x{k}-bs{bs}-{qt}{'-dq' if dq else ''}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward_and_dx_within_bound(case):
    m, n, k, bs, qt, dq = case
    quant, wq, x, dy = _problem(m, n, k, bs, qt, dq)
    want = x.double() @ wq.T
    y = amx.qgemm_4bit(x, quant)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert_within(y, want, amx_gemm_bound(x.double(), wq.T, torch.float32), "forward fp32")
    yb = amx.qgemm_4bit(x, quant, out_dtype=torch.bfloat16)
    assert_within(yb, want, amx_gemm_bound(x.double(), wq.T, torch.bfloat16), "forward bf16")
    # the bf16 out is the fp32 result rounded once to nearest even
    assert torch.equal(yb, y.bfloat16())
    want_dx = dy.double() @ wq
    dx = amx.qgemm_4bit(dy, quant, dx=True)
    assert dx.shape == (m, k)
    assert_within(dx, want_dx, amx_gemm_bound(dy.double(), wq, torch.float32), "dx fp32")
    acc = torch.randn(m, k)
    got = amx.qgemm_4bit(dy, quant, dx=True, out=acc.clone(), accumulate=True)
    assert torch.equal(got, acc + dx)  # out += result: one fp32 add per element


@pytest.mark.parametrize("blocks", [(32, 32), (64, 96), (8192, 8192)])
def test_blocking_does_not_change_results(blocks):
    # each output element is one task's fp32 sum over the reduction in tile order: the
    # panel sizes and the thread count change which panels exist, not the sum's order
    quant, wq, x, dy = _problem(40, 200, 320, 64, "nf4", True, seed=1)
    y0 = amx.qgemm_4bit(x, quant, num_threads=1)
    y = amx.qgemm_4bit(x, quant, col_block=blocks[0], red_block=blocks[1], num_threads=2)
    dx0 = amx.qgemm_4bit(dy, quant, dx=True, num_threads=1)
    dx = amx.qgemm_4bit(dy, quant, dx=True, col_block=blocks[0], red_block=blocks[1], num_threads=2)
    assert torch.equal(y, y0) and torch.equal(dx, dx0)
    assert_within(y, x.double() @ wq.T, amx_gemm_bound(x.double(), wq.T, torch.float32), "forward")


@pytest.mark.parametrize("threading", ["pool", "openmp"])
def test_pool_and_openmp_threads_run_tiles(threading):
    # each task loads its tile configuration and releases the tiles in whichever thread
    # runs it: qpeft's own pool threads and torch's OpenMP workers, interleaved with
    # oneDNN's own AMX GEMMs on the same threads, give the one-thread result
    c = _native.cpu_module()
    if threading == "openmp":
        try:
            c.set_threading("openmp")
        except ValueError as e:
            pytest.skip(str(e))
    else:
        c.set_threading("pool")
    try:
        quant, _, x, dy = _problem(64, 600, 256, 64, "nf4", True, seed=5)
        y1 = amx.qgemm_4bit(x, quant, num_threads=1)
        dx1 = amx.qgemm_4bit(dy, quant, dx=True, num_threads=1)
        for _ in range(3):
            torch.mm(x, torch.randn(256, 64).bfloat16())  # oneDNN's tiles in between
            assert torch.equal(amx.qgemm_4bit(x, quant, col_block=32, num_threads=2), y1)
            assert torch.equal(amx.qgemm_4bit(dy, quant, dx=True, col_block=32, num_threads=2), dx1)
    finally:
        c.set_threading("auto")


def test_decode_is_exact():
    # one-hot rows of x pick W's columns: each output is one exact product 1 * w, so the
    # kernel's W equals dequantize_4bit to bf16 bit for bit (normal values: AMX would read
    # a subnormal bf16 as zero). Odd K, blocks spanning rows, a partial last block.
    n, k = 37, 95
    for qt, dq, bs in [("nf4", True, 64), ("fp4", False, 32)]:
        quant, wq, _, _ = _problem(1, n, k, bs, qt, dq, seed=2)
        eye_k, eye_n = torch.eye(k, dtype=torch.bfloat16), torch.eye(n, dtype=torch.bfloat16)
        assert torch.equal(amx.qgemm_4bit(eye_k, quant).double(), wq.T)
        assert torch.equal(amx.qgemm_4bit(eye_n, quant, dx=True).double(), wq)


def test_tiny_values_within_the_flush_bound():
    # x near fp32's smallest normal number: many bf16 inputs and fp32 partial sums are
    # subnormal and AMX flushes them; the absolute term of the bound covers it
    quant, wq, x, dy = _problem(20, 48, 256, 64, "nf4", False, seed=3, scale=2.0**-125)
    assert bool((x.abs() < 2.0**-126).any())  # subnormal inputs present
    want = x.double() @ wq.T
    y = amx.qgemm_4bit(x, quant)
    assert_within(y, want, amx_gemm_bound(x.double(), wq.T, torch.float32), "forward tiny")
    dx = amx.qgemm_4bit(dy, quant, dx=True)
    assert_within(dx, dy.double() @ wq, amx_gemm_bound(dy.double(), wq, torch.float32), "dx tiny")


def test_nonfinite_absmax_propagates():
    g = torch.Generator().manual_seed(4)
    packed, state = quantize_4bit(torch.randn(40, 128, generator=g), 64, "nf4", double_quant=False)
    state.absmax[3], state.absmax[17] = float("inf"), float("nan")
    absmax, nested_absmax, nested_code, offset, rest = _quant_args(state)
    quant = (packed, absmax, nested_absmax, nested_code, offset, *rest)
    wq = dequantize_4bit(packed, state, torch.bfloat16).double()  # the reference's W
    x = torch.randn(18, 128, generator=g).bfloat16()
    want = x.double() @ wq.T
    y = amx.qgemm_4bit(x, quant).double()
    assert bool(torch.isnan(want).any())  # (an inf block holds code 0.0: 0 * inf, NaN rows)
    assert torch.equal(torch.isnan(y), torch.isnan(want))
    assert torch.equal(torch.isinf(y), torch.isinf(want))
    fin = torch.isfinite(want)
    tol = amx_gemm_bound(x.double(), wq.nan_to_num(0.0, 0.0, 0.0).T, torch.float32)
    assert_within(y[fin], want[fin], tol[fin], "finite y")


def test_empty_and_zero_reduction():
    quant, _, x, dy = _problem(3, 40, 64, 64, "nf4", True)
    assert amx.qgemm_4bit(x[:0], quant).shape == (0, 40)
    assert amx.qgemm_4bit(dy[:0], quant, dx=True).shape == (0, 64)
    # K = 0: an empty sum is zero
    q0 = (torch.zeros(0, 1, dtype=torch.uint8), torch.zeros(0), None, None, None, 64, 256, "nf4", 5, 0)
    assert torch.equal(amx.qgemm_4bit(torch.zeros(4, 0, dtype=torch.bfloat16), q0), torch.zeros(4, 5))
    assert amx.qgemm_4bit(torch.zeros(4, 5, dtype=torch.bfloat16), q0, dx=True).shape == (4, 0)


# --- the rank-r epilogue (lora = (l, r)) ---------------------------------------------------------

# (M, N, K, rank, blocksize, quant_type, double_quant): M = 1, M off the 8-row epilogue
# groups and the 16-row tiles, N and K off the 16-column lanes, ranks 1, 16, 17, 33.
EPILOGUE_CASES = [
    (1, 40, 64, 1, 64, "nf4", True),
    (9, 1000, 777, 16, 64, "nf4", True),
    (17, 130, 288, 5, 128, "fp4", False),
    (300, 333, 320, 17, 128, "fp4", False),
    (37, 47, 65, 33, 32, "nf4", True),
]


def _lora_bound(plain: torch.Tensor, lr: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
    # result = plain + sum_q l_q r_q: the rank-r sum in fp32 (r roundings on its path: a
    # product, then r - 1 FMAs) and one fp32 add to the kernel's own fp32 result `plain`
    # (one rounding): gamma_{r+1} of the sum of the magnitudes
    r = lr.shape[1]
    return gamma(r + 1) * (plain.double().abs() + lr.double().abs() @ rr.double().abs())


@pytest.mark.parametrize("case", EPILOGUE_CASES, ids=lambda c: "x".join(map(str, c[:4])))
@pytest.mark.parametrize("dx", [False, True], ids=["fwd", "dx"])
def test_lora_epilogue_within_bound(case, dx):
    m, n, k, rank, bs, qt, dq = case
    quant, _, x, dy = _problem(m, n, k, bs, qt, dq, seed=6)
    a, cols = (dy, k) if dx else (x, n)
    g = torch.Generator().manual_seed(7)
    lr, rr = torch.randn(m, rank, generator=g), torch.randn(rank, cols, generator=g) * 0.1
    plain = amx.qgemm_4bit(a, quant, dx=dx)
    y = amx.qgemm_4bit(a, quant, dx=dx, lora=(lr, rr))
    assert y.dtype == torch.float32 and y.shape == (m, cols)
    want = plain.double() + lr.double() @ rr.double()
    assert_within(y, want, _lora_bound(plain, lr, rr), "epilogue fp32")
    # a bf16 out is the fp32 result rounded once; accumulate adds it to out with one add
    yb = amx.qgemm_4bit(a, quant, dx=dx, lora=(lr, rr), out_dtype=torch.bfloat16)
    assert torch.equal(yb, y.bfloat16())
    acc = torch.randn(m, cols, generator=g)
    got = amx.qgemm_4bit(a, quant, dx=dx, lora=(lr, rr), out=acc.clone(), accumulate=True)
    assert torch.equal(got, acc + y)
    # threads and blocking split the columns, never a sum: the same bits
    y2 = amx.qgemm_4bit(a, quant, dx=dx, lora=(lr, rr), col_block=32, red_block=64, num_threads=2)
    assert torch.equal(y2, y)


def test_lora_epilogue_on_an_empty_reduction():
    # K = 0 (forward) / N = 0 (dx): the GEMM's sum is empty, the result is the LoRA term
    g = torch.Generator().manual_seed(8)
    lr, rr = torch.randn(4, 3, generator=g), torch.randn(3, 5, generator=g)
    q0 = (torch.zeros(0, 1, dtype=torch.uint8), torch.zeros(0), None, None, None, 64, 256, "nf4", 5, 0)
    y = amx.qgemm_4bit(torch.zeros(4, 0, dtype=torch.bfloat16), q0, lora=(lr, rr))
    assert_within(y, lr.double() @ rr.double(), _lora_bound(torch.zeros(4, 5), lr, rr), "empty fwd")
    yb = amx.qgemm_4bit(torch.zeros(4, 0, dtype=torch.bfloat16), q0, lora=(lr, rr), out_dtype=torch.bfloat16)
    assert torch.equal(yb, y.bfloat16())
    q1 = (torch.zeros(0, 1, dtype=torch.uint8), torch.zeros(0), None, None, None, 64, 256, "nf4", 0, 5)
    acc = torch.randn(4, 5, generator=g)
    got = amx.qgemm_4bit(
        torch.zeros(4, 0, dtype=torch.bfloat16), q1, dx=True, lora=(lr, rr), out=acc.clone(), accumulate=True
    )
    assert torch.equal(got, acc + y)


def test_lora_epilogue_argument_errors():
    quant, _, x, _ = _problem(4, 40, 64, 64, "nf4", True)
    lr, rr = torch.zeros(4, 2), torch.zeros(2, 40)
    with pytest.raises(TypeError, match="lora l must be torch.float32"):
        amx.qgemm_4bit(x, quant, lora=(lr.bfloat16(), rr))
    with pytest.raises(ValueError, match="lora r must be contiguous"):
        amx.qgemm_4bit(x, quant, lora=(lr, torch.zeros(40, 2).t()))
    with pytest.raises(ValueError, match=r"lora must be l \[4, rank\] and r \[rank, 40\]"):
        amx.qgemm_4bit(x, quant, lora=(lr, torch.zeros(3, 40)))
    with pytest.raises(ValueError, match=r"r \[rank, 64\]"):
        amx.qgemm_4bit(torch.zeros(4, 40, dtype=torch.bfloat16), quant, dx=True, lora=(lr, rr))


# --- the LoRA weight gradients' products (amx.lora_grad) ------------------------------------


@pytest.mark.parametrize(
    ("m", "c", "r"), [(1, 40, 1), (9, 1000, 16), (512, 333, 17), (37, 16, 33), (70, 4097, 5)]
)
def test_lora_grad_within_bound(m, c, r):
    # lt^T @ x: exact fp32 products of bf16 values, an fp32 sum over the m rows (m
    # roundings on a term's path: gamma_m), no flushes (FMAs, not tiles)
    g = torch.Generator().manual_seed(9)
    lt = torch.randn(m, r, generator=g).bfloat16().float()
    x = torch.randn(m, c, generator=g).bfloat16()
    want = lt.double().t() @ x.double()
    out = amx.lora_grad(lt, x)
    assert out.shape == (r, c) and out.dtype == torch.float32
    assert_within(out, want, gamma(m) * (lt.double().abs().t() @ x.double().abs()), "lt^T x")
    # the transposed store holds the same bits; threads split columns, never a sum
    assert torch.equal(amx.lora_grad(lt, x, transpose=True), out.t())
    assert torch.equal(amx.lora_grad(lt, x, num_threads=1), amx.lora_grad(lt, x, num_threads=2))


def test_lora_grad_edges_and_errors():
    x = torch.randn(5, 20).bfloat16()
    assert torch.equal(amx.lora_grad(torch.zeros(0, 3), x[:0]), torch.zeros(3, 20))  # empty sum
    assert amx.lora_grad(torch.zeros(5, 0), x).shape == (0, 20)
    assert amx.lora_grad(torch.zeros(5, 3), x[:, :0], transpose=True).shape == (0, 3)
    with pytest.raises(TypeError, match="l must be torch.float32"):
        amx.lora_grad(torch.zeros(5, 3).bfloat16(), x)
    with pytest.raises(TypeError, match="x must be torch.bfloat16"):
        amx.lora_grad(torch.zeros(5, 3), x.float())
    with pytest.raises(ValueError, match="the same rows"):
        amx.lora_grad(torch.zeros(4, 3), x)
    with pytest.raises(ValueError, match="contiguous"):
        amx.lora_grad(torch.zeros(3, 5).t(), x)
    c = _native.cpu_module()
    out = torch.empty(3, 20)
    with pytest.raises(ValueError, match="out holds 59"):
        c.lora_grad_amx(8, 15, 3, x.data_ptr(), 100, 5, 20, out.data_ptr(), 59, False, 1)
    with pytest.raises(ValueError, match="l holds 14"):
        c.lora_grad_amx(8, 14, 3, x.data_ptr(), 100, 5, 20, out.data_ptr(), 60, False, 1)


# --- the CPU QLoRA layer with the AMX kernel ------------------------------------------------

LAYER_CASES = [
    # (dtype, M, N, K, r, quant_type, double_quant, blocksize, bias, rank_scale, out_scale)
    (torch.bfloat16, 9, 45, 83, 8, "nf4", True, 64, True, True, True),
    (torch.bfloat16, 64, 70, 96, 16, "nf4", True, 32, True, False, True),
    (torch.bfloat16, 300, 260, 1090, 4, "fp4", False, 64, False, True, False),
    (torch.float32, 20, 17, 150, 8, "fp4", True, 32, False, True, True),
]


@pytest.fixture
def amx_calls(monkeypatch):
    monkeypatch.setenv(capability.COMPUTE_ENV, "bf16")
    calls = {"fwd": 0, "dx": 0}
    real = amx.qgemm_4bit

    def spy(a, quant, **kw):
        calls["dx" if kw.get("dx") else "fwd"] += 1
        return real(a, quant, **kw)

    monkeypatch.setattr(amx, "qgemm_4bit", spy)
    return calls


@pytest.fixture
def isa():
    c = _native.cpu_module()
    prev = c.set_isa("amx")
    yield c
    c.set_isa(prev)


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: f"{str(c[0])[6:]}-{c[1]}x{c[2]}x{c[3]}")
def test_qlora_layer_amx_and_onednn_within_bounds(case, amx_calls, isa):
    p = make_problem(case)
    assert amx.active()
    check_qlora_linear(p, "cpu")  # the amx level: qpeft's kernel
    assert amx_calls == {"fwd": 1, "dx": 1}
    isa.set_isa("avx512_bf16")  # oneDNN's panels (forward M <= 128: vdpbf16ps), the same bounds
    assert not amx.active()
    check_qlora_linear(p, "cpu")
    assert amx_calls == {"fwd": 1, "dx": 1}


def test_linear4bit_forward_on_amx(amx_calls, isa):
    torch.manual_seed(0)
    layer = qpeft.nn.Linear4bit.from_linear(torch.nn.Linear(200, 72))
    x = torch.randn(3, 11, 200).bfloat16()
    with qpeft.use_backend("cpu"):
        y = layer(x)
    assert amx_calls["fwd"] == 1 and y.shape == (3, 11, 72) and y.dtype == torch.bfloat16
    # W as the kernel multiplies it: decoded to bf16 (one rounding of the exact fp32 decode)
    x2, w, bias = x.reshape(33, 200).double(), layer.dequantize(torch.bfloat16).double(), layer.bias.double()
    want = x2 @ w.T + bias
    # the kernel's fp32 x @ W^T, one fp32 add of the bias, one rounding to bf16
    err = amx_gemm_bound(x2, w.T, torch.float32) + gamma(1) * (x2.abs() @ w.abs().T + bias.abs())
    assert_within(y.reshape(33, 72), want, err * (1 + U_BF16) + U_BF16 * want.abs(), "Linear4bit y")


def test_linear4bit_without_bias_rounds_in_the_kernel(amx_calls, isa):
    # nothing to add to x @ W^T: the kernel writes bf16 itself, the fp32 sums rounded once
    torch.manual_seed(1)
    layer = qpeft.nn.Linear4bit.from_linear(torch.nn.Linear(128, 48, bias=False))
    x = torch.randn(20, 128).bfloat16()
    with qpeft.use_backend("cpu"), torch.no_grad():
        y = layer(x)
    assert amx_calls["fwd"] == 1 and y.dtype == torch.bfloat16
    absmax, nested_absmax, nested_code, offset, rest = _quant_args(layer.quant_state)
    quant = (layer.weight.packed, absmax, nested_absmax, nested_code, offset, *rest)
    assert torch.equal(y, amx.qgemm_4bit(x, quant).bfloat16())


def test_qlora_layer_with_tiny_activations(amx_calls, isa):
    # x near fp32's smallest normal number: the layer's outputs (AMX and oneDNN products)
    # stay inside bf16_oracle's bounds through their flush terms
    case = (torch.bfloat16, 24, 40, 64, 4, "nf4", False, 64, False, False, False)
    p = make_problem(case)
    p["x"] = (p["x"].double() * 2.0**-127).bfloat16()  # mostly subnormal in bf16
    check_qlora_linear(p, "cpu")
    assert amx_calls == {"fwd": 1, "dx": 1}


# --- errors -------------------------------------------------------------------------------------


def test_python_argument_errors():
    quant, _, x, dy = _problem(4, 40, 64, 64, "nf4", True)
    with pytest.raises(TypeError, match="a must be torch.bfloat16"):
        amx.qgemm_4bit(x.float(), quant)
    with pytest.raises(ValueError, match="a must have 64 columns"):
        amx.qgemm_4bit(dy, quant)
    with pytest.raises(ValueError, match="a must have 40 columns"):
        amx.qgemm_4bit(x, quant, dx=True)
    with pytest.raises(ValueError, match="contiguous"):
        amx.qgemm_4bit(torch.zeros(64, 4, dtype=torch.bfloat16).t(), quant)
    with pytest.raises(ValueError, match="2-D"):
        amx.qgemm_4bit(x.reshape(2, 2, 64), quant)
    with pytest.raises(ValueError, match="out must have shape"):
        amx.qgemm_4bit(x, quant, out=torch.empty(4, 41))
    with pytest.raises(TypeError, match="out must be float32 or bfloat16"):
        amx.qgemm_4bit(x, quant, out=torch.empty(4, 40, dtype=torch.float16))
    with pytest.raises(ValueError, match="accumulate needs an out"):
        amx.qgemm_4bit(x, quant, accumulate=True)
    with pytest.raises(ValueError, match="accumulate needs a float32 out"):
        amx.qgemm_4bit(x, quant, out=torch.empty(4, 40, dtype=torch.bfloat16), accumulate=True)
    with pytest.raises(TypeError, match="absmax must be torch.uint8"):
        amx.qgemm_4bit(x, (quant[0], quant[1].float(), *quant[2:]))
    with pytest.raises(ValueError, match="quant_type"):
        amx.qgemm_4bit(x, (*quant[:7], "int4", *quant[8:]))
    with pytest.raises(ValueError, match="col_block must be 0"):
        amx.qgemm_4bit(x, quant, col_block=48)
    with pytest.raises(ValueError, match="red_block must be 0"):
        amx.qgemm_4bit(x, quant, red_block=16)


def test_native_size_checks():
    # the C++ entry re-checks every size before touching memory (a direct call with
    # inconsistent lengths: an error, never an out-of-bounds read)
    quant, _, x, _ = _problem(4, 40, 64, 64, "nf4", False)
    packed, absmax = quant[0], quant[1]
    out = torch.empty(4, 40)
    c = _native.cpu_module()

    def call(**kw):
        args = dict(
            a=x.data_ptr(), a_len=x.numel(), m=4, n=40, k=64, packed=packed.data_ptr(),
            packed_len=packed.numel(), absmax=absmax.data_ptr(), absmax_len=absmax.numel(),
            blocksize=64, quant_type=2, nested_absmax=0, nested_absmax_len=0, nested_code=0,
            offset=0, nested_blocksize=0, out=out.data_ptr(), out_len=out.numel(), out_dtype=0,
            accumulate=False, lora_l=0, lora_l_len=0, lora_r=0, lora_r_len=0, rank=0,
            col_block=0, red_block=0, num_threads=1,
        )  # fmt: skip
        args.update(kw)
        c.qgemm_4bit_amx(**args)

    call()
    for kw, msg in [
        ({"a_len": 255}, "a holds 255"),
        ({"packed_len": 1279}, "packed holds 1279"),
        ({"absmax_len": 39}, "absmax holds 39"),
        ({"out_len": 159}, "out holds 159"),
        ({"blocksize": 0}, "blocksize must be > 0"),
        ({"quant_type": 3}, "quant_type"),
        ({"out_dtype": 1}, "out_dtype"),
        ({"m": -1}, "m must be >= 0"),
        ({"nested_absmax": 8, "nested_absmax_len": 0, "nested_blocksize": 256}, "nested_absmax holds 0"),
        ({"k": 1 << 62, "n": 1 << 62}, "overflows"),
        ({"packed": 0}, "packed is a null pointer"),
        ({"rank": -1}, "rank must be >= 0"),
        ({"rank": 2, "lora_l": 8, "lora_l_len": 7, "lora_r": 8, "lora_r_len": 80}, "lora_l holds 7"),
        ({"rank": 2, "lora_l": 8, "lora_l_len": 8, "lora_r": 8, "lora_r_len": 79}, "lora_r holds 79"),
        ({"rank": 2, "lora_l": 0, "lora_l_len": 8, "lora_r": 8, "lora_r_len": 80}, "lora_l is a null"),
    ]:
        with pytest.raises(ValueError, match=msg):
            call(**kw)


def test_level_follows_set_isa(isa):
    assert amx.active()
    isa.set_isa("avx512_bf16")
    assert not amx.active() and qpeft.cpu_info()["chosen_level"] == "avx512_bf16"


def test_amx_ab_benchmark_runs(capsys):
    # the A/B script's smoke run: one tiny shape, both directions
    from benchmarks import amx_ab

    assert amx_ab.main(["--shapes", "48x64", "--m", "16", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "| fwd | 48x64 | 16 |" in out and "| dx | 48x64 | 16 |" in out


def test_isa_cap_keeps_the_onednn_panels():
    # QPEFT_CPU_ISA=avx512_bf16: the bf16 mode stays, off AMX (oneDNN's panels and the
    # vdpbf16ps kernel; A/B runs)
    code = (
        "import qpeft; from qpeft.backends.cpu import amx, capability; import torch; "
        "print(qpeft.cpu_info()['chosen_level'], amx.active(), capability.compute_dtype(torch.bfloat16))"
    )
    env = {**os.environ, "QPEFT_CPU_ISA": "avx512_bf16"}
    env.pop(capability.COMPUTE_ENV, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["avx512_bf16", "False", "torch.bfloat16"], out.stderr
