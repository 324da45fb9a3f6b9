"""qlora_linear (fused 4-bit dequant + LoRA GEMM): the Triton kernels against an fp64 oracle.

Without a GPU the Triton kernels run in the interpreter (conftest sets TRITON_INTERPRET=1)
with one fixed tile config (BLOCK_M = BLOCK_N = 16, BLOCK_K = 64), so the shapes below (M, N,
K not multiples of 16/64; K not a multiple of the quant blocksize, so quant blocks straddle
rows of W; and K a multiple of it, the kernels' ALIGNED path) hit every mask edge. The oracle is computed in fp64 from the exact inputs and the exactly dequantized W
(fp32 decode values are exact in fp64).

Tolerances are worst-case bounds, derived per output element (u32 = 2^-24):
- an fp32 dot over n terms: n * u32 * sum|a_i b_i| (one rounding per product and per add);
- operands the kernel rounds to the activation dtype (dequantized W, t = s * xa * rank_scale,
  g, dy' = dy * out_scale, xa): u_op * (sum of |contributions|), u_op = 2^-11 (fp16, RNE)
  or 2^-7 (bf16: the interpreter truncates fp32->bf16; covers RNE's 2^-8 on a GPU);
  for fp16 the oracle rounds W exactly as the kernel does, so that term vanishes;
- the final cast: u_out * |y|, u_out = 2^-24 (fp32), 2^-11 (fp16), 2^-7 (bf16, truncating).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import qpeft
from qpeft.functional import dequantize_4bit, qlora_linear, quantize_4bit

from ._helpers import triton_test_device


@pytest.fixture(autouse=True)
def _on_triton_device(request):
    # Tests over the CPU `backend` fixture keep CPU tensors; the Triton ones follow the GPU.
    with contextlib.nullcontext() if "backend" in request.fixturenames else triton_test_device():
        yield


U32 = 2.0**-24
U_OP = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-7}
U_OUT = {torch.float32: U32, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-7}

# (dtype, M, N, K, r, quant_type, double_quant, blocksize, bias, rank_scale, out_scale)
CASES = [
    (torch.float32, 37, 45, 83, 8, "nf4", True, 64, True, True, True),
    (torch.float32, 1, 45, 83, 1, "fp4", False, 64, False, False, False),
    (torch.float32, 20, 17, 150, 64, "fp4", True, 32, False, True, True),
    (torch.float32, 1, 3, 5, 1, "nf4", False, 32, True, False, False),  # odd numel: padding nibble
    (torch.float16, 37, 45, 83, 64, "nf4", False, 32, True, False, True),
    (torch.float16, 1, 33, 100, 8, "fp4", True, 64, False, True, False),
    (torch.float16, 20, 50, 47, 1, "nf4", True, 256, True, True, True),  # a quant block spans 5+ rows
    (torch.float16, 5, 45, 200, 8, "nf4", True, 32, False, False, True),  # 282 blocks: nested blocks straddle
    (torch.bfloat16, 37, 45, 83, 8, "fp4", True, 128, True, True, False),
    (torch.bfloat16, 1, 45, 83, 64, "nf4", False, 64, False, False, True),
    (torch.bfloat16, 17, 16, 64, 1, "nf4", True, 64, True, False, False),
    # K % blocksize == 0: the kernels' ALIGNED path (whole quant blocks per row, vector byte loads)
    (torch.float32, 37, 45, 96, 8, "nf4", True, 32, True, True, True),  # two blocks per 64-wide K tile
    (torch.float16, 20, 50, 192, 1, "fp4", False, 64, False, True, False),
    (torch.float16, 5, 72, 256, 8, "nf4", True, 32, True, False, True),  # 576 blocks: nested blocks straddle
    (torch.bfloat16, 1, 45, 256, 64, "nf4", False, 128, False, False, True),  # a block spans two K tiles
]


def _ids(case):
    dt, m, n, k, r, qt, dq, bs, bias, rs, os_ = case
    flags = "".join(f for f, on in (("b", bias), ("R", rs), ("O", os_)) if on) or "-"
    return f"{str(dt)[6:]}-{m}x{n}x{k}-r{r}-{qt}{'-dq' if dq else ''}-bs{bs}-{flags}"


def _problem(case, seed=0):
    dt, m, n, k, r, qt, dq, bs, has_bias, has_rs, has_os = case
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    packed, state = quantize_4bit(w, bs, qt, double_quant=dq)
    p = {
        "packed": packed,
        "state": state,
        "w": dequantize_4bit(packed, state, torch.float32).double(),  # exact
        "x": torch.randn(m, k, generator=g).to(dt),
        "a": (torch.randn(r, k, generator=g) / k**0.5).to(dt),
        "b": torch.randn(n, r, generator=g).to(dt),
        "bias": torch.randn(n, generator=g).to(dt) if has_bias else None,
        "rank_scale": (torch.rand(r, generator=g) + 0.5) if has_rs else None,
        "out_scale": (torch.rand(n, generator=g) + 0.5).to(dt) if has_os else None,
        "dy": torch.randn(m, n, generator=g).to(dt),
        "scaling": 0.75,
    }
    return p


def _d(t):
    return None if t is None else t.double()


def _oracle(p, dt, rounds_operands=True):
    """fp64 values and worst-case error bounds of y, dx, dA, dB, dbias (see module docstring).

    ``rounds_operands``: the kernel rounds W, t, dy' to ``dt`` before its dots (Triton);
    the reference ("default") does not: it computes in fp32 from the exact operands.
    """
    u_op, u_out = (U_OP[dt] if rounds_operands else 0.0), U_OUT[dt]
    x, a, b, dy, s = _d(p["x"]), _d(p["a"]), _d(p["b"]), _d(p["dy"]), p["scaling"]
    w = p["w"]
    mimic = rounds_operands and dt == torch.float16
    w_op = p["w"].to(dt).double() if mimic else w  # the fp16 kernel multiplies fp16(W)
    u_w = u_op if dt == torch.bfloat16 else 0.0
    m, k = x.shape
    n, r = b.shape
    rs = _d(p["rank_scale"]) if p["rank_scale"] is not None else torch.ones(r, dtype=torch.float64)
    os_ = _d(p["out_scale"]) if p["out_scale"] is not None else torch.ones(n, dtype=torch.float64)
    bias = _d(p["bias"]) if p["bias"] is not None else torch.zeros(n, dtype=torch.float64)
    ax, aa, ab, aw = x.abs(), a.abs(), b.abs(), w.abs()

    # forward
    xa = x @ a.T
    t = s * xa * rs
    pre = x @ w_op.T + t @ b.T + bias
    y = os_ * pre
    s_base = ax @ aw.T  # sum_k |x||w|
    s_t = s * (ax @ aa.T) * rs.abs()  # bound of |t| including its accumulation
    s_lora = s_t @ ab.T
    err_pre = (
        (k + 2) * U32 * s_base
        + u_w * s_base
        + s_lora * (u_op + (k + r + 4) * U32)
        + U32 * (pre.abs() + bias.abs())
    )
    tol_y = os_.abs() * err_pre * (1 + U32) + u_out * y.abs() + U32 * y.abs()
    tol_xa = k * U32 * (ax @ aa.T) + u_out * xa.abs()

    # backward: dy' = dy * out_scale, rounded to the operand dtype when out_scale is set
    dyp = dy * os_
    u_dy = u_op if p["out_scale"] is not None else 0.0
    ady = dyp.abs()
    g = dyp @ b
    s_g = ady @ ab  # sum_n |dy'||b|
    dx = dyp @ w_op + (s * g * rs) @ a
    s_dxb = ady @ aw
    s_dxl = (s * s_g * rs.abs()) @ aa
    tol_dx = (
        (n + 2) * U32 * s_dxb
        + (u_w + u_dy) * s_dxb
        + s_dxl * (u_op + u_dy + (n + r + 4) * U32)
        + u_out * dx.abs()
        + U32 * dx.abs()
    )
    da = (s * g * rs).T @ x
    s_da = (s * s_g * rs.abs()).T @ ax
    tol_da = s_da * (u_dy + (n + m + 4) * U32) + u_out * da.abs()
    db = dyp.T @ (s * xa * rs)
    s_db = ady.T @ (s * (ax @ aa.T) * rs.abs())
    tol_db = s_db * (u_dy + u_out + (k + m + 4) * U32) + u_out * db.abs()  # xa was stored in dt
    dbias = dyp.sum(0)
    tol_dbias = ady.sum(0) * (u_dy + (m + 1) * U32) + u_out * dbias.abs()
    return {
        "y": (y, tol_y),
        "xa": (xa, tol_xa),
        "dx": (dx, tol_dx),
        "dA": (da, tol_da),
        "dB": (db, tol_db),
        "dbias": (dbias, tol_dbias),
    }


def assert_within(actual: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected).abs()
    bad = ~(err <= tol)
    if bool(bad.any()):
        i = bad.reshape(-1).nonzero()[:5, 0]
        pytest.fail(
            f"{what}: {int(bad.sum())} of {bad.numel()} beyond the bound; first at flat {i.tolist()}: got "
            f"{actual.reshape(-1)[i].tolist()} expected {expected.reshape(-1)[i].tolist()} "
            f"(|err| {err.reshape(-1)[i].tolist()} > tol {tol.reshape(-1)[i].tolist()})"
        )


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_forward_and_grads(case):
    dt = case[0]
    p = _problem(case)
    ref = _oracle(p, dt)
    x = p["x"].clone().requires_grad_()
    a = p["a"].clone().requires_grad_()
    b = p["b"].clone().requires_grad_()
    bias = p["bias"].clone().requires_grad_() if p["bias"] is not None else None
    with qpeft.use_backend("triton"):
        y = qlora_linear(
            x,
            p["packed"],
            p["state"],
            a,
            b,
            p["scaling"],
            bias,
            rank_scale=p["rank_scale"],
            out_scale=p["out_scale"],
        )
        assert y.dtype == dt
        assert_within(y.detach(), *ref["y"], "y")
        y.backward(p["dy"])
    assert_within(x.grad, *ref["dx"], "dx")
    assert_within(a.grad, *ref["dA"], "dA")
    assert_within(b.grad, *ref["dB"], "dB")
    if bias is not None:
        assert_within(bias.grad, *ref["dbias"], "dbias")


def test_strided_batched_mixed_dtypes():
    """x [2, 5, K] viewed out of a wider buffer (row stride K + 3), fp32 LoRA weights with a
    bf16 x (PEFT keeps adapters in fp32): y in x's dtype, gradients in each parameter's dtype.
    A and B hold bf16-representable values, so the kernel's cast to bf16 is exact and the
    bf16 bounds apply unchanged."""
    case = (torch.bfloat16, 10, 45, 128, 8, "nf4", True, 64, True, True, False)
    p = _problem(case, seed=4)
    ref = _oracle(p, torch.bfloat16)
    k = p["x"].shape[1]
    wide = torch.zeros(2, 5, k + 3, dtype=torch.bfloat16)
    wide[..., :k] = p["x"].reshape(2, 5, k)
    x = wide[..., :k].requires_grad_()
    a = p["a"].float().requires_grad_()
    b = p["b"].float().requires_grad_()
    with qpeft.use_backend("triton"):
        y = qlora_linear(
            x, p["packed"], p["state"], a, b, p["scaling"], p["bias"], rank_scale=p["rank_scale"]
        )
        y.backward(p["dy"].reshape(2, 5, -1))
    assert y.shape == (2, 5, 45) and y.dtype == torch.bfloat16
    assert_within(y.detach().reshape(10, 45), *ref["y"], "y")
    assert x.grad.dtype == torch.bfloat16 and a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    assert_within(x.grad.reshape(10, k), *ref["dx"], "dx")
    assert_within(a.grad, *ref["dA"], "dA")
    # dB = s * dy'^T @ xa: xa is stored in bf16 either way; the fp32 result skips the final bf16 cast.
    assert_within(b.grad, *ref["dB"], "dB")


def test_no_grad_inference_skips_xa():
    p = _problem(CASES[1])
    with torch.no_grad(), qpeft.use_backend("triton"):
        y = qlora_linear(p["x"], p["packed"], p["state"], p["a"], p["b"], p["scaling"])
    assert not y.requires_grad
    assert_within(y, *_oracle(p, torch.float32)["y"], "y")


def _op_args(p, return_xa):
    st = p["state"]
    nested = (st.state2.absmax, st.state2.code, st.offset.reshape(1)) if st.nested else (None, None, None)
    n, k = st.shape
    nested_bs = st.state2.blocksize if st.nested else 256
    return (
        p["x"],
        p["packed"],
        st.absmax,
        *nested,
        st.blocksize,
        nested_bs,
        st.quant_type,
        n,
        k,
        p["a"],
        p["b"],
        p["scaling"],
        p["bias"],
        p["rank_scale"],
        p["out_scale"],
        return_xa,
    )


@pytest.mark.parametrize("backend", ["default", "triton"])
def test_op_xa_and_empty_outputs(backend):
    case = CASES[0]
    p = _problem(case, seed=1)
    ref = _oracle(p, case[0], rounds_operands=backend == "triton")
    with qpeft.use_backend(backend):
        y, xa = torch.ops.qpeft.qlora_linear(*_op_args(p, True))
        assert_within(xa, *ref["xa"], "xa")
        assert_within(y, *ref["y"], "y")
        y2, empty = torch.ops.qpeft.qlora_linear(*_op_args(p, False))
        assert empty.numel() == 0 and torch.equal(y, y2)
        args = _op_args(p, False)
        grads = torch.ops.qpeft.qlora_linear_backward(
            p["dy"],
            *args[:11],
            p["a"],
            p["b"],
            xa,
            p["scaling"],
            p["rank_scale"],
            p["out_scale"],
            False,
            True,
            False,
            False,
        )
    assert [g.numel() == 0 for g in grads] == [True, False, True, True]
    assert_within(grads[1], *ref["dA"], "dA")


@pytest.mark.parametrize("backend", ["default", "triton"])
def test_opcheck(backend):
    """Schemas, fake impls and no aliasing of both ops (torch.library.opcheck), per backend."""
    case = CASES[6]
    p = _problem(case, seed=2)
    ref = _oracle(p, case[0], rounds_operands=backend == "triton")
    with qpeft.use_backend(backend):
        y, xa = torch.ops.qpeft.qlora_linear(*_op_args(p, True))
        torch.library.opcheck(torch.ops.qpeft.qlora_linear.default, _op_args(p, True))
        bargs = (
            p["dy"],
            *_op_args(p, False)[:11],
            p["a"],
            p["b"],
            xa,
            p["scaling"],
            p["rank_scale"],
            p["out_scale"],
            True,
            True,
            True,
            True,
        )
        torch.library.opcheck(torch.ops.qpeft.qlora_linear_backward.default, bargs)
    assert_within(y, *ref["y"], f"{backend} y")


def test_gradcheck_fp64_reference():
    """Exact fp64 gradients of the reference path (gradcheck's finite differences)."""
    g = torch.Generator().manual_seed(3)
    n, k, r, m = 5, 7, 2, 3
    packed, state = quantize_4bit(torch.randn(n, k, generator=g), 32, "nf4", double_quant=True)
    x = torch.randn(2, m, k, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(r, k, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, r, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(n, generator=g, dtype=torch.float64, requires_grad=True)
    rs = torch.rand(r, generator=g, dtype=torch.float64)
    os_ = torch.rand(n, generator=g, dtype=torch.float64)

    def f(x, a, b, bias):
        return qlora_linear(x, packed, state, a, b, 0.5, bias, rank_scale=rs, out_scale=os_)

    with qpeft.use_backend("default"):
        assert torch.autograd.gradcheck(f, (x, a, b, bias))


def test_errors():
    p = _problem(CASES[1])
    st = p["state"]
    x, a, b = p["x"], p["a"], p["b"]
    with pytest.raises(ValueError, match="input features"):
        qlora_linear(x[:, :-1], p["packed"], st, a, b, 1.0)
    with pytest.raises(ValueError, match="rank mismatch"):
        qlora_linear(x, p["packed"], st, torch.zeros(2, x.shape[1]), b, 1.0)
    with pytest.raises(ValueError, match="lora_B must be"):
        qlora_linear(x, p["packed"], st, a, b.T, 1.0)
    with pytest.raises(ValueError, match="is on meta"):
        qlora_linear(x, p["packed"], st, a.to("meta"), b, 1.0)
    with pytest.raises(ValueError, match="bias must have shape"):
        qlora_linear(x, p["packed"], st, a, b, 1.0, torch.zeros(3))
    with pytest.raises(NotImplementedError, match="rank_scale"):
        qlora_linear(x, p["packed"], st, a, b, 1.0, rank_scale=torch.ones(a.shape[0], requires_grad=True))
    with qpeft.use_backend("triton"), pytest.raises(TypeError, match="fp16, bf16 or fp32"):
        qlora_linear(x.double(), p["packed"], st, a, b, 1.0)


def test_aot_configs_are_well_formed():
    """AOT_CONFIGS name every kernel argument in order; constexprs are marked in the signature."""
    from qpeft.backends.triton.qlora import _kernels

    kern = _kernels()
    assert kern.AOT_CONFIGS
    for cfg in kern.AOT_CONFIGS:
        assert set(cfg) == {"name", "fn", "signature", "constexprs", "num_warps", "num_stages", "attrs"}
        assert list(cfg["signature"]) == cfg["fn"].arg_names, cfg["name"]
        for name in cfg["constexprs"]:
            assert cfg["signature"][name] == "constexpr", (cfg["name"], name)
        assert all((v == "constexpr") == (k in cfg["constexprs"]) for k, v in cfg["signature"].items())
