"""Every CPU ISA level this machine supports (csrc/cpu/cpu_info.h: scalar < avx2 < avx512 <
avx512_bf16 < amx), each held bit for bit to the pure-torch reference on every quantize,
dequantize and optimizer op (and the GEMV to its derived bound), plus qpeft.cpu_info() and
QPEFT_CPU_ISA. Levels above the machine's are skipped with the missing features named, so
an AVX2-only CI run says what it could not test and why.

The level is set in-process with the module's test/A-B override (qpeft._C.set_isa); the
environment variable, read once per process, is tested in subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qpeft
import qpeft.functional as qf
from qpeft._native import cpu_module

from ._helpers import DTYPES, assert_bits_equal, assert_within, cpu_gemv_bound, reference
from .test_optim import OPS, _grads, _run

LEVELS = ["scalar", "avx2", "avx512", "avx512_bf16", "amx"]
ISA_OPS = [
    "quantize_4bit",
    "dequantize_4bit",
    "quantize_blockwise",
    "dequantize_blockwise",
    "gemv_4bit",
    "adamw32_step",
    "adamw8bit_step",
    "lion32_step",
    "lion8bit_step",
]


@pytest.fixture(params=LEVELS)
def level(request):
    """Runs the test with the CPU kernels at one ISA level (skipped, naming the missing
    features, where this CPU lacks it)."""
    mod = cpu_module()
    info = mod.cpu_info()
    name = request.param
    if name in info["missing"]:
        pytest.skip(f"this CPU lacks {info['missing'][name]} (detected level: {info['detected_level']})")
    prev = mod.set_isa(name)
    try:
        assert mod.active_isa() == name
        yield name
    finally:
        mod.set_isa(prev)


def _at_scalar(fn, *args, **kwargs):
    mod = cpu_module()
    prev = mod.set_isa("scalar")
    try:
        with qpeft.use_backend("cpu"):
            return fn(*args, **kwargs)
    finally:
        mod.set_isa(prev)


def _quant_outputs(x, blocksize, quant_type, dq):
    """Every quantize/dequantize output for x on the current backend (both formats, every
    output dtype, nested absmax when dq)."""
    packed, s4 = qf.quantize_4bit(x, blocksize, quant_type, dq, allow_nonfinite=not dq)
    outs = [packed, s4.absmax]
    if dq:
        outs += [s4.offset, s4.state2.absmax]
    outs += [qf.dequantize_4bit(packed, s4, out_dtype=d) for d in DTYPES]
    q8, s8 = qf.quantize_blockwise(x, blocksize, allow_nonfinite=True)
    outs += [q8, s8.absmax] + [qf.dequantize_blockwise(q8, s8, d) for d in DTYPES]
    return outs


def _check_quant(x, blocksize, quant_type, dq, what):
    """The level's kernels bit for bit the reference (finite x) or the scalar kernels (which
    test_native_cpu / test_backends hold to it; non-finite x, where only NaN payloads of the
    torch reference's bf16 cast could differ)."""
    with qpeft.use_backend("cpu"):
        got = _quant_outputs(x, blocksize, quant_type, dq)
    if bool(torch.isfinite(x).all()):
        want = reference(_quant_outputs, x, blocksize, quant_type, dq)
    else:
        want = _at_scalar(_quant_outputs, x, blocksize, quant_type, dq)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_bits_equal(a, b, f"{what}: output {i}")


# Sizes around the 16- and 32-lane loops, partial blocks, n < 16, a lone element (empty
# tensors: test_raw_blocksizes; the functional API rejects them).
EDGE_SIZES = [1, 2, 3, 15, 16, 17, 31, 33, 63, 64, 65, 127, 129, 1000, 4097]


@pytest.mark.parametrize("dtype", DTYPES)
def test_quant_edges(level, dtype):
    g = torch.Generator().manual_seed(1)
    for n in EDGE_SIZES:
        x = torch.randn(n, generator=g).to(dtype)
        for blocksize in (32, 64, 256):
            for quant_type in ("nf4", "fp4"):
                _check_quant(x, blocksize, quant_type, dq=n > 0 and quant_type == "nf4", what=f"{level} n={n} bs={blocksize} {quant_type}")


def test_quant_special_values(level):
    """NaN, infinities, signed zeros, subnormals and the fp32 extremes (bf16 rounding up to
    inf) in every lane position of a SIMD group."""
    specials = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45, -1e-40, 3.4028235e38, -3.4e38, 1.0]
    base = torch.tensor(specials * 7)
    for dtype in DTYPES:
        x = base.to(dtype)
        for blocksize in (32, 64):
            _check_quant(x, blocksize, "nf4", False, f"{level} specials {dtype} bs={blocksize}")
            _check_quant(x, blocksize, "fp4", False, f"{level} specials {dtype} bs={blocksize}")
    zeros = torch.zeros(100)
    _check_quant(zeros, 32, "nf4", True, f"{level} all-zero")


@settings(max_examples=12)
@given(
    n=st.integers(1, 700),
    blocksize=st.sampled_from([32, 64, 128, 256]),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    dtype=st.sampled_from(DTYPES),
    dq=st.booleans(),
    scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_quant_random(level, n, blocksize, quant_type, dtype, dq, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g) * scale).to(dtype)
    _check_quant(x, blocksize, quant_type, dq, f"{level} n={n} bs={blocksize} {quant_type} {dtype} dq={dq}")


def _raw_quant(mod, x: torch.Tensor, blocksize: int) -> list[torch.Tensor]:
    """The native ops called directly with any blocksize (odd, or not a power of two, which
    the functional API rejects): blocks that start mid-byte and partial blocks."""
    n, dt = x.numel(), {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[x.dtype]
    blocks = -(-n // blocksize)
    packed = torch.zeros((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.zeros(blocks)
    mod.quantize_4bit(x.data_ptr(), dt, n, blocksize, 1, packed.data_ptr(), packed.numel(), absmax.data_ptr(), blocks, 2)
    outs = [packed, absmax]
    for od, d in enumerate(DTYPES):
        out = torch.empty(n, dtype=d)
        mod.dequantize_4bit(packed.data_ptr(), packed.numel(), absmax.data_ptr(), blocks, n, blocksize, 1, out.data_ptr(), od, 0, 0, 0, 0, 1, 2)
        outs.append(out)
    return outs


def test_raw_blocksizes(level):
    mod = cpu_module()
    g = torch.Generator().manual_seed(5)
    for blocksize in (2, 6, 18, 34, 48, 100):
        for n in (0, 1, 5, 47, 301):
            x = torch.randn(n, generator=g)
            got = _raw_quant(mod, x, blocksize)
            prev = mod.set_isa("scalar")
            try:
                want = _raw_quant(mod, x, blocksize)
            finally:
                mod.set_isa(prev)
            for i, (a, b) in enumerate(zip(got, want)):
                assert_bits_equal(a, b, f"{level} bs={blocksize} n={n} output {i}")


@pytest.mark.parametrize("op", OPS)
def test_optimizer_steps(level, op):
    """Three steps bit for bit the reference: sizes around the 16-lane loop, a partial
    256-element state block, the 8-bit threshold and two threads' worth."""
    for n in (1, 15, 17, 255, 257, 4097, 70001):
        for dtype in (torch.float32, torch.bfloat16) if n > 300 else DTYPES:
            p0 = torch.randn(n).to(dtype)
            grads = _grads(n, 3, dtype, seed=n)
            want = _run("default", "auto", op, p0, grads)
            got = _run("cpu", level, op, p0, grads)
            for i, (a, b) in enumerate(zip(got, want)):
                assert_bits_equal(a, b, f"{op} {level} {dtype} n={n} output {i}")


@pytest.mark.parametrize("op", ["adamw32", "adamw8bit", "lion32", "lion8bit"])
def test_optimizer_nonfinite(level, op):
    """NaN/inf gradients propagate as in the reference (NaN absmax canonical)."""
    n = 600
    p0 = torch.randn(n)
    g = _grads(n, 2, torch.float32, seed=9)
    g[0][[3, 100, 300]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    want = _run("cpu", "scalar", op, p0, g)
    got = _run("cpu", level, op, p0, g)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_bits_equal(a, b, f"{op} {level} non-finite output {i}")


@pytest.mark.parametrize("m", [1, 3, 8])
def test_gemv(level, m):
    """Within the derived bound of tests/_helpers.py (cpu_gemv_roundings covers every
    level's summation order); k % blocksize != 0 takes the scalar kernel at any level."""
    g = torch.Generator().manual_seed(m)
    for n, k, blocksize, nested in ((33, 256, 64, True), (17, 512, 256, False), (5, 96, 32, True), (9, 100, 64, False)):
        w = torch.randn(n, k, generator=g)
        x = torch.randn(m, k, generator=g)
        packed, state = qf.quantize_4bit(w, blocksize, "nf4", nested)
        with qpeft.use_backend("cpu"):
            y = qf.gemv_4bit(x, packed, state)
        w_deq = reference(qf.dequantize_4bit, packed, state, torch.float32)
        exact = x.double() @ w_deq.double().T
        assert_within(y, exact, cpu_gemv_bound(x, w_deq, torch.float32, blocksize), f"{level} m={m} n={n} k={k}")


# --- cpu_info() and QPEFT_CPU_ISA -------------------------------------------------------------


def test_cpu_info_contents():
    info = qpeft.cpu_info()
    assert info["levels"] == LEVELS
    f = info["features"]
    assert all(isinstance(v, bool) for v in f.values())
    for name in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16"):
        assert name in f
    # the detected level is the highest whose requirements all hold, and the missing map
    # names exactly the levels above it
    needs = {
        "avx2": ["avx2", "fma", "f16c"],
        "avx512": ["avx512f", "avx512bw", "avx512vl", "avx512dq"],
        "avx512_bf16": ["avx512_bf16"],
        "amx": ["amx_tile", "amx_bf16", "amx_permitted"],
    }
    want = "scalar"
    for lv in LEVELS[1:]:
        if not all(f[x] for x in needs[lv]):
            break
        want = lv
    assert info["detected_level"] == want
    assert sorted(info["missing"]) == sorted(LEVELS[LEVELS.index(want) + 1 :])
    for lv, miss in info["missing"].items():
        assert miss, lv
    assert isinstance(info["model"], str)
    if os.environ.get("QPEFT_CPU_ISA") is None:
        assert info["cap"] is None and info["note"] is None
        assert info["chosen_level"] == want
    assert set(info["kernels"]) == set(ISA_OPS)
    for op, src in info["kernels"].items():
        assert LEVELS.index(src) <= LEVELS.index(info["chosen_level"]), op
        assert src in info["built_levels"], op
    assert info["built_levels"][0] == "scalar"


def test_set_isa_errors():
    mod = cpu_module()
    with pytest.raises(ValueError, match="unknown ISA 'avx9'"):
        mod.set_isa("avx9")
    info = mod.cpu_info()
    for lv, miss in info["missing"].items():
        with pytest.raises(ValueError, match="lacks"):
            mod.set_isa(lv)
    prev = mod.set_isa("scalar")
    try:
        assert qpeft.cpu_info()["chosen_level"] == "scalar"
        assert qpeft.cpu_info()["override"] == "scalar"
        assert set(qpeft.cpu_info()["kernels"].values()) == {"scalar"}
    finally:
        mod.set_isa(prev)


_PROBE = """
import json, qpeft, torch
out = {}
try:
    out["info"] = qpeft.cpu_info()
except ValueError as e:
    out["info_error"] = str(e)
try:
    with qpeft.use_backend("cpu"):
        qpeft.functional.quantize_4bit(torch.ones(64), 64, "nf4", False)
    out["op"] = "ok"
except ValueError as e:
    out["op_error"] = str(e)
print(json.dumps(out))
"""


def _probe(env_value: str) -> dict:
    env = dict(os.environ, QPEFT_CPU_ISA=env_value)
    r = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120, cwd=os.getcwd()
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_env_cap_and_clamp():
    """QPEFT_CPU_ISA=avx2 caps the level (or is clamped, with a note, on a CPU without
    AVX2); QPEFT_CPU_ISA=amx on a CPU below amx is clamped to the detected level."""
    detected = cpu_module().cpu_info()["detected_level"]
    for cap in ("avx2", "amx"):
        info = _probe(cap)["info"]
        assert info["cap"] == cap and info["detected_level"] == detected
        if LEVELS.index(cap) <= LEVELS.index(detected):
            assert info["chosen_level"] == cap and info["note"] is None
        else:
            assert info["chosen_level"] == detected
            assert "clamped to " + detected in info["note"] and "missing" in info["note"]
        for src in info["kernels"].values():
            assert LEVELS.index(src) <= LEVELS.index(info["chosen_level"])


def test_env_invalid():
    out = _probe("avx1024")
    for key in ("info_error", "op_error"):
        assert "QPEFT_CPU_ISA='avx1024'" in out[key], out
        assert "scalar, avx2, avx512, avx512_bf16, amx" in out[key]
