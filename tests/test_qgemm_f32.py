"""The fused fp32 4-bit GEMM of the avx2 level (csrc/cpu/qgemm_f32_avx2.cpp, wrapper
qpeft/backends/cpu/f32gemm.py) and the CPU QLoRA layer's fp32 path through it.

Bounds (u = 2^-24, per output element), derived from the kernel's arithmetic:
- W is decoded exactly as dequantize_4bit (one fp32 multiply per weight), so the kernel's
  W equals the reference's Wd; with a LoRA term each weight gets r FMAs, q ascending:
  |w' - (Wd + L R)| <= r u (|Wd| + |L| |R|) to first order.
- Each output is a dot product over the reduction (length red) summed by one lane's FMA
  chain per panel of 512 (one rounding per step), the panels' sums added in order (one
  rounding each) and, with ``accumulate``, added to what out held (one more):
  |out - sum x w'| <= (red + ceil(red / 512) + 1) u sum |x| |w'|.
Together, with one u of slack for the second-order terms: tol = (red + ceil(red / 512) +
r + 3) u (|x| @ (|Wd| + |L| |R|) + |out0|). The extra columns (x @ E^T, dy @ E) are
plain dot products: (red + ceil(red / 512) + 2) u |x| @ |E|.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qpeft.functional as qf
from qpeft._formats import QUANT_TYPE_IDS
from qpeft._native import cpu_module
from qpeft.backends.cpu import f32gemm
from qpeft.backends.cpu import qlora as cpu_qlora

from ._helpers import case_id, check_qlora_linear, make_problem

U = 2.0**-24
PANEL = 512  # the kernel's default reduction panel (qgemm_f32.cpp)


def _avx2_missing() -> str | None:
    try:
        info = cpu_module().cpu_info()
    except ImportError as e:
        return f"the CPU module is not built ({e})"
    if "avx2" in info["missing"]:
        return f"this CPU lacks {info['missing']['avx2']}"
    if "avx2" not in info["built_levels"]:
        return "this build has no avx2 kernels"
    return None


pytestmark = pytest.mark.skipif(_avx2_missing() is not None, reason=f"avx2 level: {_avx2_missing()}")


@pytest.fixture(autouse=True)
def _at_avx2():
    """The avx2 level for every test, where the layer takes the kernel (an AVX-512 CPU's
    own level, or a QPEFT_CPU_ISA cap of the run, would move the layer tests onto the
    panel path)."""
    mod = cpu_module()
    prev = mod.set_isa("avx2")
    yield
    mod.set_isa(prev)


def _problem(m, n, k, dx, rank, quant_type="nf4", nested=True, blocksize=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    packed, state = qf.quantize_4bit(w, blocksize, quant_type, nested)
    wd = qf.dequantize_4bit(packed, state, torch.float32)
    x = torch.randn(m, n if dx else k, generator=g)
    lora = (torch.randn(n, rank, generator=g), torch.randn(rank, k, generator=g)) if rank else None
    return x, packed, state, wd, lora


def _quant(packed, state):
    n, k = state.shape
    if state.nested:
        nested = (state.state2.absmax, state.state2.code, torch.tensor([float(state.offset)]))
        nbs = state.state2.blocksize
    else:
        nested, nbs = (None, None, None), None
    return (packed, state.absmax, *nested, state.blocksize, nbs, state.quant_type, n, k)


def _oracle(x, wd, lora, dx, out0=None, extra=None):
    """(exact result, tolerance) in fp64, per the module's derivation."""
    x64, w64 = x.double(), wd.double()
    absw = w64.abs()
    rank = 0
    if lora is not None:
        lo, ro = (t.double() for t in lora)
        w64 = w64 + lo @ ro
        absw = absw + lo.abs() @ ro.abs()
        rank = lo.shape[1]
    red = x.shape[1]
    chunks = math.ceil(red / PANEL)
    exact = x64 @ w64 if dx else x64 @ w64.T
    mag = x64.abs() @ (absw if dx else absw.T)
    if out0 is not None:
        exact = exact + out0.double()
        mag = mag + out0.double().abs()
    tol = (red + chunks + rank + 3) * U * mag
    if extra is None:
        return exact, tol
    e64 = extra.double()
    exact2 = x64 @ e64 if dx else x64 @ e64.T
    tol2 = (red + chunks + 2) * U * (x64.abs() @ (e64.abs() if dx else e64.abs().T))
    return exact, tol, exact2, tol2


def _assert_within(got, exact, tol, what):
    err = (got.double() - exact).abs()
    bad = err > tol
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} outside the bound, worst err/tol {float((err / tol.clamp_min(1e-300)).max()):.3g}"
    )


def _run(x, quant, lora, dx, **kw):
    return (f32gemm.qgemm_4bit_dx if dx else f32gemm.qgemm_4bit)(x, quant, lora, **kw)


# (m, n, k): rows of x around the 6-row micro-kernel, columns around the 16-wide strips,
# reductions of one, two and three 512-panels (k forward, n for dx); blocks that straddle
# rows (k % 64 != 0)
SHAPES = [
    (1, 17, 40),
    (5, 45, 96),
    (6, 16, 64),
    (7, 33, 100),
    (13, 300, 70),
    (37, 50, 520),
    (64, 257, 256),
    (9, 1100, 40),
    (3, 20, 1060),
]


@pytest.mark.parametrize("dx", [False, True], ids=["fwd", "dx"])
@pytest.mark.parametrize("rank", [0, 3, 16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_within_bound(shape, rank, dx):
    m, n, k = shape
    x, packed, state, wd, lora = _problem(m, n, k, dx, rank, seed=m + n + k + rank)
    got = _run(x, _quant(packed, state), lora, dx)
    assert got.shape == (m, k if dx else n) and got.dtype == torch.float32
    _assert_within(got, *_oracle(x, wd, lora, dx), f"{shape} r={rank} dx={dx}")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("dx", [False, True], ids=["fwd", "dx"])
@pytest.mark.parametrize("k", [100, 200])
def test_decode_is_dequantize_bit_for_bit(quant_type, nested, blocksize, dx, k):
    """x = I: every output is one weight times 1 plus zeros, so the kernel returns its
    decoded W itself, which must equal dequantize_4bit's (any -0.0 comes back as +0.0).
    Rows of 100 start on every 4th element (the element-by-element head before the first
    8-aligned group), rows of 200 on groups of 8; blocks of 32/64/256 start anywhere in a
    row."""
    n = 70
    _, packed, state, wd, _ = _problem(1, n, k, dx, 0, quant_type, nested, blocksize)
    eye = torch.eye(n if dx else k)
    got = _run(eye, _quant(packed, state), None, dx)
    want = wd if dx else wd.T
    assert torch.equal(got, want + 0.0)


@pytest.mark.parametrize("dx", [False, True], ids=["fwd", "dx"])
def test_accumulate_and_extra(dx):
    m, n, k, r = 37, 45, 300, 8
    x, packed, state, wd, lora = _problem(m, n, k, dx, r, seed=5)
    g = torch.Generator().manual_seed(6)
    extra = torch.randn(n, r, generator=g) if dx else torch.randn(r, k, generator=g)
    out0 = torch.randn(m, k if dx else n, generator=g)
    out = out0.clone()
    got, got2 = _run(x, _quant(packed, state), lora, dx, out=out, accumulate=True, extra=extra)
    assert got is out and got2.shape == (m, r)
    exact, tol, exact2, tol2 = _oracle(x, wd, lora, dx, out0=out0, extra=extra)
    _assert_within(got, exact, tol, "accumulated")
    _assert_within(got2, exact2, tol2, "extra columns")


@pytest.mark.parametrize("dx", [False, True], ids=["fwd", "dx"])
def test_threads_do_not_change_bits(dx):
    """The column blocks depend on the thread count, each output's sum does not."""
    x, packed, state, _, lora = _problem(50, 300, 270, dx, 4, seed=9)
    quant = _quant(packed, state)
    extra = torch.randn(300, 5) if dx else torch.randn(5, 270)
    one = _run(x, quant, lora, dx, extra=extra, num_threads=1)
    for t in (2, 3, 7):
        other = _run(x, quant, lora, dx, extra=extra, num_threads=t)
        assert torch.equal(one[0], other[0]) and torch.equal(one[1], other[1]), t


def test_cpu_info_names_the_kernel():
    assert f32gemm.active() and cpu_module().cpu_info()["gemm_4bit_f32"] == "avx2"


def test_large_m_and_w_keep_the_panels():
    assert f32gemm.use_for(16, 4096, 4096) and f32gemm.use_for(512, 704, 256)
    assert f32gemm.use_for(f32gemm.PANELS_MIN_ROWS - 1, 4096, 4096)
    assert not f32gemm.use_for(f32gemm.PANELS_MIN_ROWS, 4096, 1024)
    assert not f32gemm.use_for(512, 4096, 4096)


def test_empty_sizes():
    x, packed, state, _, _ = _problem(0, 20, 64, False, 0)
    assert _run(x, _quant(packed, state), None, False).shape == (0, 20)
    x = torch.randn(3, 20)
    out = _run(x, _quant(packed, state), None, True, extra=torch.randn(20, 2))
    assert out[0].shape == (3, 64) and out[1].shape == (3, 2)


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 40),
    n=st.integers(1, 90),
    k=st.integers(1, 12).map(lambda v: 32 * v),
    rank=st.integers(0, 9),
    dx=st.booleans(),
    fp4=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property(m, n, k, rank, dx, fp4, seed):
    x, packed, state, wd, lora = _problem(m, n, k, dx, rank, "fp4" if fp4 else "nf4", seed % 2 == 0, 32, seed)
    _assert_within(_run(x, _quant(packed, state), lora, dx), *_oracle(x, wd, lora, dx), "property")


def test_errors():
    x, packed, state, _, lora = _problem(4, 20, 64, False, 2)
    quant = _quant(packed, state)
    with pytest.raises(TypeError, match="x must be torch.float32"):
        f32gemm.qgemm_4bit(x.bfloat16(), quant)
    with pytest.raises(ValueError, match="x must have k = 64 columns"):
        f32gemm.qgemm_4bit(x[:, :32], quant)
    with pytest.raises(ValueError, match="the LoRA factors must be"):
        f32gemm.qgemm_4bit(x, quant, (lora[0], lora[1][:, :10]))
    with pytest.raises(ValueError, match="accumulate needs an out tensor"):
        f32gemm.qgemm_4bit(x, quant, accumulate=True)
    with pytest.raises(ValueError, match="out must be"):
        f32gemm.qgemm_4bit(x, quant, out=torch.empty(4, 21))
    with pytest.raises(ValueError, match="extra must be"):
        f32gemm.qgemm_4bit(x, quant, extra=torch.randn(2, 63))
    mod = cpu_module()
    args = dict(
        dx=False, x=x.data_ptr(), x_len=x.numel(), m=4, n=20, k=64, packed=packed.data_ptr(),
        packed_len=packed.numel(), absmax=state.absmax.data_ptr(), absmax_len=state.absmax.numel(),
        blocksize=64, quant_type=QUANT_TYPE_IDS["nf4"], nested_absmax=state.state2.absmax.data_ptr(),
        nested_absmax_len=state.state2.absmax.numel(), nested_code=state.state2.code.data_ptr(),
        offset=torch.tensor([float(state.offset)]).data_ptr(), nested_blocksize=256, lora_l=0,
        lora_l_len=0, lora_r=0, lora_r_len=0, rank=0, out=torch.empty(4, 20).data_ptr(), out_len=80,
        accumulate=False, extra=0, extra_len=0, extra_cols=0, out2=0, out2_len=0, col_block=0,
        red_block=0, num_threads=1,
    )  # fmt: skip
    for field, value, message in (
        ("x_len", 255, "x holds 255 elements, needs at least 256"),
        ("packed_len", 10, "packed holds 10 elements, needs at least 640"),
        ("out_len", 79, "out holds 79 elements, needs at least 80"),
        ("col_block", 24, "col_block must be 0"),
        ("extra_cols", 300, "extra_cols must be at most 256"),
        ("extra_cols", 2, "extra holds 0 elements, needs at least 128"),
        ("rank", 2, "lora_l holds 0 elements, needs at least 40"),
    ):
        with pytest.raises(ValueError, match=message):
            mod.qgemm_4bit_f32(**{**args, field: value})
    prev = mod.set_isa("scalar")
    try:
        assert not f32gemm.active()
        with pytest.raises(ValueError, match="needs the avx2 level"):
            mod.qgemm_4bit_f32(**args)
    finally:
        mod.set_isa(prev)


# --- the QLoRA layer's fp32 path through the kernel ---------------------------------------

LAYER_CASES = [
    # (dtype, M, N, K, r, quant_type, double_quant, blocksize, bias, rank_scale, out_scale)
    (torch.float32, 37, 70, 96, 4, "nf4", True, 32, True, True, True),
    (torch.float32, 40, 45, 83, 1, "fp4", False, 64, False, False, False),
    (torch.float32, 64, 130, 64, 64, "nf4", True, 64, True, False, True),
    (torch.float32, 300, 45, 200, 16, "nf4", True, 64, True, True, False),
    (torch.float16, 20, 33, 96, 8, "nf4", True, 32, False, True, True),
    # ranks above the kernel's extra block (MAX_EXTRA_COLS): xa and g by torch's GEMM
    (torch.float32, 40, 48, 64, 257, "nf4", True, 64, True, False, False),
    (torch.bfloat16, 24, 40, 72, 300, "fp4", False, 32, False, True, True),
]


@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("case", LAYER_CASES, ids=case_id)
def test_qlora_layer_fused(case, merge, monkeypatch):
    """Forward and every gradient within the oracle's bounds with the base products on the
    fused kernel, the LoRA term merged into W' (xa, g from the same passes) or composed."""
    monkeypatch.setattr(cpu_qlora, "SMALL_MAX_ELEMS", 0)
    monkeypatch.setattr(cpu_qlora, "SMALL_BACKWARD_MAX_ROWS", 0)
    monkeypatch.setattr(cpu_qlora, "fp32_may_take_bf16", lambda m, n, k: False)
    monkeypatch.setattr(cpu_qlora, "merges_lora", lambda m, inner: merge)
    calls = []
    for name in ("qgemm_4bit", "qgemm_4bit_dx"):
        real = getattr(f32gemm, name)

        def spy(*a, _real=real, _name=name, **kw):
            calls.append((_name, kw.get("extra") is not None))
            return _real(*a, **kw)

        monkeypatch.setattr(f32gemm, name, spy)
    p = make_problem(case)
    check_qlora_linear(p, "cpu")
    if cpu_qlora._compute_dtype(p["x"]) == torch.float32:
        names = {c[0] for c in calls}
        assert names == {"qgemm_4bit", "qgemm_4bit_dx"}, calls
        # xa rides in the forward's pass; g in dx's when merged; neither above the extra block
        rides = case[4] <= f32gemm.MAX_EXTRA_COLS
        assert (("qgemm_4bit", True) in calls) == rides
        assert (("qgemm_4bit_dx", True) in calls) == (merge and rides)


@pytest.mark.parametrize("level", ["scalar", "avx512", "avx512_bf16", "amx"])
def test_qlora_layer_other_levels_take_panels(level, monkeypatch):
    """At the other levels the fp32 path decodes panels for torch's GEMM (same bounds)."""
    mod = cpu_module()
    if level in mod.cpu_info()["missing"]:
        pytest.skip(f"{level}: this CPU lacks {mod.cpu_info()['missing'][level]}")
    monkeypatch.setattr(cpu_qlora, "SMALL_MAX_ELEMS", 0)
    monkeypatch.setattr(cpu_qlora, "SMALL_BACKWARD_MAX_ROWS", 0)
    monkeypatch.setattr(cpu_qlora, "fp32_may_take_bf16", lambda m, n, k: False)
    monkeypatch.setattr(f32gemm, "qgemm_4bit", None)  # a call would raise
    monkeypatch.setattr(f32gemm, "qgemm_4bit_dx", None)
    prev = mod.set_isa(level)
    try:
        assert not f32gemm.active()
        assert mod.cpu_info()["gemm_4bit_f32"] is None
        check_qlora_linear(make_problem(LAYER_CASES[0]), "cpu")
    finally:
        mod.set_isa(prev)


# --- the rank-r weight gradients (lora_grad_f32) ------------------------------------------
#
# out[j, c] = sum_i fl(g[i, j] s) q[i, c]: each g element rounded once when scaled (relative
# u), then one FMA chain over the m rows (one rounding per step): |out - exact| <= (m + 2) u
# sum_i |g[i, j] s| |q[i, c]| (the u of slack covers the second-order terms).


def _grad_oracle(g, q, s):
    g64, q64 = g.double() * s, q.double()
    return g64.T @ q64, (g.shape[0] + 2) * U * (g64.abs().T @ q64.abs())


@pytest.mark.parametrize("m", [1, 7, 512])
@pytest.mark.parametrize("r", [1, 6, 8, 13, 64])
@pytest.mark.parametrize("cols", [1, 16, 37, 704])
def test_lora_grad_within_bound(m, r, cols):
    gen = torch.Generator().manual_seed(m * 1000 + r * 10 + cols)
    g, q = torch.randn(m, r, generator=gen), torch.randn(m, cols, generator=gen)
    got = f32gemm.lora_grad(g, q, 0.37)
    assert got.shape == (r, cols) and got.dtype == torch.float32
    _assert_within(got, *_grad_oracle(g, q, 0.37), f"m={m} r={r} cols={cols}")
    # the transposed output, strided g (a transposed view) and any thread count: the same bits
    t = f32gemm.lora_grad(g.t().contiguous().t(), q, 0.37, transpose_out=True)
    assert t.shape == (cols, r) and t.is_contiguous() and torch.equal(t, got.t())
    for threads in (1, 3):
        assert torch.equal(f32gemm.lora_grad(g, q, 0.37), got)
        cpu_module().lora_grad_f32(
            g.data_ptr(), g.numel(), r, 1, m, r, 0.37, q.data_ptr(), q.numel(), cols,
            (o := torch.empty(r, cols)).data_ptr(), o.numel(), False, threads,
        )  # fmt: skip
        assert torch.equal(o, got)


def test_lora_grad_scales_as_torch_rounds():
    """g s is rounded to fp32 before the products, as torch's ``g * s`` rounds it: with one
    row the kernel's output is exactly (g * s)^T q for q of ones."""
    g = torch.randn(1, 5) * 3
    q = torch.ones(1, 3)
    s = 1 / 3
    assert torch.equal(f32gemm.lora_grad(g, q, s), (g * s).t().expand(5, 3))


def test_lora_grad_empty_and_errors():
    assert torch.equal(f32gemm.lora_grad(torch.empty(0, 4), torch.empty(0, 9), 2.0), torch.zeros(4, 9))
    assert f32gemm.lora_grad(torch.randn(3, 0), torch.randn(3, 5), 2.0).shape == (0, 5)
    with pytest.raises(ValueError, match="must have the same rows"):
        f32gemm.lora_grad(torch.randn(3, 4), torch.randn(4, 5), 1.0)
    with pytest.raises(TypeError, match="q must be torch.float32"):
        f32gemm.lora_grad(torch.randn(3, 4), torch.randn(3, 5).double(), 1.0)
    g, q, o = torch.randn(3, 4), torch.randn(3, 5), torch.empty(4, 5)
    mod = cpu_module()
    with pytest.raises(ValueError, match="g holds 11 elements, its strides reach element 11"):
        mod.lora_grad_f32(g.data_ptr(), 11, 4, 1, 3, 4, 1.0, q.data_ptr(), 15, 5, o.data_ptr(), 20, False, 1)
    with pytest.raises(ValueError, match="q holds 14 elements, needs at least 15"):
        mod.lora_grad_f32(g.data_ptr(), 12, 4, 1, 3, 4, 1.0, q.data_ptr(), 14, 5, o.data_ptr(), 20, False, 1)
    with pytest.raises(ValueError, match="out holds 19 elements, needs at least 20"):
        mod.lora_grad_f32(g.data_ptr(), 12, 4, 1, 3, 4, 1.0, q.data_ptr(), 15, 5, o.data_ptr(), 19, False, 1)
    prev = mod.set_isa("scalar")
    try:
        with pytest.raises(ValueError, match="needs the avx2 level"):
            f32gemm.lora_grad(g, q, 1.0)
    finally:
        mod.set_isa(prev)
