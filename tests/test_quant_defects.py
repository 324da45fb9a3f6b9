"""Regression tests for quantization-format and module defects found from outside:
bitsandbytes' own behaviour on CPU (bitsandbytes is a test extra), fuzzing and fork().

Every backend is held to bitsandbytes' bytes: the reference ("default"), the C++ CPU
kernels (scalar and AVX2), the CUDA kernels emulated on CPU ("cuda_emulated") and
Triton (under TRITON_INTERPRET=1 without a GPU, set by conftest.py).
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qpeft
import qpeft.functional as qf
from qpeft import _native

from .conftest import DTYPES, assert_bits_equal
from .emu_support import emu_module

bnbF = pytest.importorskip("bitsandbytes.functional")

# (backend, CPU ISA or None): every implementation of the quantize ops.
IMPLS = [("default", None), ("cpu", "scalar"), ("cpu", "avx2"), ("cuda_emulated", None), ("triton", None)]


@pytest.fixture(params=IMPLS, ids=lambda p: p[0] if p[1] is None else f"{p[0]}-{p[1]}")
def impl(request):
    backend, isa = request.param
    if backend == "cuda_emulated":
        emu_module()
    if backend == "triton":
        pytest.importorskip("triton")
    prev = None
    if isa is not None:
        mod = _native.cpu_module()
        if isa == "avx2" and not mod.cpu_features()["avx2"]:
            pytest.skip("this CPU has no AVX2")  # the scalar kernel is still tested
        prev = mod.set_isa(isa)
    with qpeft.use_backend(backend):
        yield backend
    if prev is not None:
        _native.cpu_module().set_isa(prev)


def _assert_4bit_like_bnb(x, blocksize, quant_type, double_quant):
    packed_ref, st_ref = bnbF.quantize_4bit(
        x, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
    )
    packed, st = qf.quantize_4bit(x, blocksize, quant_type, double_quant)
    assert_bits_equal(packed, packed_ref, "packed")
    assert_bits_equal(st.absmax, st_ref.absmax, "absmax")
    if double_quant:
        assert_bits_equal(st.state2.absmax, st_ref.state2.absmax, "nested absmax")
        assert_bits_equal(st.offset.reshape(()), st_ref.offset.reshape(()), "offset")
    # What a checkpoint written by either decodes to (bitsandbytes' own dequantizer). By
    # value: bitsandbytes' native AVX2 CPU and CUDA FP4 decoders write -0.0 for FP4's "-0"
    # code, qpeft +0.0 as the stored table (qpeft/_formats.py).
    decoded = qf.dequantize_4bit(packed, st).reshape(-1)
    assert torch.equal(decoded, bnbF.dequantize_4bit(packed_ref, st_ref).reshape(-1))


# --- 1. absmax of a partial last block below 1e-38 ---------------------------------------


def _denormal_cases():
    tiny = 1e-40  # an fp32 subnormal, below the 1e-38 floor
    g = torch.Generator().manual_seed(0)
    return {
        # a partial last block of subnormals: bitsandbytes stores max(absmax, 1e-38) there
        "partial-denormal": torch.cat([torch.randn(64, generator=g), torch.randn(36, generator=g) * tiny]),
        # a single (partial) block of subnormals
        "single-partial": torch.randn(7, generator=g) * tiny,
        # all-denormal full blocks keep their raw absmax (only the reciprocal is floored)
        "full-denormal": torch.randn(128, generator=g) * tiny,
        # a zero partial last block stores 1e-38; a zero full block stores 0
        "zeros": torch.zeros(64 + 32 + 5),
        "zero-tail": torch.cat([torch.randn(64, generator=g), torch.zeros(3)]),
    }


@pytest.mark.parametrize("case", list(_denormal_cases()))
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_4bit_denormal_absmax_matches_bitsandbytes(impl, case, quant_type, double_quant):
    _assert_4bit_like_bnb(_denormal_cases()[case], 64, quant_type, double_quant)


def test_partial_block_absmax_is_floored():
    # The rule itself, independent of bitsandbytes being installed in a given version.
    x = torch.cat([torch.full((64,), 1e-40), torch.full((3,), 1e-40)])
    _, st = qf.quantize_4bit(x, 64, "nf4", double_quant=False)
    assert st.absmax[0].item() == torch.tensor(1e-40).item()  # full block: raw
    assert st.absmax[1].item() == torch.tensor(1e-38).item()  # partial block: floored


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 700),
    blocksize=st.sampled_from([32, 64, 128, 256]),
    exponent=st.integers(-45, -30),
    dtype=st.sampled_from(DTYPES),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    double_quant=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_4bit_tiny_inputs_fuzz_against_bitsandbytes(
    n, blocksize, exponent, dtype, quant_type, double_quant, seed
):
    g = torch.Generator().manual_seed(seed)
    # fp32 reaches the subnormal range; fp16 flushes to zero there and bf16 keeps subnormals
    x = (torch.randn(n, generator=g) * 10.0**exponent).to(dtype)
    for backend in ("default", "cpu"):
        with qpeft.use_backend(backend):
            _assert_4bit_like_bnb(x, blocksize, quant_type, double_quant)


# --- 2. every positive 8-bit blocksize, as bitsandbytes' CPU quantize_blockwise -----------


@pytest.mark.parametrize("blocksize", [1, 3, 100, 8192, 16384, 50000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_8bit_blocksizes_bitsandbytes_accepts(impl, blocksize, dtype):
    slow = impl in ("cuda_emulated", "triton")  # one program per block: keep the block count small
    n = 3 * blocksize + 5 if blocksize <= 100 and slow else 40_000
    g = torch.Generator().manual_seed(blocksize)
    x = torch.randn(n, generator=g).to(dtype)
    x[n // 3] = 0.0
    x[: min(blocksize, 7)] = 0.0  # an all-zero block when the blocksize is small
    q_ref, st_ref = bnbF.quantize_blockwise(x, blocksize=blocksize)
    q, st = qf.quantize_blockwise(x, blocksize=blocksize)
    assert_bits_equal(q, q_ref, "codes")
    assert_bits_equal(st.absmax, st_ref.absmax, "absmax")
    assert_bits_equal(qf.dequantize_blockwise(q, st), bnbF.dequantize_blockwise(q_ref, st_ref), "decoded")


@pytest.mark.parametrize("blocksize", [0, -64])
def test_8bit_blocksize_must_be_positive(blocksize):
    with pytest.raises(ValueError, match="blocksize must be a positive integer"):
        qf.quantize_blockwise(torch.randn(16), blocksize=blocksize)


@pytest.mark.parametrize("blocksize", [256, 100, 16, 8192])
@pytest.mark.parametrize("writer", ["qpeft", "bitsandbytes"])
def test_8bit_state_dict_round_trip_any_blocksize(blocksize, writer):
    """QuantState.from_dict / validate take the 8-bit states quantize_blockwise (and
    bitsandbytes) produce at any positive blocksize; they refused all but the 4-bit ones."""
    x = torch.randn(1000, generator=torch.Generator().manual_seed(blocksize))
    q, st = qf.quantize_blockwise(x, blocksize=blocksize)
    if writer == "bitsandbytes":
        q, st = bnbF.quantize_blockwise(x, blocksize=blocksize)
    want = qf.dequantize_blockwise(q, qpeft.QuantState(absmax=st.absmax, code=st.code, blocksize=blocksize))
    for strict in (False, True):
        st2 = qpeft.QuantState.from_dict(st.as_dict(), "cpu", strict=strict)
        assert st2.quant_type is None and st2.blocksize == blocksize
        st2.validate()
        assert_bits_equal(qf.dequantize_blockwise(q, st2), want, f"decoded, strict={strict}")
    if writer == "bitsandbytes":
        assert_bits_equal(want, bnbF.dequantize_blockwise(q, st), "bitsandbytes' decode")


@pytest.mark.parametrize("blocksize", [0, -8, True, "64"])
def test_8bit_state_dict_blocksize_must_be_a_positive_int(blocksize):
    _, st = qf.quantize_blockwise(torch.randn(100), blocksize=64)
    d = st.as_dict()
    d["blocksize"] = blocksize
    with pytest.raises(ValueError, match="blocksize"):
        qpeft.QuantState.from_dict(d, "cpu")


def test_4bit_state_dict_keeps_the_4bit_blocksizes():
    _, st = qf.quantize_4bit(torch.randn(256), 64, "nf4", double_quant=False)
    d = st.as_dict()
    d["blocksize"] = 100
    with pytest.raises(ValueError, match="unsupported blocksize 100"):
        qpeft.QuantState.from_dict(d, "cpu")
    st.blocksize = 100
    with pytest.raises(ValueError, match="unsupported blocksize 100"):
        st.validate()


def test_4bit_blocksizes_stay_bitsandbytes_set():
    # bitsandbytes' quantize_4bit takes only 32..4096; so does qpeft's.
    for bs in (16, 8192):
        with pytest.raises(ValueError):
            bnbF.quantize_4bit(torch.randn(64), blocksize=bs)
        with pytest.raises(ValueError, match="blocksize"):
            qf.quantize_4bit(torch.randn(64), bs)


# --- 3. clear errors at the module / conversion boundary ---------------------------------


def _mlp(device=None):
    return nn.Sequential(nn.Linear(64, 64, device=device), nn.ReLU(), nn.Linear(64, 32, device=device))


def test_second_convert_says_already_converted():
    model = qpeft.convert(_mlp(), verbose=False)
    with pytest.raises(ValueError, match="already converted"):
        qpeft.convert(model, verbose=False)


def test_all_linear_convert_after_partial_convert_converts_the_rest():
    model = qpeft.convert(_mlp(), target_modules=["0"], verbose=False)
    qpeft.convert(model, verbose=False, adapter_name="default")
    assert isinstance(model[2], qpeft.nn.QLoRALinear)


def test_convert_on_meta_builds_meta_4bit_layers_and_refuses_dora():
    # a meta model converts to meta 4-bit layers (qpeft.load_safetensors fills them:
    # tests/test_meta_load.py); DoRA needs the base weights' values and is refused
    model = qpeft.convert(_mlp(device="meta"), verbose=False)
    assert isinstance(model[0].weight, qpeft.Weight4bit) and model[0].weight.is_meta
    with pytest.raises(ValueError, match="use_dora=True needs the base weights"):
        qpeft.convert(_mlp(device="meta"), use_dora=True, verbose=False)


@pytest.mark.parametrize("alpha", ["16", True, None, float("nan")])
def test_string_or_bool_alpha_is_refused_at_the_boundary(alpha):
    lin = nn.Linear(64, 32)
    with pytest.raises(TypeError, match="alpha must be a finite real number"):
        qpeft.nn.QLoRALinear.from_linear(lin, 8, alpha)
    with pytest.raises(TypeError, match="alpha must be a finite real number"):
        qpeft.nn.QLoRALinear(lin, alpha=alpha)
    model = _mlp()
    with pytest.raises(TypeError, match="alpha must be a finite real number"):
        qpeft.convert(model, alpha=alpha, verbose=False)
    assert isinstance(model[0], nn.Linear)  # refused before anything was converted
    model = qpeft.convert(model, verbose=False)
    with pytest.raises(TypeError, match="alpha must be a finite real number"):
        qpeft.add_adapter(model, "second", alpha=alpha)
    with pytest.raises(TypeError, match="alpha must be a finite real number"):
        model[0].add_adapter("second", alpha=alpha)


@pytest.mark.parametrize("dropout", ["0.1", True, 1.0])
def test_bad_dropout_is_refused(dropout):
    with pytest.raises(ValueError, match="dropout must be a number in"):
        qpeft.convert(_mlp(), dropout=dropout, verbose=False)


# --- 4. kernels in a child of fork() ------------------------------------------------------


def _wait(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"the forked child hung (killed after {timeout} s)")


@pytest.mark.parametrize("threading", ["openmp", "pool"])
def test_kernels_in_a_forked_child(threading):
    mod = _native.cpu_module()
    mod.set_threading(threading)  # "openmp": torch's libgomp team, used by the parent
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(512, 1024, generator=g)  # > 64K elements per thread: both threads work
        with qpeft.use_backend("cpu"):
            packed, st = qf.quantize_4bit(x, 64, "nf4", True)  # also the 8-bit nested encoder
            q8, st8 = qf.quantize_blockwise(x)
        expected = [packed, st.state2.absmax, q8, st8.absmax]
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            code = 1
            try:
                torch.set_num_threads(1)  # torch's own parallel ops may hang after fork (csrc/README.md)
                with qpeft.use_backend("cpu"):
                    got_4, got_st = qf.quantize_4bit(x, 64, "nf4", True)
                    got_8, got_st8 = qf.quantize_blockwise(x)
                got = [got_4, got_st.state2.absmax, got_8, got_st8.absmax]
                # the raw entry point with 2 threads: qpeft's own pool in the child
                raw = torch.empty_like(packed)
                absmax = torch.empty(x.numel() // 64)
                args = (x.data_ptr(), 0, x.numel(), 64, 2, raw.data_ptr(), raw.numel())
                mod.quantize_4bit(*args, absmax.data_ptr(), absmax.numel(), 2)
                same = all(torch.equal(a, b) for a, b in zip(got, expected)) and torch.equal(raw, packed)
                code = 0 if same and mod.threading() == "pool" else 3
            finally:
                os._exit(code)
        assert _wait(pid, 120) == 0, "the child's results differ from the parent's (or it crashed)"
    finally:
        torch.set_num_threads(prev_threads)
        mod.set_threading("auto")


# --- dequantize_4bit(out=) and the double-quantization statistics ----------------------


@pytest.mark.parametrize("shared", ["state2.absmax", "state2.code", "offset"])
def test_dequantize_4bit_out_overlapping_nested_statistics_is_refused(shared):
    """out= was checked against packed and state.absmax only: an out sharing memory with a
    double-quantization tensor was decoded from statistics it had partly overwritten."""
    x = torch.randn(64 * 300, generator=torch.Generator().manual_seed(0))
    packed, st = qf.quantize_4bit(x, 64, "nf4", double_quant=True)
    ref = qf.dequantize_4bit(packed, st)
    buf = torch.zeros(x.numel())
    if shared == "offset":
        buf[:1] = st.offset.reshape(1)
        st.offset = buf[0]
    else:
        t = getattr(st.state2, shared.split(".")[1])
        buf[: t.numel()] = t
        setattr(st.state2, shared.split(".")[1], buf[: t.numel()])
    assert torch.equal(qf.dequantize_4bit(packed, st), ref)  # the state itself still decodes
    with pytest.raises(ValueError, match=f"out overlaps state.{shared}"):
        qf.dequantize_4bit(packed, st, out=buf)
    qf.dequantize_4bit(packed, st, out=torch.empty_like(buf))  # a separate out is fine
