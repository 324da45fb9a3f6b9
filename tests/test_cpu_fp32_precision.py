"""fp32 x on the CPU QLoRA layer follows torch's fp32 matmul precision setting
(qpeft/backends/cpu/capability.py ``fp32_matmul_allows_bf16``, docs/design.md "CPU compute
dtype"): under ``torch.set_float32_matmul_precision("medium")`` (oneDNN's bf16 for fp32
matmuls) a CPU with bf16 dot products runs fp32 x of a large shape on the bf16 path, held to
the bf16 mode's derived bounds (qpeft/testing.py ``bf16_oracle``: x, W, the adapter and dy'
rounded to bf16, fp32 accumulation); everywhere else (the default "highest", "high"/tf32,
shapes kept on the fp32 GEMV / small-layer kernels, ISA levels without bf16 dot products)
the fp32 path, bit for bit what it computed before (whose torch GEMMs follow torch's
setting themselves, see test_every_isa_level).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import qpeft
from qpeft import _native
from qpeft.backends.cpu import capability
from qpeft.backends.cpu import qlora as cpu_qlora
from qpeft.functional import qlora_linear
from qpeft.nn import Linear4bit

from ._bf16_bounds import U_BF16, U_CAST, rho
from ._helpers import assert_within, case_id, check_qlora_linear, make_problem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BF16_UNITS = capability.bf16_dot_products()

# (dtype, M, N, K, r, quant_type, double_quant, blocksize, bias, rank_scale, out_scale)
TAKES_BF16 = [  # large shapes: the bf16 path under "medium" on a CPU with bf16 dot products
    (torch.float32, 64, 300, 512, 16, "nf4", True, 32, True, False, True),
    (torch.float32, 513, 130, 136, 2, "nf4", False, 64, True, True, False),  # M over a GEMM block
    (torch.float32, 12, 720, 1001, 8, "fp4", True, 64, False, True, True),  # 8 < M <= 16, odd K
    (torch.float32, 40, 520, 416, 4, "nf4", True, 64, True, True, True),
]
STAYS_FP32 = [  # M <= 8 (the fp32 GEMV) and M*N*K below FP32_BF16_MIN_WORK: fp32 always
    (torch.float32, 5, 45, 83, 8, "nf4", True, 64, True, True, True),
    (torch.float32, 20, 17, 150, 8, "fp4", True, 32, False, True, True),
    (torch.float32, 9, 45, 83, 8, "nf4", True, 64, True, True, True),
    (torch.float32, 64, 300, 256, 8, "nf4", True, 64, True, False, False),  # the composed fp32 path
]


@pytest.fixture
def precision(monkeypatch):
    """Sets torch's fp32 matmul precision through the legacy API (the one every supported
    torch has; mixing it with the per-backend API makes torch >= 2.9's getter raise) and
    restores it afterwards, whatever the test did."""
    monkeypatch.delenv(capability.COMPUTE_ENV, raising=False)
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


@pytest.fixture
def spy(monkeypatch):
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


def _run(p):
    """y and every gradient of qlora_linear on the CPU backend for problem p."""
    x = p["x"].clone().requires_grad_()
    a = p["a"].clone().requires_grad_()
    b = p["b"].clone().requires_grad_()
    bias = p["bias"].clone().requires_grad_() if p["bias"] is not None else None
    with qpeft.use_backend("cpu"):
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
    return [y.detach(), x.grad, a.grad, b.grad] + ([bias.grad] if bias is not None else [])


def _bit_equal(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and torch.equal(g, w), f"output {i} differs"


# --- the setting --------------------------------------------------------------------------------


def test_setting_followed_at_run_time(precision):
    """Read per call: switching back and forth takes effect on the next call."""
    for _ in range(2):
        precision("highest")
        assert not capability.fp32_matmul_allows_bf16()
        precision("medium")
        assert capability.fp32_matmul_allows_bf16()
        precision("high")  # tf32 on oneDNN: not a bf16 licence on CPU
        assert not capability.fp32_matmul_allows_bf16()


def test_compute_dtype_under_medium(precision, monkeypatch):
    precision("medium")
    want = torch.bfloat16 if BF16_UNITS else torch.float32
    assert capability.compute_dtype(torch.float32) == want
    assert capability.compute_dtype(torch.float32, large_shape=False) == torch.float32
    assert capability.compute_dtype(torch.float16) == torch.float32  # fp16 x: unchanged
    assert capability.compute_dtype(torch.float64) == torch.float64  # gradcheck keeps fp64
    monkeypatch.setenv(capability.COMPUTE_ENV, "fp32")  # the override still wins
    assert capability.compute_dtype(torch.float32) == torch.float32
    precision("highest")
    monkeypatch.setenv(capability.COMPUTE_ENV, "auto")
    assert capability.compute_dtype(torch.float32) == torch.float32


def test_shape_rule():
    assert not cpu_qlora.fp32_may_take_bf16(8, 4096, 4096)  # the GEMV's rows
    assert not cpu_qlora.fp32_may_take_bf16(20, 17, 150)  # a small layer's one-call kernels
    assert not cpu_qlora.fp32_may_take_bf16(16, 128, 128)  # the one-call small backward
    assert not cpu_qlora.fp32_may_take_bf16(64, 300, 256)  # measured faster in fp32
    assert cpu_qlora.fp32_may_take_bf16(9, 4096, 4096)
    assert cpu_qlora.fp32_may_take_bf16(512, 704, 704)  # the e2e demo's step


def test_new_api_setting_is_read():
    """torch >= 2.9's per-backend setting (mkldnn.matmul.fp32_precision = "bf16") is what
    the layer reads; in a subprocess, so this process keeps only the legacy API in use."""
    if not hasattr(torch._C, "_get_fp32_precision_getter"):
        pytest.skip(f"torch {torch.__version__} has only the legacy setting (tested above)")
    code = (
        "import torch; from qpeft.backends.cpu import capability as c\n"
        "r = [c.fp32_matmul_allows_bf16()]\n"
        "torch.backends.fp32_precision = 'bf16'; r.append(c.fp32_matmul_allows_bf16())\n"
        "torch.backends.mkldnn.matmul.fp32_precision = 'tf32'; r.append(c.fp32_matmul_allows_bf16())\n"
        "torch.backends.mkldnn.matmul.fp32_precision = 'bf16'; r.append(c.fp32_matmul_allows_bf16())\n"
        "torch.backends.mkldnn.matmul.fp32_precision = 'ieee'; r.append(c.fp32_matmul_allows_bf16())\n"
        "print(r)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[False, True, False, True, False]", out.stderr


# --- values -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", TAKES_BF16, ids=case_id)
def test_medium_within_bf16_bounds(case, precision, spy):
    """fp32 x under "medium": y, dx, dA, dB, dbias against the fp64 oracle within the bf16
    mode's bounds (derived for bf16-rounded operands with fp32 accumulation: x rounded to
    bf16 once, W's decode rounded to bf16, fp32 sums; the output rounding is fp32's
    U_CAST, smaller than bf16's) where the bf16 path runs, the fp32 bounds elsewhere."""
    precision("medium")
    check_qlora_linear(make_problem(case), "cpu")
    assert spy == ({"fwd": 1, "bwd": 1} if BF16_UNITS else {"fwd": 0, "bwd": 0})


@pytest.mark.parametrize("case", TAKES_BF16 + STAYS_FP32, ids=case_id)
def test_highest_is_the_fp32_path_bit_for_bit(case, precision, spy, monkeypatch):
    """The default setting changes nothing: auto under "highest" equals the fp32 path
    (QPEFT_CPU_COMPUTE=fp32, what fp32 x always ran before) bit for bit."""
    p = make_problem(case, seed=1)
    precision("highest")
    got = _run(p)
    monkeypatch.setenv(capability.COMPUTE_ENV, "fp32")
    _bit_equal(got, _run(p))
    assert spy == {"fwd": 0, "bwd": 0}


@pytest.mark.parametrize("case", STAYS_FP32, ids=case_id)
def test_medium_keeps_fp32_kernels_for_small_shapes(case, precision, spy, monkeypatch):
    """Shapes kept on fp32 run exactly the fp32 path under "medium" (bit for bit what
    QPEFT_CPU_COMPUTE=fp32 computes under the same setting). That is not always "highest"'s
    result: torch's own fp32 GEMMs inside the fp32 path (the composed backward's torch.mm)
    follow the user's setting as they did before this policy existed."""
    p = make_problem(case, seed=2)
    precision("medium")
    got = _run(p)
    assert spy == {"fwd": 0, "bwd": 0}
    monkeypatch.setenv(capability.COMPUTE_ENV, "fp32")
    _bit_equal(got, _run(p))


def test_switching_back_and_forth(precision, spy):
    p = make_problem(TAKES_BF16[0], seed=3)
    precision("highest")
    fp32 = _run(p)
    precision("medium")
    bf16 = _run(p)
    precision("highest")
    _bit_equal(_run(p), fp32)
    precision("medium")
    _bit_equal(_run(p), bf16)
    if BF16_UNITS:  # the bf16 path really ran: its y differs from fp32's
        assert not torch.equal(bf16[0], fp32[0])
        assert spy == {"fwd": 2, "bwd": 2}


def test_linear4bit_medium(precision, spy):
    """Linear4bit (qlora_linear without an adapter) on fp32 x under "medium": y and x.grad
    within bounds of bf16-rounded x, dy and W with fp32 accumulation (as bf16_oracle:
    3 bf16 roundings and K + 400 fp32 ones on each term of y, the fp32 output rounding;
    dx = dy' @ W through 6 bf16 and 2N + 4 fp32 roundings)."""
    precision("medium")
    torch.manual_seed(0)
    lin = torch.nn.Linear(1024, 768)
    q = Linear4bit.from_linear(lin)
    w = q.dequantize(torch.float32).double()
    u = U_CAST[torch.float32]
    for m in (12, 64):
        x = torch.randn(m, 1024, requires_grad=True)
        y = q(x)
        dy = torch.randn(m, 768)
        y.backward(dy)
        xd = x.detach().double()
        want = xd @ w.T + lin.bias.double()
        s = xd.abs() @ w.abs().T + lin.bias.double().abs()
        tol = rho(3, 1024 + 400) * s * (1 + u) + u * want.abs()
        assert y.dtype == torch.float32
        assert_within(y, want, tol, f"Linear4bit y M={m}")
        want_dx = dy.double() @ w
        tol_dx = rho(6, 2 * 768 + 4) * (dy.double().abs() @ w.abs()) * (1 + u) + u * want_dx.abs()
        assert_within(x.grad, want_dx, tol_dx, f"Linear4bit dx M={m}")
    assert spy["fwd"] == (2 if BF16_UNITS else 0)
    assert U_BF16 > u  # the bound above is the bf16 one, not fp32's


def test_torch_compile_follows_the_setting(precision):
    """Under torch.compile (fullgraph: no graph break) the choice is made inside the op at
    run time, so the compiled function follows a switch without recompiling on stale
    guards: bit for bit the eager result under each setting."""
    p = make_problem(TAKES_BF16[0], seed=4)

    def f(x):
        return qlora_linear(x, p["packed"], p["state"], p["a"], p["b"], p["scaling"], p["bias"])

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    with qpeft.use_backend("cpu"), torch.no_grad():
        for setting in ("medium", "highest", "medium"):
            precision(setting)
            assert torch.equal(compiled(p["x"]), f(p["x"])), setting
        precision("highest")
        fp32 = f(p["x"])
        precision("medium")
        assert torch.equal(compiled(p["x"]), f(p["x"]))
        if BF16_UNITS:
            assert not torch.equal(compiled(p["x"]), fp32)


# --- every ISA level ----------------------------------------------------------------------------

_ISA_CASE = (torch.float32, 64, 300, 512, 16, "nf4", True, 32, True, False, True)


def _levels_run(p, precision_set):
    """{setting: (results, names out of bounds)} under "highest", "medium" and "medium" with
    QPEFT_CPU_COMPUTE=fp32 (qpeft's fp32 path as it ran before this policy)."""
    from qpeft.testing import qlora_linear_results

    def run():
        out = qlora_linear_results(p, "cpu")
        bad = [n for n, got, want, tol in out if not bool(((got.double() - want).abs() <= tol).all())]
        return [got for _, got, _, _ in out], bad

    res = {}
    precision_set("highest")
    res["highest"] = run()
    precision_set("medium")
    res["medium"] = run()
    os.environ[capability.COMPUTE_ENV] = "fp32"
    try:
        res["fp32"] = run()
    finally:
        del os.environ[capability.COMPUTE_ENV]
    return res


def _torch_moves(precision_set) -> bool:
    """Whether torch's own fp32 GEMM gives another result under "medium" on this CPU."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 96, generator=g), torch.randn(96, 70, generator=g)
    precision_set("highest")
    want = a @ b
    precision_set("medium")
    return not torch.equal(a @ b, want)


def _judge(level, bf16, res, torch_moves):
    same_as = {key: all(map(torch.equal, res[key][0], res["medium"][0])) for key in ("highest", "fp32")}
    assert res["highest"][1] == [], (level, res["highest"][1])  # "highest": the usual bounds
    if bf16:  # qpeft's bf16 path: its own derived bounds, and another result than fp32's
        assert res["medium"][1] == [] and not same_as["highest"], level
    else:
        # qpeft keeps its fp32 path, bit for bit; where torch's own fp32 GEMMs do not move
        # under "medium" (a CPU without fast bf16) that is "highest"'s result too. On a
        # machine with bf16 units capped by QPEFT_CPU_ISA, torch's oneDNN still has bf16
        # (the cap is qpeft's, not torch's), so the fp32 path's torch GEMMs follow the
        # user's setting as they did before this policy: no fp32 bound is claimed there.
        assert same_as["fp32"], level
        if not torch_moves:
            assert same_as["highest"] and res["medium"][1] == [], level


@pytest.mark.parametrize("level", ["scalar", "avx2", "avx512", "avx512_bf16", "amx"])
def test_every_isa_level(level, precision, spy):
    """At each kernel level (qpeft._C.set_isa, the in-process form of QPEFT_CPU_ISA; the
    bf16 probe re-asked): without bf16 dot products (scalar, avx2, avx512) "medium" leaves
    fp32 x on qpeft's fp32 path; with them it takes the bf16 path within the bf16 bounds.
    qlora_linear_results picks the oracle by the same rule (qpeft.testing.cpu_computes_bf16)."""
    mod = _native.cpu_module()
    info = mod.cpu_info()
    if level in info["missing"]:
        pytest.skip(f"this CPU lacks {info['missing'][level]} (detected level: {info['detected_level']})")
    prev = mod.set_isa(level)
    capability.bf16_dot_products.cache_clear()
    try:
        bf16 = capability.bf16_dot_products()
        assert bf16 == (level in ("avx512_bf16", "amx"))
        res = _levels_run(make_problem(_ISA_CASE, seed=5), precision)
        torch_moves = _torch_moves(precision)
    finally:
        mod.set_isa(prev)
        capability.bf16_dot_products.cache_clear()
    _judge(level, bf16, res, torch_moves)
    assert spy["fwd"] == int(bf16)


_ENV_SCRIPT = """
import json, torch
from qpeft.backends.cpu import capability
from qpeft.testing import make_problem
from tests.test_cpu_fp32_precision import _ISA_CASE, _levels_run, _torch_moves
res = _levels_run(make_problem(_ISA_CASE, seed=5), torch.set_float32_matmul_precision)
print(json.dumps({"bf16": capability.bf16_dot_products(), "moves": _torch_moves(torch.set_float32_matmul_precision),
                  "same_fp32": all(map(torch.equal, res["fp32"][0], res["medium"][0])),
                  "same_highest": all(map(torch.equal, res["highest"][0], res["medium"][0])),
                  "bad": res["highest"][1] + res["medium"][1]}))
"""


def test_env_cap_below_bf16_keeps_fp32():
    """QPEFT_CPU_ISA=avx2 itself (read once per process: a subprocess): "medium" leaves fp32
    x on qpeft's fp32 path, bit for bit."""
    env = {**os.environ, "QPEFT_CPU_ISA": "avx2"}
    env.pop(capability.COMPUTE_ENV, None)
    out = subprocess.run(
        [sys.executable, "-c", _ENV_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert not r["bf16"] and r["same_fp32"], r
    if not r["moves"]:
        assert r["same_highest"] and r["bad"] == [], r
