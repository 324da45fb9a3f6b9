"""The CUDA C++ fused dequant + LoRA GEMM (csrc/cuda/qlora_gemm.cu) run by the CUDA emulation
(backend "cuda_emulated", qpeft._C_cuda_emu) against the fp64 oracle.

Tolerances: ``_helpers.oracle(p, dt, rounds_operands=True)``, the bounds derived above U_OP in
qpeft/testing.py, hold for this kernel as they hold for the Triton one, because it rounds the
same operands: W is decoded in fp32 (code * absmax, exact) and rounded once to x's dtype
(fp16: the oracle multiplies fp16(W) itself, so no term; bf16: u = 2^-8 <= U_OP's 2^-7);
t = s * xa * rank_scale and dy' = dy * out_scale are rounded to x's dtype (u_op); a product of
two fp16/bf16 values is exact in fp32 and the MMAs accumulate in fp32 over K (+ the LoRA and
bias adds: the (k + r + 4) U32 terms; the split schedule's partial sums and its reduce form
another summation order of the same terms, which the order-free bound covers); y, xa and dx
are rounded once to x's dtype (u_out). g = dy' @ B is returned in fp32 and dA, dB are fp32
matmuls on the CPU, as the oracle's dA/dB bounds assume (xa stored in x's dtype).

Shapes: the block tile is 64 rows x 128 output columns with a reduction chunk of 32, so M = 1,
37, 70 and N = 45, 130 cut row and column tiles; K = 96 takes the 16-byte cp.async paths (K %
32 == 0), K = 200 the 16-byte activation path with the per-element W path (K % 32 != 0), K =
83 the per-element paths of both; the emulated device has 4 SMs (native/qlora.py,
EMULATED_SMS), so the small-M cases take the split schedule.
"""

from __future__ import annotations

import pytest
import torch

import qpeft
from qpeft.backends.native import qlora as native_qlora
from qpeft.functional import qlora_linear

from ._helpers import assert_within
from ._helpers import make_problem as _problem
from ._helpers import oracle as _oracle
from .emu_support import emu_module

# (dtype, M, N, K, r, quant_type, double_quant, blocksize, bias, rank_scale, out_scale)
CASES = [
    (torch.bfloat16, 37, 45, 96, 8, "nf4", True, 64, True, True, True),
    (torch.float16, 37, 130, 96, 4, "fp4", False, 32, False, False, True),
    (torch.bfloat16, 1, 45, 200, 16, "fp4", True, 32, True, False, False),
    (torch.float16, 1, 130, 83, 64, "nf4", False, 64, True, True, False),
    (torch.bfloat16, 70, 45, 83, 32, "nf4", False, 128, False, True, True),
    (torch.float16, 5, 45, 256, 24, "nf4", True, 32, True, True, True),
    (torch.bfloat16, 300, 130, 128, 16, "fp4", True, 64, True, True, False),  # 5 row tiles
]


def _id(case):
    dt, m, n, k, r, qt, dq, bs, bias, rs, os_ = case
    flags = "".join(f for f, on in (("b", bias), ("R", rs), ("O", os_)) if on) or "-"
    return f"{str(dt)[6:]}-{m}x{n}x{k}-r{r}-{qt}{'-dq' if dq else ''}-bs{bs}-{flags}"


@pytest.fixture(autouse=True)
def _emu():
    emu_module()


def _run(p, *, backend="cuda_emulated", a=None, b=None):
    x = p["x"].clone().requires_grad_()
    a = (p["a"] if a is None else a).clone().requires_grad_()
    b = (p["b"] if b is None else b).clone().requires_grad_()
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


def _check(p, got, dt):
    ref = _oracle(p, dt, rounds_operands=True)
    y, dx, da, db, dbias = got
    assert y.dtype == dt and dx.dtype == dt
    assert_within(y, *ref["y"], "y")
    assert_within(dx, *ref["dx"], "dx")
    assert_within(da, *ref["dA"], "dA")
    assert_within(db, *ref["dB"], "dB")
    if dbias is not None:
        assert_within(dbias, *ref["dbias"], "dbias")


@pytest.fixture
def calls(monkeypatch):
    """Counts the emulated kernel's entry points (so a silent fallback cannot pass)."""
    mod = emu_module()
    seen = {"qlora_forward": 0, "qlora_dx": 0}
    for name in seen:
        real = getattr(mod, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(mod, name, spy)
    return seen


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward_backward_against_oracle(case, calls):
    p = _problem(case, seed=3)
    _check(p, _run(p), case[0])
    assert calls == {"qlora_forward": 1, "qlora_dx": 1}


def test_split_and_unsplit_schedules_agree_with_oracle(monkeypatch):
    """M = 37 forced through the split schedule (3 splits of K = 96 and of N = 130), and
    M = 1 forced unsplit: both within the oracle's bounds."""
    case = (torch.bfloat16, 37, 130, 96, 16, "nf4", True, 32, True, True, True)
    p = _problem(case, seed=5)
    monkeypatch.setattr(native_qlora, "plan_split", lambda m, o, red, dev: 3)
    _check(p, _run(p), torch.bfloat16)
    case1 = (torch.float16, 1, 45, 200, 8, "fp4", False, 64, False, False, False)
    p1 = _problem(case1, seed=6)
    monkeypatch.setattr(native_qlora, "plan_split", lambda m, o, red, dev: 1)
    _check(p1, _run(p1), torch.float16)


def test_split_plan():
    """Splits only where one row tile leaves SMs idle, never an empty split, partials bounded."""
    cpu = torch.device("cpu")  # the emulated device: native_qlora.EMULATED_SMS SMs
    assert native_qlora.plan_split(5, 45, 256, cpu) == 2
    assert native_qlora.plan_split(65, 45, 4096, cpu) == 1  # two row tiles: no split
    assert native_qlora.plan_split(1, 45, 96, cpu) == 1  # 3 chunks: too few to split
    assert native_qlora.plan_split(1, 4 * 128, 4096, cpu) == 1  # the column tiles fill the SMs
    for m in (1, 7, 64):
        for red in (32, 100, 1000, 4096, 11008):
            split = native_qlora.plan_split(m, 100, red, cpu)
            chunks = -(red // -32)
            per = -(chunks // -split)
            assert 1 <= split <= chunks and -(chunks // -per) == split
            assert split == 1 or split <= red // (16 * m)


def test_split_without_adapter(monkeypatch):
    """The split schedule with r = 0: partials of x W^T only, bias and out_scale in the reduce."""
    case = (torch.float16, 3, 130, 256, 8, "nf4", True, 32, True, False, True)
    p = _problem(case, seed=11)
    st = p["state"]
    nested = (st.absmax, st.state2.absmax, st.state2.code, st.offset) if st.nested else None
    assert nested is not None
    monkeypatch.setattr(native_qlora, "plan_split", lambda m, o, red, dev: 4)
    args = (p["packed"], *nested, st.blocksize, st.state2.blocksize, st.quant_type, 130, 256)
    with qpeft.use_backend("cuda_emulated"):
        y, xa = torch.ops.qpeft.qlora_linear(
            p["x"], *args, None, None, 1.0, p["bias"], None, p["out_scale"], True
        )
    zero = dict(p, a=torch.zeros_like(p["a"]), b=torch.zeros_like(p["b"]))
    assert xa.numel() == 0
    assert_within(y, *_oracle(zero, torch.float16, rounds_operands=True)["y"], "y (split, no adapter)")


def test_xa_output_and_no_adapter():
    """return_xa: xa = x @ A^T rounded to x's dtype; without an adapter y = (x W^T + bias) *
    out_scale and xa is empty."""
    case = (torch.float16, 37, 45, 96, 8, "nf4", False, 64, True, False, True)
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
    ref = _oracle(p, torch.float16, rounds_operands=True)
    assert_within(y, *ref["y"], "y")
    assert_within(xa, *ref["xa"], "xa")
    assert xa0.numel() == 0
    zero = dict(p, a=torch.zeros_like(p["a"]), b=torch.zeros_like(p["b"]))  # the oracle of no adapter
    assert_within(y0, *_oracle(zero, torch.float16, rounds_operands=True)["y"], "y (no adapter)")


def test_unaligned_pointers_and_mixed_lora_dtypes():
    """x, A, B at odd element offsets (base pointers not 16-byte aligned: the per-element
    paths) and fp32 LoRA weights holding bf16 values (cast to x's dtype exactly)."""
    case = (torch.bfloat16, 37, 45, 96, 8, "nf4", True, 64, True, False, False)
    p = _problem(case, seed=8)
    x_buf = torch.empty(p["x"].numel() + 1, dtype=torch.bfloat16)
    x_buf[1:] = p["x"].reshape(-1)
    p["x"] = x_buf[1:].view(37, 96)
    assert p["x"].data_ptr() % 16 != 0
    got = _run(p, a=p["a"].float(), b=p["b"].float())
    _check(p, got, torch.bfloat16)
    assert got[2].dtype == torch.float32 and got[3].dtype == torch.float32


# Ranks above 64: the BR = 64 kernel in rank chunks of 64 (the main pass fuses ranks 0..63,
# one more pass per further chunk). 65 leaves a 1-rank chunk; K = 83 takes the per-element
# paths; M = 70 two row tiles; M = 5 the split schedule of the forward (2 splits of K = 256).
HIGH_RANK_CASES = [
    (torch.bfloat16, 37, 130, 96, 65, "nf4", True, 64, True, True, True),
    (torch.float16, 5, 45, 256, 128, "fp4", False, 32, True, True, True),
    (torch.bfloat16, 70, 45, 83, 256, "nf4", True, 64, False, True, False),
    (torch.float16, 1, 130, 96, 256, "nf4", False, 64, True, False, True),
]


@pytest.mark.parametrize("case", HIGH_RANK_CASES, ids=_id)
def test_high_rank_chunks_against_oracle(case, calls):
    p = _problem(case, seed=12)
    _check(p, _run(p), case[0])
    assert calls == {"qlora_forward": 1, "qlora_dx": 1}


@pytest.mark.parametrize("dt, r", [(torch.float16, 256), (torch.bfloat16, 65)])
def test_high_rank_split_and_unsplit(dt, r, monkeypatch):
    """The same problem through 3 splits (the rank-chunk passes write L's partials) and unsplit."""
    case = (dt, 37, 130, 96, r, "nf4", True, 32, True, True, True)
    p = _problem(case, seed=13)
    for split in (3, 1):
        monkeypatch.setattr(native_qlora, "plan_split", lambda m, o, red, dev, _s=split: _s)
        _check(p, _run(p), dt)


def test_routes_to_simt(calls, monkeypatch):
    """fp32 activations and ranks above qlora_max_rank take the SIMT kernel
    (tests/test_cuda_qlora_simt.py), never the tensor-core one nor the reference."""
    simt = {"fwd": 0, "dx": 0}
    mod = emu_module()
    for name, key in (("qlora_simt_forward", "fwd"), ("qlora_simt_dx", "dx")):
        real = getattr(mod, name)

        def spy(*args, _real=real, _key=key, **kwargs):
            simt[_key] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(mod, name, spy)
    monkeypatch.setattr(native_qlora.reference, "qlora_linear", None)  # would raise if called
    monkeypatch.setattr(native_qlora.reference, "qlora_linear_backward", None)
    for case in (
        (torch.float32, 5, 45, 96, 8, "nf4", False, 64, True, True, True),
        (torch.bfloat16, 5, 45, 96, 4097, "nf4", False, 64, True, False, False),
    ):
        p = _problem(case, seed=9)
        got = _run(p)
        assert got[0].dtype == case[0]
    assert calls == {"qlora_forward": 0, "qlora_dx": 0}
    assert simt == {"fwd": 2, "dx": 2}
    assert emu_module().qlora_max_rank == 4096


def _fwd_args(mod, **over):
    """A valid qlora_forward call on tiny buffers (m=1, n=2, k=32, r=1), with overrides."""
    x = torch.zeros(32, dtype=torch.bfloat16)
    packed = torch.zeros(32, dtype=torch.uint8)
    absmax = torch.ones(1)
    a = torch.zeros(32, dtype=torch.bfloat16)
    b = torch.zeros(2, dtype=torch.bfloat16)
    y = torch.empty(2, dtype=torch.bfloat16)
    keep = (x, packed, absmax, a, b, y)
    args = dict(
        x=x.data_ptr(), x_dtype=2, x_len=32, m=1, k=32, packed=packed.data_ptr(), packed_len=32,
        absmax=absmax.data_ptr(), absmax_len=1, n=2, blocksize=64, quant_type=2, nested_absmax=0,
        nested_absmax_len=0, nested_code=0, offset=0, nested_blocksize=256, lora_a=a.data_ptr(),
        lora_a_len=32, lora_b=b.data_ptr(), lora_b_len=2, r=1, scaling=1.0, rank_scale=0,
        rank_scale_len=0, bias=0, bias_len=0, out_scale=0, out_scale_len=0, y=y.data_ptr(),
        y_len=2, xa=0, xa_len=0, split=1, workspace=0, workspace_len=0, stream=0,
    )  # fmt: skip
    args.update(over)
    return args, keep


@pytest.mark.parametrize(
    "over, msg",
    [
        (dict(x_dtype=0), "float16 (1) or bfloat16 (2)"),
        (dict(x_len=31), "x holds 31 elements, needs at least 32"),
        (dict(packed_len=31), "packed holds 31"),
        (dict(absmax_len=0), "absmax holds 0"),
        (dict(y_len=1), "y holds 1"),
        (dict(lora_a_len=31), "lora_A holds 31"),
        (dict(lora_b_len=1), "lora_B holds 1"),
        (dict(r=4097), "rank of at most 4096"),
        (dict(split=2), "split must be in"),
        (dict(split=0), "split must be in"),
        (dict(blocksize=48), "blocksize must be a power of two"),
        (dict(quant_type=3), "quant_type must be"),
        (dict(scaling=float("inf")), "scaling must be finite"),
        (dict(k=2**40, x_len=2**40), "packed holds 32"),
    ],
)
def test_host_checks(over, msg):
    mod = emu_module()
    args, _keep = _fwd_args(mod, **over)
    with pytest.raises(
        ValueError, match="qpeft._C_cuda_emu.qlora_forward: .*" + msg.replace("(", r"\(").replace(")", r"\)")
    ):
        mod.qlora_forward(**args)


def test_host_checks_dx_and_workspace():
    mod = emu_module()
    args, _keep = _fwd_args(mod, k=64, x_len=64, packed_len=64, absmax_len=2, lora_a_len=64)
    ws_len = mod.qlora_workspace_len(1, 2, 1, 2)
    assert ws_len == 2 * 1 * 2 + 2 * 1 * 1 + 1
    with pytest.raises(ValueError, match="qlora_forward: workspace holds 0 elements, needs at least 7"):
        mod.qlora_forward(**{**args, "split": 2})
    dy = torch.zeros(2, dtype=torch.bfloat16)
    with pytest.raises(
        ValueError, match=r"qpeft._C_cuda_emu.qlora_dx: dy holds 2 elements, needs at least 3"
    ):
        mod.qlora_dx(
            dy.data_ptr(), 2, 2, 1, 64, args["packed"], 64, args["absmax"], 2, 3, 64, 2, 0, 0, 0, 0, 256,
            0, 0, 0, 0, 0, 1.0, 0, 0, args["y"], 64, 0, 0, 1, 0, 0, 0,
        )  # fmt: skip
