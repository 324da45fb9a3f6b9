"""The CPU QLoRA layer's compute dtype by capability (qpeft/backends/cpu/capability.py) and
its bf16 mode against the fp64 oracle, with the bounds derived in tests/_bf16_bounds.py.

``QPEFT_CPU_COMPUTE=bf16`` forces the bf16 mode, so these run on any CPU (without bf16
units oneDNN emulates bf16: slower, same rounding); ``auto`` takes it only for bf16 x on a
CPU with bf16 dot products, and ``fp32`` keeps the fp32 path and its bounds.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qpeft
from qpeft.backends.cpu import capability
from qpeft.backends.cpu import qlora as cpu_qlora
from qpeft.functional import qlora_linear
from qpeft.nn import Linear4bit

from ._bf16_bounds import U_BF16, bf16_oracle, rho
from ._helpers import assert_within, case_id, check_qlora_linear, make_problem

# (dtype, M, N, K, r, quant_type, double_quant, blocksize, bias, rank_scale, out_scale)
BF16_CASES = [
    (torch.bfloat16, 9, 45, 83, 8, "nf4", True, 64, True, True, True),  # K not a multiple of blocksize
    (torch.bfloat16, 16, 33, 128, 4, "fp4", False, 32, False, False, False),  # odd N
    (torch.bfloat16, 64, 70, 96, 16, "nf4", True, 32, True, False, True),
    (torch.bfloat16, 513, 31, 72, 2, "nf4", False, 64, True, True, False),  # M over a GEMM block
    (torch.bfloat16, 5, 45, 83, 8, "nf4", True, 64, True, True, True),  # M <= 8: the fp32 GEMV
    (torch.float32, 20, 17, 150, 8, "fp4", True, 32, False, True, True),  # fp32 x rounded to bf16
    (torch.float16, 12, 19, 64, 4, "nf4", False, 64, True, False, False),
]


@pytest.fixture
def bf16_mode(monkeypatch):
    monkeypatch.setenv(capability.COMPUTE_ENV, "bf16")


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of the bf16 forward and backward, to prove the mode ran."""
    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = cpu_qlora._forward_bf16, cpu_qlora._backward_bf16

    def f(*a, **kw):
        calls["fwd"] += 1
        return fwd(*a, **kw)

    def b(*a, **kw):
        calls["bwd"] += 1
        return bwd(*a, **kw)

    monkeypatch.setattr(cpu_qlora, "_forward_bf16", f)
    monkeypatch.setattr(cpu_qlora, "_backward_bf16", b)
    return calls


# --- capability -------------------------------------------------------------------------------


def test_compute_dtype_choices(monkeypatch):
    monkeypatch.setenv(capability.COMPUTE_ENV, "fp32")
    assert capability.compute_dtype(torch.bfloat16) == torch.float32
    monkeypatch.setenv(capability.COMPUTE_ENV, "bf16")
    assert capability.compute_dtype(torch.float32) == torch.bfloat16
    assert capability.compute_dtype(torch.float64) == torch.float64  # gradcheck keeps fp64
    monkeypatch.setenv(capability.COMPUTE_ENV, "auto")
    want = torch.bfloat16 if capability.bf16_dot_products() else torch.float32
    assert capability.compute_dtype(torch.bfloat16) == want
    assert capability.compute_dtype(torch.float32) == torch.float32
    assert capability.compute_dtype(torch.float16) == torch.float32
    monkeypatch.delenv(capability.COMPUTE_ENV)
    assert capability.compute_dtype(torch.bfloat16) == want


def test_compute_env_rejects_unknown(monkeypatch):
    monkeypatch.setenv(capability.COMPUTE_ENV, "fp8")
    with pytest.raises(ValueError, match="QPEFT_CPU_COMPUTE"):
        capability.compute_dtype(torch.bfloat16)


def test_bf16_probe_follows_the_chosen_isa_level():
    info = qpeft.cpu_info()
    assert capability.bf16_dot_products() == (info["chosen_level"] in ("avx512_bf16", "amx"))
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    if caps and info["cap"] is None:  # uncapped: the native detection agrees with torch's
        assert capability.bf16_dot_products() == bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def test_isa_cap_below_bf16_computes_in_fp32():
    """QPEFT_CPU_ISA=avx2 on any machine: the layer's auto mode computes bf16 x in fp32."""
    code = (
        "import torch; from qpeft.backends.cpu import capability as c; "
        "print(c.bf16_dot_products(), c.compute_dtype(torch.bfloat16))"
    )
    env = {**os.environ, "QPEFT_CPU_ISA": "avx2"}
    env.pop(capability.COMPUTE_ENV, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "torch.float32"], out.stderr


def test_cache_sizes_from_sysfs_or_fallback(monkeypatch):
    sizes = capability.cache_sizes()
    assert len(sizes) == 3 and all(isinstance(s, int) and s > 0 for s in sizes)
    assert sizes[0] <= sizes[1] <= sizes[2]

    def no_sysfs(path):
        raise OSError("no sysfs")

    monkeypatch.setattr(capability.os, "listdir", no_sysfs)
    capability.cache_sizes.cache_clear()
    try:
        assert capability.cache_sizes() == capability.FALLBACK_CACHE_BYTES
    finally:
        monkeypatch.undo()
        capability.cache_sizes.cache_clear()


def test_parse_size():
    assert capability._parse_size("48K\n") == 48 << 10
    assert capability._parse_size("2048K") == 2 << 20
    assert capability._parse_size("32M") == 32 << 20
    assert capability._parse_size("512") == 512


def test_panel_elems_from_caches(monkeypatch):
    monkeypatch.setattr(capability, "cache_sizes", lambda: (32 << 10, 1 << 20, 8 << 20))
    assert cpu_qlora.panel_elems(2) == (8 << 20) // 4 // 2  # a quarter of the L3
    monkeypatch.setattr(capability, "cache_sizes", lambda: (32 << 10, 1 << 20, 256 << 20))
    assert cpu_qlora.panel_elems(4) == cpu_qlora.PANEL_MAX_ELEMS  # capped
    monkeypatch.setattr(capability, "cache_sizes", lambda: (32 << 10, 4 << 20, 8 << 20))
    assert cpu_qlora.panel_elems(2) == (4 << 20) // 2  # at least the L2


# --- values against the fp64 oracle -------------------------------------------------------------


@pytest.mark.parametrize("case", BF16_CASES, ids=case_id)
def test_bf16_mode_within_bounds(case, bf16_mode, spy):
    check_qlora_linear(make_problem(case), "cpu")
    assert spy["fwd"] == 1 and spy["bwd"] == 1


@pytest.mark.parametrize("panel_elems", [1, 1000])
@pytest.mark.parametrize("case", [BF16_CASES[0], BF16_CASES[2], BF16_CASES[3]], ids=case_id)
def test_bf16_tiny_panels(case, panel_elems, bf16_mode, spy, monkeypatch):
    # panel starts on every alignment the blocks allow; dx then sums many rounded panels
    monkeypatch.setattr(cpu_qlora, "PANEL_ELEMS", panel_elems)
    check_qlora_linear(make_problem(case), "cpu")
    assert spy["bwd"] == 1


@pytest.mark.parametrize("case", [BF16_CASES[1], BF16_CASES[3], BF16_CASES[5]], ids=case_id)
def test_fp32_override_keeps_fp32_bounds(case, monkeypatch, spy):
    # QPEFT_CPU_COMPUTE=fp32: the fp32 path, held to the fp32 oracle's bounds
    monkeypatch.setenv(capability.COMPUTE_ENV, "fp32")
    check_qlora_linear(make_problem(case), "cpu")
    assert spy == {"fwd": 0, "bwd": 0}


def test_auto_mode_bf16_x(spy, monkeypatch):
    monkeypatch.delenv(capability.COMPUTE_ENV, raising=False)
    check_qlora_linear(make_problem(BF16_CASES[2]), "cpu")
    assert spy["fwd"] == int(capability.bf16_dot_products())


def test_3d_input_matches_2d(bf16_mode):
    p = make_problem(BF16_CASES[2])
    x = p["x"]
    with qpeft.use_backend("cpu"), torch.no_grad():
        args = (p["packed"], p["state"], p["a"], p["b"], p["scaling"], p["bias"])
        y2 = qlora_linear(x, *args, out_scale=p["out_scale"])
        y3 = qlora_linear(x.view(4, 16, -1), *args, out_scale=p["out_scale"])
    assert y3.shape == (4, 16, y2.shape[1])
    assert torch.equal(y3.reshape(y2.shape), y2)
    want, tol = bf16_oracle(p)["y"]
    assert_within(y2, want, tol, "3-D y")


def test_empty_batch_bf16(bf16_mode):
    p = make_problem(BF16_CASES[0])
    x = p["x"][:0].clone().requires_grad_()
    with qpeft.use_backend("cpu"):
        y = qlora_linear(x, p["packed"], p["state"], p["a"], p["b"], p["scaling"])
        y.sum().backward()
    assert y.shape == (0, 45) and y.dtype == torch.bfloat16 and x.grad.shape == x.shape


def test_linear4bit_bf16(bf16_mode, spy):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40)
    q = Linear4bit.from_linear(lin)
    w = q.dequantize(torch.float32).double()
    for m in (9, 16, 64):
        x = torch.randn(m, 96).bfloat16()
        y = q(x)
        want = x.double() @ w.T + lin.bias.double()
        s = x.double().abs() @ w.abs().T + lin.bias.double().abs()
        tol = rho(3, 96 + 400) * s * (1 + U_BF16) + U_BF16 * want.abs()
        assert y.dtype == torch.bfloat16
        assert_within(y, want, tol, f"Linear4bit M={m}")
    assert spy["fwd"] == 3


@settings(max_examples=30)
@given(
    m=st.integers(0, 80),
    n=st.integers(1, 40),
    k=st.integers(1, 140),
    r=st.integers(1, 8),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    double_quant=st.booleans(),
    blocksize=st.sampled_from([32, 64, 128]),
    flags=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_bf16_random_shapes(m, n, k, r, quant_type, double_quant, blocksize, flags, dtype, seed):
    case = (dtype, m, n, k, r, quant_type, double_quant, blocksize, *flags)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(capability.COMPUTE_ENV, "bf16")
        check_qlora_linear(make_problem(case, seed), "cpu")
