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
from qpeft._formats import DTYPE_IDS, QUANT_TYPE_IDS, code4, dynamic_map
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


def _enter(name: str):
    mod = cpu_module()
    info = mod.cpu_info()
    if name in info["missing"]:
        pytest.skip(f"this CPU lacks {info['missing'][name]} (detected level: {info['detected_level']})")
    return mod, mod.set_isa(name)


def _built_levels() -> list[str]:
    try:
        return cpu_module().cpu_info()["built_levels"]
    except ValueError:  # an invalid QPEFT_CPU_ISA in this process: test_env_invalid says so
        return ["scalar"]


# The levels with kernels of their own in this build (scalar, avx2, avx512 on x86-64): the
# exhaustive tests run on each that the CPU supports. The levels above them (avx512_bf16,
# amx) run the avx512 kernels for these ops, the same functions: test_inherited_levels
# checks that and runs every op at each of them.
KERNEL_LEVELS = [lv for lv in LEVELS if lv in _built_levels()]


@pytest.fixture(params=KERNEL_LEVELS)
def level(request):
    """Runs the test with the CPU kernels at one ISA level (skipped, naming the missing
    features, where this CPU lacks it)."""
    name = request.param
    mod, prev = _enter(name)
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
    """The scalar level bit for bit the pure-torch reference (finite x: with NaN or inf only
    the NaN payloads of torch's bf16 cast could differ, which test_native_cpu covers), and
    every SIMD level bit for bit the scalar level."""
    with qpeft.use_backend("cpu"):
        got = _quant_outputs(x, blocksize, quant_type, dq)
    if cpu_module().active_isa() != "scalar":
        want = _at_scalar(_quant_outputs, x, blocksize, quant_type, dq)
    elif bool(torch.isfinite(x).all()):
        want = reference(_quant_outputs, x, blocksize, quant_type, dq)
    else:
        return
    for i, (a, b) in enumerate(zip(got, want)):
        assert_bits_equal(a, b, f"{what}: output {i}")


# Sizes around the 16- and 32-lane loops, partial blocks, n < 16, a lone element (empty
# tensors: test_raw_blocksizes; the functional API rejects them).
EDGE_SIZES = [1, 2, 3, 15, 16, 17, 31, 33, 63, 65, 129, 1000]


@pytest.mark.parametrize("dtype", DTYPES)
def test_quant_edges(level, dtype):
    g = torch.Generator().manual_seed(1)
    for n in EDGE_SIZES:
        x = torch.randn(n, generator=g).to(dtype)
        for blocksize in (32, 64, 256):
            for quant_type in ("nf4", "fp4"):
                _check_quant(
                    x,
                    blocksize,
                    quant_type,
                    dq=n > 0 and quant_type == "nf4",
                    what=f"{level} n={n} bs={blocksize} {quant_type}",
                )


def test_quant_special_values(level):
    """NaN, infinities, signed zeros, subnormals and the fp32 extremes (bf16 rounding up to
    inf) in every lane position of a SIMD group."""
    specials = [
        float("nan"),
        float("inf"),
        -float("inf"),
        0.0,
        -0.0,
        1e-45,
        -1e-40,
        3.4028235e38,
        -3.4e38,
        1.0,
    ]
    base = torch.tensor(specials * 7)
    for dtype in DTYPES:
        x = base.to(dtype)
        for blocksize in (32, 64):
            _check_quant(x, blocksize, "nf4", False, f"{level} specials {dtype} bs={blocksize}")
            _check_quant(x, blocksize, "fp4", False, f"{level} specials {dtype} bs={blocksize}")
    zeros = torch.zeros(100)
    _check_quant(zeros, 32, "nf4", True, f"{level} all-zero")


@settings(max_examples=8)
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
    mod.quantize_4bit(
        x.data_ptr(), dt, n, blocksize, 1, packed.data_ptr(), packed.numel(), absmax.data_ptr(), blocks, 2
    )
    outs = [packed, absmax]
    for od, d in enumerate(DTYPES):
        out = torch.empty(n, dtype=d)
        mod.dequantize_4bit(
            packed.data_ptr(),
            packed.numel(),
            absmax.data_ptr(),
            blocks,
            n,
            blocksize,
            1,
            out.data_ptr(),
            od,
            0,
            0,
            0,
            0,
            1,
            2,
        )
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


# --- 4-bit dequantize: every level bit for bit the scalar one, which equals torch's math --------
#
# The native op called directly, so that any even blocksize (the SIMD kernels' contract;
# odd ones take the scalar kernel at every level), any absmax (non-finite, subnormal,
# near FLT_MAX) and any nested statistics reach the kernel, and several threads start it
# mid-tensor (a block range not aligned to the kernels' 16-block scale groups).

_DQ_BLOCKSIZES = [2, 4, 6, 18, 32, 34, 48, 64, 96, 100, 128, 256, 4096, 5, 33]
# Finite values whose products with the code values are fp32 subnormals (1e-40, 2e-38,
# 1e-37), fp16 subnormals or zeros (3e-8, 1e-5), round to inf in fp16 (7e4) or bf16 (3.4e38).
_FINITE_SPECIALS = [0.0, -0.0, 1e-45, 1e-40, 2e-38, 1e-37, 3e-8, 1e-5, 0.37, -2.5, 65504.0, 7e4, 3.0e38]
_FINITE_SPECIALS += [3.4028235e38, -3.4028235e38]
# inf, -inf and NaNs whose payloads f32_to_bf16's NaN rule decides: rounding 0x7fffffff
# without it would carry into the sign (-0.0), 0xffc18001 would round up to another NaN
_NONFINITE = [float("inf"), -float("inf"), float("nan")]
_NONFINITE += (
    torch.tensor([0x7FFFFFFF, 0xFFC18001 - (1 << 32), 0x7FC08001], dtype=torch.int32)
    .view(torch.float32)
    .tolist()
)


def _dq_values(g: torch.Generator, count: int, regime: str) -> torch.Tensor:
    """fp32 values for absmax / nested statistics: 'normal' (random sign, 1e-3..1e3),
    'special' (half of them finite specials), 'nonfinite' (as 'special', and about one in 25
    inf, -inf or NaN, so that a run of 16 blocks mixes finite and non-finite scales)."""
    v = torch.randn(count, generator=g) * torch.exp(torch.empty(count).uniform_(-7, 7, generator=g))
    if regime == "normal":
        return v
    pool = torch.tensor(_FINITE_SPECIALS)
    pick = pool[torch.randint(0, len(pool), (count,), generator=g)]
    v = torch.where(torch.rand(count, generator=g) < 0.5, pick, v)
    if regime == "nonfinite":
        pick = torch.tensor(_NONFINITE)[torch.randint(0, len(_NONFINITE), (count,), generator=g)]
        v = torch.where(torch.rand(count, generator=g) < 0.04, pick, v)
    return v


def _dq_case(seed: int, n: int, blocksize: int, regime: str, nested_blocksize: int | None):
    """Random packed codes and statistics: (packed, absmax fp32 or absmax_q uint8, nested
    tuple or None, the per-block fp32 scales as torch computes them)."""
    g = torch.Generator().manual_seed(seed)
    blocks = -(-n // blocksize)
    packed = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, generator=g)
    if nested_blocksize is None:
        absmax = _dq_values(g, blocks, regime)
        return packed, absmax, None, absmax
    absmax_q = torch.randint(0, 256, (blocks,), dtype=torch.uint8, generator=g)
    code = dynamic_map(True).clone()
    if regime != "normal":  # a few code values replaced by specials
        idx = torch.randint(0, 256, (12,), generator=g)
        code[idx] = _dq_values(g, 12, regime)
    nested_absmax = _dq_values(g, -(-blocks // nested_blocksize), regime)
    offset = _dq_values(g, 1, "normal" if regime == "normal" else "special")
    nested = (nested_absmax, code, offset, nested_blocksize)
    # bitsandbytes' order: code[q] * nested_absmax, then + offset, each rounded in fp32
    scale = code[absmax_q.long()] * nested_absmax.repeat_interleave(nested_blocksize)[:blocks] + offset
    return packed, absmax_q, nested, scale


_GUARD = 64  # elements of a known pattern on either side of the output: never written


def _raw_dequant4(mod, packed, stats, nested, n, blocksize, quant_type, dtype, threads=1):
    buf = torch.full((n + 2 * _GUARD,), -7.0, dtype=dtype)
    out = buf[_GUARD : _GUARD + n]
    qt, dt = QUANT_TYPE_IDS[quant_type], DTYPE_IDS[dtype]
    if nested is None:
        nested_args = (0, 0, 0, 0, 1)
    else:
        nab, code, offset, nbs = nested
        nested_args = (nab.data_ptr(), nab.numel(), code.data_ptr(), offset.data_ptr(), nbs)
    mod.dequantize_4bit(
        packed.data_ptr(),
        packed.numel(),
        stats.data_ptr(),
        stats.numel(),
        n,
        blocksize,
        qt,
        out.data_ptr(),
        dt,
        *nested_args,
        threads,
    )
    guards = torch.cat([buf[:_GUARD], buf[_GUARD + n :]])
    assert bool((guards == -7.0).all()), f"dequantize_4bit wrote outside its output (n={n} bs={blocksize})"
    return out


def _torch_dequant4(packed, n, blocksize, quant_type, dtype, scale):
    codes = torch.stack([packed >> 4, packed & 15], 1).reshape(-1)[:n].long()
    return (code4(quant_type)[codes] * scale.repeat_interleave(blocksize)[:n]).to(dtype)


def _check_dequant4(level, seed, n, blocksize, quant_type, regime, nested_blocksize, threads=1):
    """A SIMD level bit for bit the scalar one; the scalar level bit for bit torch's math
    (fp32 product, one rounding to the dtype), NaN compared as NaN: torch's bf16 cast makes
    every NaN 0x7fc0, format.h keeps the payload."""
    mod = cpu_module()
    packed, stats, nested, scale = _dq_case(seed, n, blocksize, regime, nested_blocksize)
    what = f"{level} n={n} bs={blocksize} {quant_type} {regime} nested={nested_blocksize} threads={threads}"
    for dtype in DTYPES:
        got = _raw_dequant4(mod, packed, stats, nested, n, blocksize, quant_type, dtype, threads)
        if level != "scalar":
            prev = mod.set_isa("scalar")
            try:
                want = _raw_dequant4(mod, packed, stats, nested, n, blocksize, quant_type, dtype)
            finally:
                mod.set_isa(prev)
            assert_bits_equal(got, want, f"{what} {dtype} vs scalar")
        else:
            ref = _torch_dequant4(packed, n, blocksize, quant_type, dtype, scale)
            nan = torch.isnan(ref)
            assert torch.equal(torch.isnan(got), nan), what
            assert_bits_equal(got[~nan], ref[~nan], f"{what} {dtype} vs torch")


def test_dequantize_4bit_raw(level):
    """Every even blocksize shape the SIMD kernels take (full and partial blocks, more than
    16 blocks, odd n), odd blocksizes (the scalar kernel at every level), plain and nested
    absmax (nested groups of 256 and of 5 blocks, so groups end inside a 16-block run), and
    finite, special and non-finite statistics."""
    seed = 0
    for blocksize in _DQ_BLOCKSIZES:
        sizes = {1, blocksize + 1, 17 * blocksize + 3, 33 * blocksize}
        if blocksize > 2:
            sizes.add(blocksize - 1)
        for n in sorted(m for m in sizes if m <= 70000):
            for regime in ("normal", "special", "nonfinite"):
                for nested_blocksize in (None, 256, 5):
                    seed += 1
                    quant_type = "nf4" if seed % 2 else "fp4"
                    _check_dequant4(level, seed, n, blocksize, quant_type, regime, nested_blocksize)


def test_dequantize_4bit_raw_threads(level):
    """Three threads: block ranges that start mid-way through a 16-block group and a nested
    group."""
    for blocksize, nested_blocksize in ((64, None), (64, 256), (128, 256), (34, 5)):
        _check_dequant4(level, 7, 200001, blocksize, "nf4", "special", nested_blocksize, threads=3)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 5000),
    blocksize=st.sampled_from(_DQ_BLOCKSIZES + [512, 1024]),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    regime=st.sampled_from(["normal", "special", "nonfinite"]),
    nested_blocksize=st.sampled_from([None, 1, 3, 16, 256]),
    seed=st.integers(0, 2**16),
)
def test_dequantize_4bit_raw_random(level, n, blocksize, quant_type, regime, nested_blocksize, seed):
    _check_dequant4(level, seed, n, blocksize, quant_type, regime, nested_blocksize)


@pytest.mark.parametrize("blocksize", [128, 512, 1024, 2048, 4096])
def test_dequantize_4bit_blocksizes(level, blocksize):
    """The functional op at the blocksizes test_quant_edges leaves out, plain and nested,
    including inputs whose block products are fp32 subnormals: bit for bit the reference."""
    g = torch.Generator().manual_seed(blocksize)
    for scale in (1.0, 1e-37):
        x = torch.randn(3 * blocksize + 37, generator=g) * scale
        for quant_type, dq in (("nf4", True), ("fp4", False)):
            packed, state = reference(qf.quantize_4bit, x, blocksize, quant_type, dq)
            for dtype in DTYPES:
                with qpeft.use_backend("cpu"):
                    got = qf.dequantize_4bit(packed, state, out_dtype=dtype)
                want = reference(qf.dequantize_4bit, packed, state, out_dtype=dtype)
                assert_bits_equal(got, want, f"{level} bs={blocksize} {quant_type} dq={dq} x*{scale} {dtype}")


# 70001: more than one thread's share (csrc/cpu/optim.cpp: 64K elements per thread)
_OPTIM_CASES = [(n, dt) for n in (1, 15, 17, 257, 4097) for dt in DTYPES] + [(70001, torch.float32)]
_optim_ref: dict = {}


def _optim_reference(op, n, dtype):
    """Inputs and the reference's result after 3 steps (computed once per case)."""
    key = (op, n, dtype)
    if key not in _optim_ref:
        g = torch.Generator().manual_seed(n)
        p0 = torch.randn(n, generator=g).to(dtype)
        grads = _grads(n, 3, dtype, seed=n)
        _optim_ref[key] = (p0, grads, _run("default", "auto", op, p0, grads))
    return _optim_ref[key]


@pytest.mark.parametrize("op", OPS)
def test_optimizer_steps(level, op):
    """Three steps bit for bit the reference: sizes around the 16-lane loop, a partial
    256-element state block, the 8-bit threshold and two threads' worth."""
    for n, dtype in _OPTIM_CASES:
        p0, grads, want = _optim_reference(op, n, dtype)
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


@pytest.mark.parametrize("m", [1, 2, 3, 6, 8])  # the AVX2 row groups: 1, 2, 3, 4 + 2, 4 + 4
def test_gemv(level, m):
    """Within the derived bound of tests/_helpers.py (cpu_gemv_roundings covers every
    level's summation order); k % blocksize != 0 takes the scalar kernel at any level."""
    g = torch.Generator().manual_seed(m)
    for n, k, blocksize, nested in (
        (33, 256, 64, True),
        (17, 512, 256, False),
        (5, 96, 32, True),
        (9, 100, 64, False),
        # 280 blocks: the nested group of 256 ends inside row 36 (block 4 of its 7), where
        # the kernels' per-row block-scale cursor must step to the next group
        (40, 448, 64, True),
    ):
        w = torch.randn(n, k, generator=g)
        x = torch.randn(m, k, generator=g)
        packed, state = qf.quantize_4bit(w, blocksize, "nf4", nested)
        with qpeft.use_backend("cpu"):
            y = qf.gemv_4bit(x, packed, state)
        w_deq = reference(qf.dequantize_4bit, packed, state, torch.float32)
        exact = x.double() @ w_deq.double().T
        assert_within(
            y, exact, cpu_gemv_bound(x, w_deq, torch.float32, blocksize), f"{level} m={m} n={n} k={k}"
        )


@pytest.mark.parametrize("name", LEVELS)
def test_inherited_levels(name):
    """Every supported level runs: where it has no kernel of its own for an op, the op's
    kernel is the one the next lower level with a kernel runs (the same function), and one
    case of every op equals the reference (quant) or the scalar level's result."""
    mod, prev = _enter(name)
    try:
        kernels = mod.cpu_info()["kernels"]
        for op, src in kernels.items():
            assert LEVELS.index(src) <= LEVELS.index(name), op
            if src != name:
                mod.set_isa(src)
                assert mod.cpu_info()["kernels"][op] == src, op
                mod.set_isa(name)
        x = torch.randn(333, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
        _check_quant(x, 64, "nf4", True, f"{name} inherited quant")
        for op in OPS:
            p0, grads, want = _optim_reference(op, 4097, torch.float32)
            got = _run("cpu", name, op, p0, grads)
            for i, (a, b) in enumerate(zip(got, want)):
                assert_bits_equal(a, b, f"{op} {name} output {i}")
        w, xg = torch.randn(8, 128), torch.randn(2, 128)
        packed, state = qf.quantize_4bit(w, 64, "fp4", False)
        with qpeft.use_backend("cpu"):
            y = qf.gemv_4bit(xg, packed, state)
        w_deq = reference(qf.dequantize_4bit, packed, state, torch.float32)
        assert_within(y, xg.double() @ w_deq.double().T, cpu_gemv_bound(xg, w_deq, torch.float32, 64), name)
    finally:
        mod.set_isa(prev)


# --- cpu_info() and QPEFT_CPU_ISA -------------------------------------------------------------


def test_cpu_info_contents():
    info = qpeft.cpu_info()
    assert info["levels"] == LEVELS
    f = info["features"]
    assert all(isinstance(v, bool) for v in f.values())
    for name in (
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512_bf16",
        "avx512_vnni",
        "amx_tile",
        "amx_bf16",
    ):
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
    # the fused bf16 GEMMs exist only for the two levels with bf16 dot products, and the
    # one reported is the chosen level's own (none below avx512_bf16: oneDNN panels)
    assert set(info["gemm_levels"]) <= {"avx512_bf16", "amx"}
    chosen = info["chosen_level"]
    assert info["gemm_4bit_bf16"] == (chosen if chosen in info["gemm_levels"] else None)


def test_set_isa_errors():
    mod = cpu_module()
    with pytest.raises(ValueError, match="unknown ISA 'avx9'"):
        mod.set_isa("avx9")
    info = mod.cpu_info()
    for lv in info["missing"]:
        with pytest.raises(ValueError, match="lacks"):
            mod.set_isa(lv)
    prev = mod.set_isa("scalar")
    try:
        assert qpeft.cpu_info()["chosen_level"] == "scalar"
        assert qpeft.cpu_info()["override"] == "scalar"
        assert set(qpeft.cpu_info()["kernels"].values()) == {"scalar"}
        assert qpeft.cpu_info()["gemm_4bit_bf16"] is None
    finally:
        mod.set_isa(prev)


# Loads qpeft._C by its file alone (no torch, no qpeft package: a fast subprocess) and
# calls cpu_info() and one kernel (8-bit dequantize of 40 elements from ctypes buffers).
_PROBE_C = """
import ctypes, importlib.machinery, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("qpeft._C", sys.argv[1])
C = importlib.util.module_from_spec(spec); spec.loader.exec_module(C)
out = {}
try:
    out["info"] = C.cpu_info()
except ValueError as e:
    out["info_error"] = str(e)
q = (ctypes.c_uint8 * 40)(*range(40)); absmax = (ctypes.c_float * 1)(2.0)
code = (ctypes.c_float * 256)(*[i / 255.0 for i in range(256)]); res = (ctypes.c_float * 40)()
a = ctypes.addressof
try:
    C.dequantize_blockwise(a(q), 40, a(absmax), 1, a(code), 40, 64, a(res), 0, 1)
    out["op"] = [res[i] for i in range(40)]
except ValueError as e:
    out["op_error"] = str(e)
print(json.dumps(out))
"""

# The public API in a fresh process: qpeft.cpu_info() and an op on the cpu backend.
_PROBE_API = """
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


def _probe(env_value: str, api: bool = False) -> dict:
    env = dict(os.environ, QPEFT_CPU_ISA=env_value)
    args = ["-c", _PROBE_API] if api else ["-c", _PROBE_C, cpu_module().__file__]
    r = subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=120, cwd=os.getcwd()
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_env_cap_and_clamp():
    """QPEFT_CPU_ISA=avx2 caps the level (or is clamped, with a note, on a CPU without
    AVX2); QPEFT_CPU_ISA=amx on a CPU below amx is clamped to the detected level. The
    kernels run either way."""
    import ctypes

    detected = cpu_module().cpu_info()["detected_level"]
    # code[q] * absmax with code[q] = fp32(q / 255) and absmax 2 (an exact product)
    want = [ctypes.c_float(i / 255.0).value * 2.0 for i in range(40)]
    for cap in ("avx2", "amx"):
        out = _probe(cap)
        info = out["info"]
        assert info["cap"] == cap and info["detected_level"] == detected
        if LEVELS.index(cap) <= LEVELS.index(detected):
            assert info["chosen_level"] == cap and info["note"] is None
        else:
            assert info["chosen_level"] == detected
            assert "clamped to " + detected in info["note"] and "missing" in info["note"]
        for src in info["kernels"].values():
            assert LEVELS.index(src) <= LEVELS.index(info["chosen_level"])
        assert out["op"] == want


@pytest.mark.parametrize("api", [False, True], ids=["module", "public_api"])
def test_env_invalid(api):
    """An invalid QPEFT_CPU_ISA is a ValueError naming it and the valid levels, from
    cpu_info() and from the first kernel call, every time (never a silent fallback)."""
    out = _probe("avx1024", api=api)
    for key in ("info_error", "op_error"):
        assert "QPEFT_CPU_ISA='avx1024'" in out[key], out
        assert "scalar, avx2, avx512, avx512_bf16, amx" in out[key]
