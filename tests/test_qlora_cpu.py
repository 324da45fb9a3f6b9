"""qlora_linear on CPU: the C++-backed panel path ("cpu") against the fp64 oracle of
tests/_helpers.py, beyond the per-case checks every backend gets (test_backends.py).

Both compute from the exactly decoded fp32 W with fp32 products and sums, so the oracle's
bounds apply with no operand rounding (``rounds_operands=False``): n * 2^-24 * sum|terms|
per fp32 dot, whatever the summation order, plus the final cast to the activation dtype.
The panel path is also run with tiny panels (``PANEL_ELEMS`` patched) so that panel
starts land on every alignment the quantization blocks allow.
"""

from __future__ import annotations

import pytest
import torch

import qpeft
from qpeft.backends.cpu import qlora as cpu_qlora
from qpeft.functional import qlora_linear

from ._helpers import CASES, case_id, check_qlora_linear, make_problem

# Panel-boundary cases: (dtype, M, N, K, r, quant_type, double_quant, blocksize, bias, rank_scale, out_scale)
PANEL_CASES = [
    (torch.float32, 3, 70, 96, 4, "nf4", True, 32, True, True, True),  # panel rows a multiple of 256*32/gcd
    (torch.bfloat16, 4, 130, 64, 8, "nf4", False, 64, True, False, False),  # one block per row
    (torch.float16, 2, 67, 50, 2, "fp4", False, 32, False, True, True),  # blocks straddle rows
]


@pytest.mark.parametrize("panel_elems", [1, 1000, 4096])
@pytest.mark.parametrize("case", PANEL_CASES, ids=case_id)
def test_panels(case, panel_elems, monkeypatch):
    # PANEL_ELEMS is the CPU backend's private panel size: patched so that panel starts
    # land on every alignment the quantization blocks allow.
    monkeypatch.setattr(cpu_qlora, "PANEL_ELEMS", panel_elems)
    monkeypatch.setattr(cpu_qlora, "SMALL_MAX_ELEMS", 0)  # these sizes would take the one-call path
    check_qlora_linear(make_problem(case), "cpu")


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


def test_panel_buffer_is_reused(monkeypatch):
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


def test_gradcheck_fp64_cpu_path():
    p = make_problem((torch.float64, 3, 7, 40, 2, "nf4", True, 32, True, True, True))
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
