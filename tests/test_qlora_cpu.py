"""qlora_linear on CPU: the C++-backed panel path ("cpu") against the fp64 oracle of
tests/_helpers.py, beyond the per-case checks every backend gets (test_backends.py).

Both compute from the exactly decoded fp32 W with fp32 products and sums, so the oracle's
bounds apply with no operand rounding (``rounds_operands=False``): n * 2^-24 * sum|terms|
per fp32 dot, whatever the summation order, plus the final cast to the activation dtype.
The panel path is also run with tiny panels (``PANEL_ELEMS`` patched) so that panel
starts land on every alignment the quantization blocks allow. At the avx2 level fp32
products go to the fused kernel instead (tests/test_qgemm_f32.py), so the panel tests
here switch it off (``no_fused``).
"""

from __future__ import annotations

import pytest
import torch

import qpeft
from qpeft.backends.cpu import qlora as cpu_qlora
from qpeft.functional import qlora_linear

from ._helpers import CASES, case_id, check_qlora_linear, make_problem


@pytest.fixture
def no_fused(monkeypatch):
    """The fp32 panel path even where the fused fp32 kernel would run."""
    monkeypatch.setattr(cpu_qlora.f32gemm, "active", lambda: False)


# Panel-boundary cases: (dtype, M, N, K, r, quant_type, double_quant, blocksize, bias, rank_scale, out_scale)
PANEL_CASES = [
    (torch.float32, 3, 70, 96, 4, "nf4", True, 32, True, True, True),  # panel rows a multiple of 256*32/gcd
    (torch.bfloat16, 4, 130, 64, 8, "nf4", False, 64, True, False, False),  # one block per row
    (torch.float16, 2, 67, 50, 2, "fp4", False, 32, False, True, True),  # blocks straddle rows
]


@pytest.mark.parametrize("panel_elems", [1, 1000, 4096])
@pytest.mark.parametrize("case", PANEL_CASES, ids=case_id)
def test_panels(case, panel_elems, monkeypatch, no_fused):
    # PANEL_ELEMS is the CPU backend's private panel size: patched so that panel starts
    # land on every alignment the quantization blocks allow.
    monkeypatch.setattr(cpu_qlora, "PANEL_ELEMS", panel_elems)
    monkeypatch.setattr(cpu_qlora, "SMALL_MAX_ELEMS", 0)  # these sizes would take the one-call path
    check_qlora_linear(make_problem(case), "cpu")


# Cases of the merged fp32 path (``merges_lora``: the LoRA term added to the decoded panel),
# with M above the GEMV's rows and the one-call path off: K, N on both sides of 2M, ranks
# 1..64, every scale on and off.
MERGE_CASES = [
    (torch.float32, 37, 70, 96, 4, "nf4", True, 32, True, True, True),
    (torch.float32, 40, 45, 83, 1, "fp4", False, 64, False, False, False),
    (torch.float32, 64, 130, 64, 64, "nf4", True, 64, True, False, True),
    (torch.bfloat16, 33, 67, 50, 8, "nf4", False, 32, False, True, False),
    (torch.float32, 300, 45, 200, 16, "nf4", True, 64, True, True, False),
]


@pytest.mark.parametrize("panel_elems", [1, 4096])
@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("case", MERGE_CASES, ids=case_id)
def test_lora_merged_into_panels(case, merge, panel_elems, monkeypatch, no_fused):
    # The merged and the composed order of the fp32 path both within the oracle's bounds
    # (the derivation is at ``merges_lora``), on single and many panels.
    monkeypatch.setattr(cpu_qlora, "PANEL_ELEMS", panel_elems)
    monkeypatch.setattr(cpu_qlora, "SMALL_MAX_ELEMS", 0)
    monkeypatch.setattr(cpu_qlora, "SMALL_BACKWARD_MAX_ROWS", 0)
    monkeypatch.setattr(cpu_qlora, "fp32_may_take_bf16", lambda m, n, k: False)
    calls = []
    real = cpu_qlora.merges_lora

    def spy(m, inner):
        calls.append((m, inner))
        return merge

    monkeypatch.setattr(cpu_qlora, "merges_lora", spy)
    p = make_problem(case)
    check_qlora_linear(p, "cpu")
    if cpu_qlora._compute_dtype(p["x"]) != torch.bfloat16:  # bf16 x on bf16 units: no fp32 panels
        assert calls, "the fp32 panel path never asked whether to merge"
    assert real(8, 16) and not real(8, 17)


def test_panel_rows_start_on_blocks():
    for k in (1, 50, 64, 83, 96, 4096, 11008):
        for bs in (32, 64, 4096):
            for nested in (None, 256):
                n = 10**6
                rows = cpu_qlora._panel_rows(n, k, bs, nested)
                # every panel but the last starts a block; a single panel (rows == n) is W itself
                assert 1 <= rows <= n and (rows == n or (rows * k) % (bs * (nested or 1)) == 0), (
                    k,
                    bs,
                    nested,
                )


def test_panel_buffer_is_reused(monkeypatch, no_fused):
    monkeypatch.setattr(cpu_qlora, "_workspace", type(cpu_qlora._workspace)())
    monkeypatch.setattr(cpu_qlora, "SMALL_MAX_ELEMS", 0)
    p = make_problem(CASES[0])
    with qpeft.use_backend("cpu"), torch.no_grad():
        qlora_linear(p["x"], p["packed"], p["state"], p["a"], p["b"], p["scaling"])
        first = getattr(cpu_qlora._workspace, "buf", None)
        qlora_linear(p["x"], p["packed"], p["state"], p["a"], p["b"], p["scaling"])
    # The first call decoded W (37 rows of x: the panel path, not the GEMV) into the buffer;
    # without this check a path that never used it would pass as None is None.
    assert first is not None and first.numel() >= p["w"].numel()
    assert cpu_qlora._workspace.buf is first  # no new allocation per call


def test_empty_batch():
    p = make_problem(CASES[0])
    x = p["x"][:0].clone().requires_grad_()
    with qpeft.use_backend("cpu"):
        y = qlora_linear(x, p["packed"], p["state"], p["a"], p["b"], p["scaling"])
        y.sum().backward()
    assert y.shape == (0, 45) and x.grad.shape == x.shape


@pytest.mark.parametrize("m", [3, 20])
def test_gradcheck_fp64_cpu_path(m, monkeypatch):
    # m = 20: the panel path with the LoRA term merged into W (K = 40 <= 2m, N = 7 <= 2m)
    monkeypatch.setattr(cpu_qlora, "SMALL_MAX_ELEMS", 0)
    monkeypatch.setattr(cpu_qlora, "SMALL_BACKWARD_MAX_ROWS", 0)
    p = make_problem((torch.float64, m, 7, 40, 2, "nf4", True, 32, True, True, True))
    args = [
        p["x"].double().requires_grad_(),
        p["a"].double().requires_grad_(),
        p["b"].double().requires_grad_(),
        p["bias"].double().requires_grad_(),
    ]

    def fn(x, a, b, bias):
        return qlora_linear(
            x,
            p["packed"],
            p["state"],
            a,
            b,
            p["scaling"],
            bias,
            rank_scale=p["rank_scale"].double(),
            out_scale=p["out_scale"].double(),
        )

    with qpeft.use_backend("cpu"):
        assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize(
    "needs",
    [
        (True, True, True, True),
        (True, False, False, False),
        (False, True, False, False),
        (False, False, True, True),
    ],
)
@pytest.mark.parametrize("scales", [False, True])
def test_composed_backward_orientation(needs, scales):
    """The composed fp32 backward takes its rank-r products as [r, *] GEMMs (g^T = B^T dy^T,
    dA = gs^T x, dB = (xs^T dy)^T; ``_backward_composed``) and the forward returns xa as the
    transposed view of A x^T. Against the reference backend for every subset of gradients,
    a non-contiguous grad_y, rank_scale and out_scale, and an xa of either layout: both are
    fp32 sums of the same products in some order, so each element differs from the fp64
    value by at most L * 2^-24 * sum|terms| (L the products and nested sums it adds up:
    N + r for dx, N + M for dA, K + M for dB), and the two by twice that."""
    from qpeft.backends.default import qlora as ref_qlora

    m, n, k, r = 40, 70, 96, 4  # 40 rows: the composed path, not the one-call small kernels
    p = make_problem((torch.float32, m, n, k, r, "nf4", True, 32, False, scales, scales))
    st = p["state"]
    quant = (p["packed"], st.absmax, st.state2.absmax, st.state2.code, torch.tensor([st.offset]), 32)
    quant = (*quant, st.state2.blocksize, "nf4", n, k)
    rs, os_ = (p["rank_scale"], p["out_scale"]) if scales else (None, None)
    s = p["scaling"]
    x, a, b = p["x"], p["a"], p["b"]
    y, xa = cpu_qlora.qlora_linear(x, *quant, a, b, s, None, rs, os_, True)
    assert xa.shape == (m, r)
    gy = torch.randn(n, m).t()  # non-contiguous
    w = p["w"].double()
    dy = gy.double() * (1.0 if os_ is None else os_.double())
    rsd = 1.0 if rs is None else rs.double()
    u = 2.0**-24
    ad, bd, xd = a.double().abs(), b.double().abs(), x.double().abs()
    gabs = dy.abs() @ bd * abs(s) * (rsd.abs() if rs is not None else 1.0)
    bounds = (
        2 * (n + r + 2) * u * (dy.abs() @ w.abs() + gabs @ ad),
        2 * (n + m + 2) * u * (gabs.t() @ xd),
        2
        * (k + m + 2)
        * u
        * (dy.abs().t() @ (xd @ ad.t() * abs(s) * (rsd.abs() if rs is not None else 1.0))),
    )
    for xa_in in (xa, xa.contiguous()):
        got = cpu_qlora.qlora_linear_backward(gy, x, *quant, a, b, xa_in, s, rs, os_, *needs)
        want = ref_qlora.qlora_linear_backward(gy, x, *quant, a, b, xa.contiguous(), s, rs, os_, *needs)
        for i, need in enumerate(needs):
            if not need:
                assert got[i].numel() == 0
                continue
            assert got[i].shape == want[i].shape and got[i].dtype == want[i].dtype
            assert got[i].is_contiguous()
            diff = (got[i].double() - want[i].double()).abs()
            bound = bounds[i] if i < 3 else 2 * (m + 2) * u * dy.abs().sum(0)
            assert bool((diff <= bound + 1e-30).all()), (i, float((diff - bound).max()))
