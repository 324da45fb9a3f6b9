"""The CUDA C++ SIMT fused dequant + LoRA GEMM (csrc/cuda/qlora_simt.cu) run by the CUDA emulation
(backend "cuda_emulated", qpeft._C_cuda_emu) against the fp64 oracle.

Tolerances (qpeft/testing.py, the comment above U_OP):

* fp32: ``oracle(p, float32, rounds_operands=False)``. The kernel rounds no operand: W is decoded
  in fp32 (code * absmax: dequantize_4bit's values exactly), t = (L * s) * rank_scale is formed in
  fp32 as the reference forms it, every product is an IEEE fp32 FMA. The base sum x @ W^T and the
  LoRA sum t @ B^T have their own accumulators, then (base + lora) + bias, * out_scale: a base
  term passes through at most K + 2 roundings and a LoRA term through t's K + 2 and r + 2 more,
  the counts the bound is written for; dA, dB, dbias are the CPU's fp32 matmuls of the oracle's
  derivation (g = dy' @ B returned in fp32 by the kernel).
* fp64: the same computation in fp64 (W decoded in fp32 and widened exactly), so the fp32 bound
  with every 2^-24 replaced by 2^-53 (``_f64_tol``: all its terms are multiples of U32 at
  rounds_operands=False) bounds the kernel's error; the oracle computes the same sums in fp64 and
  errs by at most as much, hence twice that between the two.
* fp16/bf16 forced through the SIMT kernel (``FORCE_SIMT``, what a GPU below sm_80 runs): x is
  widened exactly, W and t stay fp32, so ``rounds_operands=False`` with the output rounding of the
  dtype; dy' = dy * out_scale is rounded to x's dtype by the caller (the kernel's operand), so the
  backward is held to the oracle of that dy' (``_with_rounded_dy``).

Shapes: the block tile is 64 rows x 64 output columns with a reduction chunk of 32, so M = 1, 5,
37, 130 and N = 1, 45, 130 cut row and column tiles; K = 96 and 200 take the 4-byte W path and
the 16-byte activation path (K % 8 == 0), K = 83 the per-element paths; r = 16 the vector LoRA
paths, r = 1, 4, 65 the per-element ones (and 65 two rank chunks of 32 in the up-projection).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st

import qpeft
from qpeft.backends.native import qlora as native_qlora
from qpeft.functional import qlora_linear
from qpeft.testing import U32

from ._helpers import assert_within
from ._helpers import make_problem as _problem
from ._helpers import oracle as _oracle
from .conftest import BUDGETS
from .emu_support import emu_module

U64 = 2.0**-53

# (dtype, M, N, K, r, quant_type, double_quant, blocksize, bias, rank_scale, out_scale)
CASES = [
    (torch.float32, 37, 45, 96, 4, "nf4", True, 64, True, True, True),
    (torch.float32, 1, 130, 83, 1, "fp4", False, 32, False, False, False),
    (torch.float32, 130, 1, 200, 16, "nf4", False, 128, True, False, True),
    (torch.float32, 5, 45, 83, 65, "fp4", True, 32, False, True, False),
    (torch.float32, 37, 130, 200, 16, "fp4", True, 64, True, True, True),
    (torch.float64, 5, 130, 96, 16, "nf4", True, 32, True, True, True),
    (torch.float64, 130, 45, 83, 4, "fp4", False, 64, False, True, True),
    (torch.float64, 1, 1, 200, 65, "nf4", True, 32, True, False, False),
    (torch.float64, 37, 45, 83, 1, "nf4", False, 256, False, False, True),
]

# fp16 / bf16 through the SIMT kernel (GPUs below sm_80)
HALF_CASES = [
    (torch.bfloat16, 37, 45, 96, 16, "nf4", True, 64, True, True, True),
    (torch.float16, 5, 130, 83, 65, "fp4", False, 32, True, False, True),
    (torch.bfloat16, 130, 1, 200, 1, "fp4", True, 32, False, True, False),
    (torch.float16, 1, 45, 96, 4, "nf4", True, 128, False, False, False),
]


def _id(case):
    dt, m, n, k, r, qt, dq, bs, bias, rs, os_ = case
    flags = "".join(f for f, on in (("b", bias), ("R", rs), ("O", os_)) if on) or "-"
    return f"{str(dt)[6:]}-{m}x{n}x{k}-r{r}-{qt}{'-dq' if dq else ''}-bs{bs}-{flags}"


@pytest.fixture(autouse=True)
def _emu():
    emu_module()


def _no_reference(*args, **kwargs):
    raise AssertionError("the reference ran: W was dequantized whole")


@pytest.fixture
def calls(monkeypatch):
    """Counts the emulated kernels' entry points (so a silent fallback cannot pass), with the
    reference's qlora ops replaced by a failure."""
    monkeypatch.setattr(native_qlora.reference, "qlora_linear", _no_reference)
    monkeypatch.setattr(native_qlora.reference, "qlora_linear_backward", _no_reference)
    mod = emu_module()
    seen = {"qlora_simt_forward": 0, "qlora_simt_dx": 0, "qlora_forward": 0, "qlora_dx": 0}
    for name in seen:
        real = getattr(mod, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(mod, name, spy)
    return seen


def _run(p, *, backend="cuda_emulated"):
    x = p["x"].clone().requires_grad_()
    a = p["a"].clone().requires_grad_()
    b = p["b"].clone().requires_grad_()
    bias = p["bias"].clone().requires_grad_() if p["bias"] is not None else None
    with qpeft.use_backend(backend):
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
        y.backward(p["dy"])
    return y.detach(), x.grad, a.grad, b.grad, (bias.grad if bias is not None else None)


def _f64_tol(ref):
    """The fp64 bounds: the fp32 ones (multiples of U32) at U64, twice (kernel and oracle)."""
    return {key: (v, 2 * tol * (U64 / U32)) for key, (v, tol) in ref.items()}


def _with_rounded_dy(p, dt):
    """The problem whose dy is the kernel's operand dy' = dy * out_scale rounded to dt."""
    if p["out_scale"] is None:
        return p
    dyp = (p["dy"].float() * p["out_scale"].float()).to(dt)
    return dict(p, dy=dyp, out_scale=None)


def _check(got, fwd, bwd, has_bias):
    y, dx, da, db, dbias = got
    assert_within(y, *fwd["y"], "y")
    assert_within(dx, *bwd["dx"], "dx")
    assert_within(da, *bwd["dA"], "dA")
    assert_within(db, *bwd["dB"], "dB")
    if has_bias:
        assert_within(dbias, *bwd["dbias"], "dbias")


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_fp32_fp64_against_oracle(case, calls):
    dt = case[0]
    p = _problem(case, seed=21)
    got = _run(p)
    assert got[0].dtype == dt and got[1].dtype == dt
    if dt == torch.float64:
        ref = _f64_tol(_oracle(p, torch.float32, rounds_operands=False))
    else:
        ref = _oracle(p, dt, rounds_operands=False)
    _check(got, ref, ref, p["bias"] is not None)
    # the SIMT kernel ran, once each way, and neither the tensor-core kernel nor the reference
    assert calls == {"qlora_simt_forward": 1, "qlora_simt_dx": 1, "qlora_forward": 0, "qlora_dx": 0}


@pytest.mark.parametrize("case", HALF_CASES, ids=_id)
def test_half_through_simt_against_oracle(case, calls, monkeypatch):
    dt = case[0]
    monkeypatch.setattr(native_qlora, "FORCE_SIMT", True)
    p = _problem(case, seed=22)
    got = _run(p)
    assert got[0].dtype == dt and got[1].dtype == dt
    fwd = _oracle(p, dt, rounds_operands=False)
    bwd = _oracle(_with_rounded_dy(p, dt), dt, rounds_operands=False)
    _check(got, fwd, bwd, p["bias"] is not None)
    assert calls == {"qlora_simt_forward": 1, "qlora_simt_dx": 1, "qlora_forward": 0, "qlora_dx": 0}


@pytest.mark.parametrize("dt", [torch.float32, torch.float64, torch.bfloat16])
def test_xa_output_and_no_adapter(dt, monkeypatch):
    """return_xa: xa = x @ A^T in x's dtype (for fp32/fp64 the kernel's L buffer itself); without
    an adapter y = (x W^T + bias) * out_scale and xa is empty."""
    monkeypatch.setattr(native_qlora, "FORCE_SIMT", True)
    case = (dt, 37, 45, 96, 8, "nf4", False, 64, True, False, True)
    p = _problem(case, seed=7)
    st = p["state"]
    args = (p["packed"], st.absmax, None, None, None, st.blocksize, 0, st.quant_type, 45, 96)
    with qpeft.use_backend("cuda_emulated"):
        y, xa = torch.ops.qpeft.qlora_linear(
            p["x"], *args, p["a"], p["b"], p["scaling"], p["bias"], None, p["out_scale"], True
        )
        y0, xa0 = torch.ops.qpeft.qlora_linear(
            p["x"], *args, None, None, 1.0, p["bias"], None, p["out_scale"], True
        )
    zero = dict(p, a=torch.zeros_like(p["a"]), b=torch.zeros_like(p["b"]))  # the oracle of no adapter
    if dt == torch.float64:
        ref, ref0 = (_f64_tol(_oracle(q, torch.float32, rounds_operands=False)) for q in (p, zero))
    else:
        ref, ref0 = (_oracle(q, dt, rounds_operands=False) for q in (p, zero))
    assert xa.dtype == dt and y.dtype == dt
    assert_within(y, *ref["y"], "y")
    assert_within(xa, *ref["xa"], "xa")
    assert xa0.numel() == 0
    assert_within(y0, *ref0["y"], "y (no adapter)")


def test_unaligned_and_noncontiguous_operands(calls):
    """x at an odd element offset (not 16-byte aligned: the per-element activation path) and a
    transposed (non-contiguous) lora_A, fp32."""
    case = (torch.float32, 37, 45, 96, 16, "nf4", True, 64, True, True, False)
    p = _problem(case, seed=8)
    buf = torch.empty(p["x"].numel() + 1)
    buf[1:] = p["x"].reshape(-1)
    p["x"] = buf[1:].view(37, 96)
    assert p["x"].data_ptr() % 16 != 0
    p["a"] = p["a"].T.contiguous().T
    assert not p["a"].is_contiguous()
    ref = _oracle(p, torch.float32, rounds_operands=False)
    _check(_run(p), ref, ref, True)
    assert calls["qlora_simt_forward"] == 1 and calls["qlora_simt_dx"] == 1


@pytest.mark.parametrize("seed", [1, 5])
def test_scheduling_orders(seed):
    """Reverse and random thread orders (the emulator's scheduling seed): a missing barrier
    would read a stale or poisoned (NaN) shared tile."""
    mod = emu_module()
    old = mod.seed()
    mod.set_seed(seed)
    try:
        case = (torch.float32, 70, 70, 83, 65, "fp4", True, 32, True, True, True)
        p = _problem(case, seed=9)
        ref = _oracle(p, torch.float32, rounds_operands=False)
        _check(_run(p), ref, ref, True)
    finally:
        mod.set_seed(old)


def test_high_rank_takes_simt(calls):
    """Ranks above the tensor-core kernel's qlora_max_rank (4096) go to the SIMT kernel."""
    case = (torch.bfloat16, 2, 3, 32, 4097, "nf4", False, 32, False, False, False)
    p = _problem(case, seed=10)
    got = _run(p)
    fwd = _oracle(p, torch.bfloat16, rounds_operands=False)
    _check(got, fwd, fwd, False)
    assert calls == {"qlora_simt_forward": 1, "qlora_simt_dx": 1, "qlora_forward": 0, "qlora_dx": 0}


def test_gradcheck_fp64():
    """torch.autograd.gradcheck of qlora_linear (x, A, B, bias) on the emulated backend in fp64."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(5, 40, generator=g)
    packed, state = qpeft.functional.quantize_4bit(w, 32, "nf4", double_quant=True)
    x = torch.randn(3, 40, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 40, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    rs = torch.rand(2, generator=g, dtype=torch.float64) + 0.5
    os_ = torch.rand(5, generator=g, dtype=torch.float64) + 0.5

    def f(x, a, b, bias):
        return qlora_linear(x, packed, state, a, b, 0.5, bias, rank_scale=rs, out_scale=os_)

    with qpeft.use_backend("cuda_emulated"):
        assert torch.autograd.gradcheck(f, (x, a, b, bias))


def test_empty_shapes(calls, monkeypatch):
    """M = 0 runs the kernels (their checks, then nothing) and returns empty results; an empty W
    (N = 0) is the reference's, the one case left to it (nothing to decode)."""
    case = (torch.float32, 0, 45, 96, 4, "nf4", False, 64, True, False, False)
    p = _problem(case, seed=11)
    got = _run(p)
    assert got[0].shape == (0, 45) and got[1].shape == (0, 96)
    assert torch.equal(got[2], torch.zeros_like(p["a"])) and torch.equal(got[3], torch.zeros_like(p["b"]))
    assert calls["qlora_simt_forward"] == 1 and calls["qlora_simt_dx"] == 1
    monkeypatch.undo()  # the reference again
    x = torch.randn(3, 64)
    empty = (torch.empty(0, dtype=torch.uint8), torch.empty(0), None, None, None, 64, 0, "nf4", 0, 64)
    with qpeft.use_backend("cuda_emulated"):
        y, xa = torch.ops.qpeft.qlora_linear(x, *empty, None, None, 1.0, None, None, None, False)
    assert y.shape == (3, 0) and xa.numel() == 0


def test_random_shapes_against_oracle(monkeypatch):
    """Hypothesis: any shape, rank, format and dtype (fp16/bf16 forced through the SIMT kernel)."""
    monkeypatch.setattr(native_qlora, "FORCE_SIMT", True)
    budget = BUDGETS["cuda_emulated"]

    def check(dt, m, n, k, r, qt, dq, bs, bias, rs, os_, seed):
        p = _problem((dt, m, n, k, r, qt, dq, bs, bias, rs, os_), seed=seed)
        got = _run(p)
        if dt == torch.float64:
            fwd = bwd = _f64_tol(_oracle(p, torch.float32, rounds_operands=False))
        else:
            fwd = _oracle(p, dt, rounds_operands=False)
            bwd = _oracle(_with_rounded_dy(p, dt), dt, rounds_operands=False)
        _check(got, fwd, bwd, bias)

    budget.run(
        check,
        dt=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
        m=st.integers(1, 70),
        n=st.integers(1, 70),
        k=st.integers(1, 140),
        r=st.integers(1, 70),
        qt=st.sampled_from(["nf4", "fp4"]),
        dq=st.booleans(),
        bs=st.sampled_from([32, 64, 128]),
        bias=st.booleans(),
        rs=st.booleans(),
        os_=st.booleans(),
        seed=st.integers(0, 2**16),
    )


# --- host checks ------------------------------------------------------------------------


def _fwd_args(**over):
    """A valid qlora_simt_forward call on tiny fp32 buffers (m=1, n=2, k=32, r=1), with overrides."""
    x = torch.zeros(32)
    packed = torch.zeros(32, dtype=torch.uint8)
    absmax = torch.ones(1)
    a = torch.zeros(32)
    b = torch.zeros(2)
    y = torch.empty(2)
    lbuf = torch.empty(1)
    keep = (x, packed, absmax, a, b, y, lbuf)
    args = dict(
        x=x.data_ptr(), x_dtype=0, x_len=32, m=1, k=32, packed=packed.data_ptr(), packed_len=32,
        absmax=absmax.data_ptr(), absmax_len=1, n=2, blocksize=64, quant_type=2, nested_absmax=0,
        nested_absmax_len=0, nested_code=0, offset=0, nested_blocksize=256, lora_a=a.data_ptr(),
        lora_a_len=32, lora_b=b.data_ptr(), lora_b_len=2, r=1, scaling=1.0, rank_scale=0,
        rank_scale_len=0, bias=0, bias_len=0, out_scale=0, out_scale_len=0, y=y.data_ptr(),
        y_len=2, xa=0, xa_len=0, lbuf=lbuf.data_ptr(), lbuf_len=1, stream=0,
    )  # fmt: skip
    args.update(over)
    return args, keep


def test_valid_call_runs():
    mod = emu_module()
    args, keep = _fwd_args()
    mod.qlora_simt_forward(**args)
    assert torch.equal(keep[5], torch.zeros(2))  # x = 0: y = 0


@pytest.mark.parametrize(
    "over, msg",
    [
        (dict(x_dtype=4), "float32 (0), float16 (1), bfloat16 (2) or float64 (3)"),
        (dict(x_len=31), "x holds 31 elements, needs at least 32"),
        (dict(packed_len=31), "packed holds 31"),
        (dict(absmax_len=0), "absmax holds 0"),
        (dict(y_len=1), "y holds 1"),
        (dict(lora_a_len=31), "lora_A holds 31"),
        (dict(lora_b_len=1), "lora_B holds 1"),
        (dict(lbuf_len=0), "lbuf holds 0"),
        (dict(lbuf=0), "lbuf is a null pointer"),
        (dict(xa=1, xa_len=0), "xa holds 0"),
        (dict(rank_scale=1, rank_scale_len=0), "rank_scale holds 0"),
        (dict(bias=1, bias_len=1), "bias holds 1"),
        (dict(out_scale=1, out_scale_len=1), "out_scale holds 1"),
        (dict(nested_absmax=1, nested_absmax_len=0), "nested_absmax holds 0"),
        (dict(m=-1), "m"),
        (dict(n=0), "n"),
        (dict(blocksize=48), "blocksize must be a power of two"),
        (dict(quant_type=3), "quant_type must be"),
        (dict(scaling=float("inf")), "scaling must be finite"),
        (dict(k=2**40, x_len=2**40), "packed holds 32"),
        (dict(n=2**23, bias=0), "65535 column tiles"),
    ],
)
def test_host_checks(over, msg):
    mod = emu_module()
    if over.get("n") == 2**23:  # a valid-looking W of 2^23 rows: the grid limit is what fails
        over.update(packed_len=2**27, absmax_len=2**22, lora_b_len=2**23, y_len=2**23)
    args, _keep = _fwd_args(**over)
    with pytest.raises(
        ValueError,
        match="qpeft._C_cuda_emu.qlora_simt_forward: .*" + msg.replace("(", r"\(").replace(")", r"\)"),
    ):
        mod.qlora_simt_forward(**args)


def test_host_checks_dx():
    mod = emu_module()
    args, keep = _fwd_args()
    dy = torch.zeros(2)
    g = torch.empty(1)
    dxargs = dict(
        dy=dy.data_ptr(), dy_dtype=0, dy_len=2, m=1, k=32, packed=args["packed"], packed_len=32,
        absmax=args["absmax"], absmax_len=1, n=2, blocksize=64, quant_type=2, nested_absmax=0,
        nested_absmax_len=0, nested_code=0, offset=0, nested_blocksize=256, lora_a=args["lora_a"],
        lora_a_len=32, lora_b=args["lora_b"], lora_b_len=2, r=1, scaling=1.0, rank_scale=0,
        rank_scale_len=0, dx=args["x"], dx_len=32, g=g.data_ptr(), g_len=1, stream=0,
    )  # fmt: skip
    mod.qlora_simt_dx(**dxargs)
    for over, msg in (
        (dict(dy_len=1), "dy holds 1 elements, needs at least 2"),
        (dict(dx_len=31), "dx holds 31"),
        (dict(g_len=0), "g holds 0"),
        (dict(g=0), "g is a null pointer"),
        (dict(dy_dtype=7), "float64 \\(3\\)"),
    ):
        with pytest.raises(ValueError, match="qpeft._C_cuda_emu.qlora_simt_dx: .*" + msg):
            mod.qlora_simt_dx(**{**dxargs, **over})
