"""The C++ CPU kernels beyond the reference comparison: every SIMD path against the
scalar path, thread counts and 64-bit indexing (the shared tables: tests/test_formats.py)."""

from __future__ import annotations

import pytest
import torch

import qpeft
import qpeft.functional as qf
import qpeft.optim
from qpeft._native import cpu_module

from .conftest import DTYPES, assert_bits_equal


@pytest.fixture
def native():
    return cpu_module()


def _isa_paths(native):
    feats = native.cpu_features()
    return ["scalar"] + (["avx2"] if feats["avx2"] and feats["fma"] and feats["f16c"] else [])


def _run_all(x, double_quant, quant_type, blocksize):
    packed, state = qf.quantize_4bit(x, blocksize, quant_type, double_quant, allow_nonfinite=True)
    outs = [qf.dequantize_4bit(packed, state, out_dtype=d) for d in DTYPES]
    q8, s8 = qf.quantize_blockwise(x, blocksize, allow_nonfinite=True)
    outs += [qf.dequantize_blockwise(q8, s8, d) for d in DTYPES]
    return [packed, state.absmax, q8, s8.absmax, *outs]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_simd_equals_scalar(native, dtype, quant_type):
    g = torch.Generator().manual_seed(7)
    inputs = [
        torch.randn(4096 * 3 + 77, generator=g),
        torch.randn(1, generator=g),
        torch.randn(33, generator=g) * 1e-20,
        torch.tensor([0.0, -0.0, 1e-45, -1e-40, 65504.0, -65504.0, 3.0, -3.0] * 33),
        torch.tensor([float("nan"), 1.0, float("inf"), -2.0] + [0.5] * 200),
        # products that round up past the largest finite bf16 (to inf)
        torch.tensor([3.4028235e38, -3.4028235e38, 1.0, -2.5e38] * 40),
    ]
    for x in inputs:
        x = x.to(dtype)
        for blocksize in (32, 64, 256, 4096):
            for dq in (False, True):
                # double quant rejects non-finite inputs, and absmax values whose mean overflows
                if dq and not bool((x.float().abs() < 1e38).all()):
                    continue
                results = {}
                for isa in _isa_paths(native):
                    prev = native.set_isa(isa)
                    try:
                        with qpeft.use_backend("cpu"):
                            results[isa] = _run_all(x, dq, quant_type, blocksize)
                    finally:
                        native.set_isa(prev)
                for isa, outs in results.items():
                    for i, (a, b) in enumerate(zip(outs, results["scalar"])):
                        assert_bits_equal(a, b, f"{isa} vs scalar, output {i}, n={x.numel()} bs={blocksize}")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_agree(threads):
    x = torch.randn(1000, 333, dtype=torch.bfloat16)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with qpeft.use_backend("cpu"):
            want = _run_all(x, True, "nf4", 64)
        torch.set_num_threads(threads)
        with qpeft.use_backend("cpu"):
            got = _run_all(x, True, "nf4", 64)
    finally:
        torch.set_num_threads(old)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_bits_equal(a, b, f"output {i} with {threads} threads")


@pytest.fixture
def threading(native):
    """Runs a test body under each of the native module's threading modes."""
    prev = native.threading()
    modes = ["pool"] + (["openmp"] if prev == "openmp" else [])
    yield modes
    native.set_threading(prev)


def test_threading_modes_agree(native, threading):
    # torch's CPU wheel runs on libgomp, so "auto" picks its OpenMP team here
    assert native.threading() == "openmp"
    x = torch.randn(1000, 333, dtype=torch.bfloat16)
    ps = [torch.randn(70_000), torch.randn(300), torch.randn(5000)]
    results = {}
    for mode in threading:
        native.set_threading(mode)
        assert native.threading() == mode
        with qpeft.use_backend("cpu"):
            outs = _run_all(x, True, "nf4", 64)
            for cls in (qpeft.optim.AdamW, qpeft.optim.AdamW8bit):
                params = [torch.nn.Parameter(p.clone()) for p in ps]
                opt = cls(params, weight_decay=0.1)
                for step in range(3):
                    for i, p in enumerate(params):
                        p.grad = torch.sin(p.detach() * (step + i + 1))
                    opt.step()
                outs += [p.detach() for p in params]
        results[mode] = outs
    for mode, outs in results.items():
        for i, (a, b) in enumerate(zip(outs, results["pool"])):
            assert_bits_equal(a, b, f"output {i} with threading={mode}")
    with pytest.raises(ValueError, match="unknown threading 'fast'"):
        native.set_threading("fast")


def test_concurrent_python_threads(native, threading):
    """Python threads calling kernels at once (the GIL is released inside): each call
    gets its own parallel region (or runs serially when the pool is busy), and every
    result is the single-threaded one."""
    import concurrent.futures

    xs = [torch.randn(700, 512, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    with qpeft.use_backend("cpu"):
        packed = [qf.quantize_4bit(x) for x in xs]
        want = [qf.dequantize_4bit(p, s) for p, s in packed]
        for mode in threading:
            native.set_threading(mode)

            def work(i):
                p, s = packed[i % len(xs)]
                return [qf.dequantize_4bit(p, s) for _ in range(5)]

            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                for i, outs in enumerate(pool.map(work, range(12))):
                    for got in outs:
                        assert_bits_equal(got, want[i % len(xs)], f"thread {i}, threading={mode}")


_FORK_SCRIPT = """
import os, sys, torch
import qpeft.functional as qf
from qpeft._native import cpu_module
C = cpu_module()
assert C.threading() == sys.argv[1], C.threading()
w = torch.randn(512, 512)
packed, state = qf.quantize_4bit(w, double_quant=False)
out = torch.empty(512, 512)
# Only the raw kernel and numpy in the child: torch's own parallel ops (even a
# clone) hang in a child forked after libgomp ran, with or without qpeft.
def dequant():
    C.dequantize_4bit(packed.data_ptr(), packed.numel(), state.absmax.data_ptr(), state.absmax.numel(),
                      w.numel(), 64, 2, out.data_ptr(), 0, 0, 0, 0, 0, 0, 2)
    return out.numpy().copy()
want = dequant()
out.zero_()
pid = os.fork()
if pid == 0:
    os._exit(0 if (dequant() == want).all() else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_kernels_run_in_a_forked_child(native):
    """A child of fork() cannot use the parent's OpenMP team; the kernels fall back
    to a fresh pool there instead of hanging."""
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", _FORK_SCRIPT, native.threading()], capture_output=True, timeout=60
    )
    assert r.returncode == 0, r.stderr.decode()[-2000:]


def test_native_rechecks_sizes(native):
    # Python validates first; the raw entry points refuse inconsistent sizes on their own.
    x = torch.randn(128)
    packed = torch.empty(10, dtype=torch.uint8)
    absmax = torch.empty(2)
    with pytest.raises(ValueError):
        native.quantize_4bit(
            x.data_ptr(), 0, 128, 64, 2, packed.data_ptr(), packed.numel(), absmax.data_ptr(), 2, 1
        )
    with pytest.raises(ValueError):
        native.quantize_4bit(x.data_ptr(), 0, 128, 64, 2, packed.data_ptr(), 64, absmax.data_ptr(), 1, 1)


HUGE = 2**31 + 4096 + 64 + 3  # past int32 indexing, with a partial last block


def test_dequantize_beyond_2_31_elements():
    # 1 GiB of packed codes -> 4 GiB of bf16: element indices past 2^31 must be addressed correctly.
    blocksize = 4096
    nblocks = -(HUGE // -blocksize)
    packed = torch.full(((HUGE + 1) // 2, 1), 0xF0, dtype=torch.uint8)  # codes 15 (1.0) then 0 (-1.0)
    absmax = torch.arange(1, nblocks + 1, dtype=torch.float32)
    with qpeft.use_backend("cpu"):
        out = torch.ops.qpeft.dequantize_4bit(packed, absmax, blocksize, "nf4", [HUGE], torch.bfloat16)
    tail = out[-(2 * blocksize + 64) :].float()
    del out, packed
    idx = torch.arange(HUGE - tail.numel(), HUGE)
    sign = torch.where(idx % 2 == 0, 1.0, -1.0)
    expected = (sign * (idx // blocksize + 1).float()).to(torch.bfloat16).float()
    assert torch.equal(tail, expected)


def test_quantize_beyond_2_31_elements():
    x = torch.zeros(HUGE, dtype=torch.bfloat16)
    x[-1] = 3.0  # last, partial block
    x[-4096 - 65] = -2.0  # the last full block
    with qpeft.use_backend("cpu"):
        packed, absmax = torch.ops.qpeft.quantize_4bit(x, 4096, "nf4")
    del x
    assert absmax.numel() == -(HUGE // -4096)
    assert absmax[-1] == 3.0 and absmax[-2] == 2.0 and bool((absmax[:-2] == 0).all())
    assert packed[-1, 0] == (15 << 4) | 7  # 3.0 -> code 15, then the padding nibble (code of 0.0)
    byte = (HUGE - 4096 - 65) // 2  # even index: high nibble
    assert packed[byte, 0] == (0 << 4) | 7
    assert int(packed[:byte].max()) == 0x77 and int(packed[:byte].min()) == 0x77
