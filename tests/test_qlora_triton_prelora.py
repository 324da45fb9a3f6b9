"""The precomputed LoRA down-projection of the fused QLoRA kernels at large M (PRE_LORA;
triton_kernels/qlora.py ``use_pre_lora``, ``lora_down``; docs/design.md, "Triton configs:
the precomputed down-projection").

At M >= PRE_LORA_M (2048) with an adapter and the unsplit kernel, on an sm_90
(PRE_LORA_ARCHS), the launcher computes
x @ A^T (dx: dy' @ B) once in fp32 with ``qlora_lora_down_kernel`` and runs the main kernel
with PRE_LORA, which reads that product in its epilogue instead of accumulating it in the
loop. Under the interpreter the shapes are small, so the tests lower PRE_LORA_M (and
SPLIT_M, so that M = 17..40 is not the split schedule's) and report an sm_90 to take that
regime with the launcher's own rule.

Bounds: the fp64 oracle's (qpeft/testing.py ``oracle``). The precomputed product is the
same products of the same 16-bit (or fp32) operands accumulated in fp32, in another order
(BLOCK_C-wide steps instead of the main loop's): the oracle's xa bound k u |x||A| (g: n u
|dy'||B|) and the t terms it feeds hold for any summation order (Higham's gamma bound, as in
tests/test_qlora_triton_splitk.py), and xa is rounded once to x's dtype as the fused kernel
stores it. So the bounds are the unchanged oracle's.
"""

from __future__ import annotations

import pytest
import torch

import qpeft
from qpeft.backends.triton.qlora import _kernels
from qpeft.functional import qlora_linear
from qpeft.testing import U32

from ._helpers import assert_bits_equal, assert_within, triton_test_device
from ._helpers import make_problem as _problem
from ._helpers import oracle as _oracle
from .test_qlora_triton_splitk import _dx, _dyp, _fwd


@pytest.fixture(autouse=True)
def _on_triton_device():
    with triton_test_device():
        yield


@pytest.fixture
def large_m(monkeypatch):
    """M = 17.. takes the PRE_LORA regime: the unsplit kernel (M > SPLIT_M) and M >= PRE_LORA_M."""
    kern = _kernels()
    monkeypatch.setattr(kern, "SPLIT_M", 16)
    monkeypatch.setattr(kern, "PRE_LORA_M", 17)
    monkeypatch.setattr(kern, "_arch", lambda device: 90)  # the rule's arch (PRE_LORA_ARCHS)
    calls = []
    real = kern.lora_down

    def spy(a, lmat, br):
        calls.append((tuple(a.shape), tuple(lmat.shape), br))
        return real(a, lmat, br)

    monkeypatch.setattr(kern, "lora_down", spy)
    return calls


# (dtype, M, N, K, r, quant type, double quant, blocksize, bias, rank_scale, out_scale)
CASES = [
    # K % blocksize == 0: the register decode; NF4 + DQ, every epilogue term on
    (torch.bfloat16, 33, 45, 128, 16, "nf4", True, 64, True, True, True),
    # quant blocks straddle rows (per-element decode); r = 4, no epilogue terms
    (torch.float16, 20, 45, 150, 4, "nf4", True, 32, False, False, False),
    (torch.bfloat16, 20, 45, 150, 4, "fp4", False, 32, False, True, False),
    # r = 65: BLOCK_R = 128 (the "hi" bucket), partial M, N and r tiles
    (torch.bfloat16, 17, 33, 96, 65, "nf4", True, 32, True, False, True),
    (torch.float16, 17, 17, 64, 65, "nf4", True, 64, False, True, True),
]


def _ids(case):
    dt, m, n, k, r, qt, dq, bs, bias, rs, os_ = case
    flags = "".join(f for f, on in (("b", bias), ("R", rs), ("O", os_)) if on) or "-"
    return f"{str(dt)[6:]}-{m}x{n}x{k}-r{r}-{qt}{'-dq' if dq else ''}-bs{bs}-{flags}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_pre_lora_matches_oracle(large_m, case):
    p = _problem(case, seed=case[1] + case[4])
    ref = _oracle(p, case[0])
    y, xa = _fwd(p, True, None)
    dx, g = _dx(p, True, None)
    m, n, k, r = case[1], case[2], case[3], case[4]
    # the launcher took the precomputed variant, once per kernel, with its BLOCK_R
    br = max(16, 1 << (r - 1).bit_length())
    assert large_m == [((m, k), (k, r), br), ((m, n), (n, r), br)]
    assert_within(y, *ref["y"], "y")
    assert_within(xa, *ref["xa"], "xa")
    assert_within(dx, *ref["dx"], "dx")
    assert xa.dtype == case[0] and g.dtype == torch.float32 and g.shape == (m, r)
    dyp, b = _dyp(p).double(), p["b"].double()
    assert_within(g, dyp @ b, n * U32 * (dyp.abs() @ b.abs()), "g")  # fp32 g, depth n


@pytest.mark.parametrize("case", [CASES[2]], ids=_ids)
def test_pre_lora_through_the_op_and_autograd(large_m, case):
    """qlora_linear forward and backward on the Triton backend in the PRE_LORA regime: y,
    dx, dA (from the precomputed g), dB (from the precomputed xa) within the oracle."""
    p = _problem(case, seed=7)
    ref = _oracle(p, case[0])
    x = p["x"].clone().requires_grad_()
    a = p["a"].clone().requires_grad_()
    b = p["b"].clone().requires_grad_()
    with qpeft.use_backend("triton"):
        y = qlora_linear(
            x,
            p["packed"],
            p["state"],
            a,
            b,
            p["scaling"],
            p["bias"],
            rank_scale=p["rank_scale"],
            out_scale=p["out_scale"],
        )
        y.backward(p["dy"])
    assert len(large_m) == 2  # forward and dx both precomputed
    assert_within(y.detach(), *ref["y"], "y")
    assert_within(x.grad, *ref["dx"], "dx")
    assert_within(a.grad, *ref["dA"], "dA")
    assert_within(b.grad, *ref["dB"], "dB")


def test_pre_lora_forward_is_the_fused_forward_under_the_interpreter(monkeypatch):
    """Under the interpreter the down kernel's C steps (64) are the fused loop's K tiles and
    its row blocks (16) the main kernel's, so x @ A^T is summed in the same order: y and xa
    are the fused kernel's bit for bit (on a GPU the orders differ; the bounds above hold)."""
    kern = _kernels()
    if not kern.interpreting():
        pytest.skip("the order argument is the interpreter's tile sizes")
    case = CASES[2]
    p = _problem(case, seed=3)
    monkeypatch.setattr(kern, "SPLIT_M", 16)
    monkeypatch.setattr(kern, "_arch", lambda device: 90)
    y_fused, xa_fused = _fwd(p, True, None)  # PRE_LORA_M = 2048: fused
    monkeypatch.setattr(kern, "PRE_LORA_M", 17)
    y_pre, xa_pre = _fwd(p, True, None)
    assert_bits_equal(y_pre, y_fused)
    assert_bits_equal(xa_pre, xa_fused)  # both stored by the main kernel from the same fp32 sums


class _Recorder:
    """Stands in for a @triton.jit kernel: records each launch's grid and arguments."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launches.append((grid, args, kwargs))

        return run


@pytest.mark.parametrize(
    ("m", "r", "lora", "arch", "pre"),
    [
        (4096, 16, True, 90, True),
        (2048, 256, True, 90, True),  # the "hi" bucket: 32 x 64 down tiles
        (2047, 16, True, 90, False),  # below PRE_LORA_M: the fused recompute
        (300, 16, True, 90, False),
        (32, 16, True, 90, False),  # the split schedule (M <= SPLIT_M)
        (4096, 0, False, 90, False),  # no adapter: nothing to precompute
        (4096, 16, True, 80, False),  # sm_80: not in PRE_LORA_ARCHS (its PRE_LORA loop is longer)
        (4096, 16, True, 100, False),  # no SASS evidence for other archs
    ],
)
def test_launch_decision_as_on_a_gpu(monkeypatch, m, r, lora, arch, pre):
    """The real rule with the interpreter off and recording kernels (nothing compiled or
    run): PRE_LORA and the down-projection launch exactly at M >= PRE_LORA_M with an
    adapter on an sm_90, for the forward and dx; its grid and tile are ``_DOWN_CONFIGS``'."""
    kern = _kernels()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(kern, "_arch", lambda device: arch)
    monkeypatch.delenv("QPEFT_TRITON_AUTOTUNE", raising=False)
    kern.default_config.cache_clear()
    rec = {
        name: _Recorder()
        for name in (
            "qlora_fwd_kernel",
            "qlora_dx_kernel",
            "qlora_lora_down_kernel",
            "qlora_fwd_split_kernel",
            "qlora_dx_split_kernel",
            "qlora_split_reduce_kernel",
        )
    }
    for name, r_ in rec.items():
        monkeypatch.setattr(kern, name, r_)
    n, k = 4096, 4096
    x = torch.zeros(m, k, dtype=torch.bfloat16, device="cpu")
    dy = torch.zeros(m, n, dtype=torch.bfloat16, device="cpu")
    packed = torch.zeros(n * k // 2, dtype=torch.uint8, device="cpu")
    absmax = torch.ones(n * k // 64, device="cpu")
    code = torch.zeros(16, device="cpu")
    a, b = (torch.zeros(r, k, device="cpu"), torch.zeros(n, r, device="cpu")) if lora else (None, None)
    state = (packed, absmax, None, None, None, code, 64, 256, n, k, a, b, 1.0)
    _, xa = kern.qlora_forward(x, *state, return_xa=True)
    _, g = kern.qlora_dx(dy, *state, return_g=True)
    kern.default_config.cache_clear()
    if m <= kern.SPLIT_M:
        assert rec["qlora_fwd_split_kernel"].launches and not rec["qlora_fwd_kernel"].launches
        assert not rec["qlora_lora_down_kernel"].launches
        return
    for name in ("qlora_fwd_kernel", "qlora_dx_kernel"):
        ((_, _, kwargs),) = rec[name].launches
        assert kwargs["PRE_LORA"] is pre
        # with PRE_LORA the forward still stores xa (the product in x's dtype); dx does not
        # store g: the launcher returns the fp32 product itself
        if name == "qlora_fwd_kernel":
            assert kwargs["WRITE_XA"] is lora
        else:
            assert kwargs["WRITE_G"] is (lora and not pre)
    down = rec["qlora_lora_down_kernel"].launches
    assert len(down) == (2 if pre else 0)
    if pre:
        br = kern.block_r(r, m)
        bm, bc, warps, stages = kern._DOWN_CONFIGS["lo" if br <= 64 else "hi"]
        for (grid, args, kwargs), c in zip(down, (k, n)):
            assert grid == (-(-m // bm),)
            assert args[3:6] == (m, c, r)
            assert (kwargs["BLOCK_M"], kwargs["BLOCK_C"], kwargs["BLOCK_R"]) == (bm, bc, br)
            assert (kwargs["num_warps"], kwargs["num_stages"]) == (warps, stages)
        assert xa.shape == (m, r) and xa.dtype == torch.bfloat16
        assert g.shape == (m, r) and g.dtype == torch.float32
