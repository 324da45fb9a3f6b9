"""qlora_linear on CPU: the reference ("default") and the C++-backed panel path ("cpu")
against the fp64 oracle of test_qlora_triton.py.

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

from .test_qlora_triton import CASES, _ids, _oracle, _problem, assert_within

# Panel-boundary cases: (dtype, M, N, K, r, quant_type, double_quant, blocksize, bias, rank_scale, out_scale)
PANEL_CASES = [
    (torch.float32, 3, 70, 96, 4, "nf4", True, 32, True, True, True),  # panel rows a multiple of 256*32/gcd
    (torch.bfloat16, 4, 130, 64, 8, "nf4", False, 64, True, False, False),  # one block per row
    (torch.float16, 2, 67, 50, 2, "fp4", False, 32, False, True, True),  # blocks straddle rows
]


def _run(case, backend, panel_elems=None, monkeypatch=None):
    dt = case[0]
    p = _problem(case)
    if panel_elems is not None:
        monkeypatch.setattr(cpu_qlora, "PANEL_ELEMS", panel_elems)
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
    ref = _oracle(p, dt, rounds_operands=False)
    y_want, tol_y = ref["y"]
    m, k = p["x"].shape
    if backend == "cpu" and m <= cpu_qlora.GEMV_MAX_ROWS:
        # x @ W^T is the C++ GEMV here: summation depth 2 * (blocksize + K / blocksize) + 8 and
        # one more rounding from factoring each block's absmax out (tests/test_gemv_cpu.py)
        bs = p["state"].blocksize
        depth = 2 * (bs + -(-k // bs)) + 9
        s_base = p["x"].double().abs() @ p["w"].abs().T
        os_ = p["out_scale"].double().abs() if p["out_scale"] is not None else 1.0
        tol_y = tol_y + os_ * depth * 2.0**-24 * s_base * 1.01  # 1.01: gamma_h vs h*u at these h
    assert y.dtype == dt
    assert_within(y.detach(), y_want, tol_y, f"{backend} y")
    assert_within(x.grad, *ref["dx"], f"{backend} dx")
    assert_within(a.grad, *ref["dA"], f"{backend} dA")
    assert_within(b.grad, *ref["dB"], f"{backend} dB")
    if bias is not None:
        assert_within(bias.grad, *ref["dbias"], f"{backend} dbias")


@pytest.mark.parametrize("backend", ["default", "cpu"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_forward_and_grads(case, backend):
    _run(case, backend)


@pytest.mark.parametrize("panel_elems", [1, 1000, 4096])
@pytest.mark.parametrize("case", PANEL_CASES, ids=_ids)
def test_panels(case, panel_elems, monkeypatch):
    _run(case, "cpu", panel_elems, monkeypatch)


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
    p = _problem(CASES[0])
    with qpeft.use_backend("cpu"), torch.no_grad():
        qlora_linear(p["x"], p["packed"], p["state"], p["a"], p["b"], p["scaling"])
        first = cpu_qlora._workspace.buf
        qlora_linear(p["x"], p["packed"], p["state"], p["a"], p["b"], p["scaling"])
    assert cpu_qlora._workspace.buf is first  # no new allocation per call


def test_empty_batch():
    p = _problem(CASES[0])
    x = p["x"][:0].clone().requires_grad_()
    with qpeft.use_backend("cpu"):
        y = qlora_linear(x, p["packed"], p["state"], p["a"], p["b"], p["scaling"])
        y.sum().backward()
    assert y.shape == (0, 45) and x.grad.shape == x.shape


def test_gradcheck_fp64_cpu_path():
    p = _problem((torch.float64, 3, 7, 40, 2, "nf4", True, 32, True, True, True))
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
