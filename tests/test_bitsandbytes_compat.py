"""Bit-compatibility with bitsandbytes (>= 0.45; CI installs 0.50.x) on CPU.

Codes, absmax, nested statistics and dequantized values must be identical, and
serialized states must load in both directions.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import qpeft.functional as qf
from qpeft import QuantState
from qpeft._formats import BLOCKSIZES_4BIT, code4, dynamic_map

from ._helpers import assert_same_values
from .conftest import CPU_BACKENDS, DTYPES, assert_bits_equal

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    bnb = pytest.importorskip("bitsandbytes")
    bnbF = pytest.importorskip("bitsandbytes.functional")

BACKENDS = ["default", *CPU_BACKENDS]
SIZES = [1, 7, 64, 4097, 64 * 300 + 33, 70_000]


def _bnb_quantize(x, blocksize, quant_type, double_quant):
    return bnbF.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", BLOCKSIZES_4BIT)
def test_quantize_4bit_identical(backend, dtype, quant_type, double_quant, blocksize):
    g = torch.Generator().manual_seed(blocksize)
    for n in SIZES:
        x = (torch.randn(n, generator=g) * 2.5).to(dtype)
        p_bnb, s_bnb = _bnb_quantize(x, blocksize, quant_type, double_quant)
        packed, state = qf.quantize_4bit(x, blocksize, quant_type, double_quant)
        what = f"n={n}"
        assert_bits_equal(packed, p_bnb, f"{what} packed codes")
        assert_bits_equal(state.absmax, s_bnb.absmax, f"{what} absmax")
        assert torch.equal(state.code, s_bnb.code)
        if double_quant:
            assert_bits_equal(state.offset, s_bnb.offset, f"{what} offset")
            assert_bits_equal(state.state2.absmax, s_bnb.state2.absmax, f"{what} nested absmax")
            assert_bits_equal(state.state2.code, s_bnb.state2.code, f"{what} nested code")
            assert state.state2.blocksize == s_bnb.state2.blocksize == 256
        out = qf.dequantize_4bit(packed, state)
        ref = bnbF.dequantize_4bit(p_bnb, s_bnb)
        assert out.dtype == ref.dtype == dtype and out.shape == x.shape
        ref = ref.reshape(x.shape)  # bitsandbytes' CPU kernel returns 1-D inputs as [1, n]
        if quant_type == "fp4":
            # FP4 code 8 is the negative zero. bitsandbytes disagrees with itself on its sign:
            # its table (and its AVX-512 CPU kernel) give +0.0, its CUDA and AVX2 CPU kernels
            # compute sign * 0 = -0.0. qpeft follows the table. Adding +0.0 turns -0.0 into
            # +0.0 and changes no other value, so every other element is still compared bit
            # for bit (and the packed codes above are identical).
            out, ref = out + 0.0, ref + 0.0
        assert_bits_equal(out, ref, f"{what} dequantized")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("signed", [True, False])
def test_quantize_blockwise_identical(backend, dtype, signed):
    g = torch.Generator().manual_seed(3)
    code = dynamic_map(signed=signed)
    for n in (5, 256, 1000, 256 * 77 + 13):
        x = torch.randn(n, generator=g) * 4
        x = (x if signed else x.abs()).to(dtype)
        q_bnb, s_bnb = bnbF.quantize_blockwise(x, code=code.clone(), blocksize=256)
        q, s = qf.quantize_blockwise(x, 256, code)
        assert_bits_equal(q, q_bnb, f"n={n} 8-bit codes")
        assert_bits_equal(s.absmax, s_bnb.absmax, f"n={n} 8-bit absmax")
        assert_bits_equal(
            qf.dequantize_blockwise(q, s), bnbF.dequantize_blockwise(q_bnb, s_bnb), "8-bit values"
        )


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [64, 100, 256, 4096])
def test_nested_quantize_blockwise_identical(backend, dtype, blocksize):
    # bitsandbytes' quantize_blockwise(nested=True): its state loaded with from_dict failed in
    # dequantize_blockwise ("absmax must be torch.float32, got torch.uint8"), and qpeft had
    # no nested=True
    g = torch.Generator().manual_seed(blocksize)
    for n in (1, 5, 256, 1000, 256 * 77 + 13, 70_000):
        x = (torch.randn(n, generator=g) * 4).to(dtype)
        q_bnb, s_bnb = bnbF.quantize_blockwise(x, blocksize=blocksize, nested=True)
        q, s = qf.quantize_blockwise(x, blocksize, nested=True)
        what = f"n={n}"
        assert s.nested and s.state2.blocksize == s_bnb.state2.blocksize == blocksize
        assert_bits_equal(q, q_bnb, f"{what} 8-bit codes")
        assert_bits_equal(s.absmax, s_bnb.absmax, f"{what} absmax codes")
        assert_bits_equal(s.offset, s_bnb.offset, f"{what} offset")
        assert_bits_equal(s.state2.absmax, s_bnb.state2.absmax, f"{what} nested absmax")
        assert_bits_equal(s.state2.code, s_bnb.state2.code, f"{what} nested code")
        ref = bnbF.dequantize_blockwise(q_bnb, s_bnb)
        assert_bits_equal(qf.dequantize_blockwise(q, s), ref, f"{what} values")
        # bitsandbytes' state through from_dict, and qpeft's through bitsandbytes' from_dict
        loaded = QuantState.from_dict(s_bnb.as_dict(), "cpu", strict=True)
        assert_bits_equal(qf.dequantize_blockwise(q_bnb, loaded), ref, f"{what} values (bnb state)")
        theirs = bnbF.QuantState.from_dict(s.as_dict(), "cpu")
        assert_bits_equal(bnbF.dequantize_blockwise(q, theirs), ref, f"{what} values (in bnb)")
        out = torch.empty(x.shape, dtype=dtype)  # (bitsandbytes' CPU build has no out= kernel)
        assert_bits_equal(qf.dequantize_blockwise(q, s, out=out), ref, f"{what} values (out=)")


def test_nested_blockwise_state_errors_name_the_field():
    q, s = qf.quantize_blockwise(torch.randn(1000), 256, nested=True)
    s.absmax = s.absmax.float()
    with pytest.raises(TypeError, match="state.absmax of a nested state must hold uint8 codes"):
        qf.dequantize_blockwise(q, s)
    q, s = qf.quantize_blockwise(torch.randn(1000), 256, nested=True)
    s.offset = 0.5
    with pytest.raises(TypeError, match="state.offset of a nested state must be one floating-point number"):
        qf.dequantize_blockwise(q, s)
    q, s = qf.quantize_blockwise(torch.randn(1000), 256, nested=True)
    s.state2.absmax = s.state2.absmax[:0]
    with pytest.raises(ValueError, match="absmax has 0 elements"):
        qf.dequantize_blockwise(q, s)


def test_tables_match_bitsandbytes():
    for qt in ("nf4", "fp4"):
        assert_bits_equal(code4(qt), bnbF.get_4bit_type(qt, device="cpu"), f"{qt} table")
    for signed in (True, False):
        assert_bits_equal(
            dynamic_map(signed), bnbF.create_dynamic_map(signed=signed), f"dynamic map {signed}"
        )


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_state_dict_bitsandbytes_to_qpeft(double_quant, quant_type):
    x = torch.randn(96, 40, dtype=torch.bfloat16)
    p_bnb, s_bnb = _bnb_quantize(x, 64, quant_type, double_quant)
    d = {f"weight.{k}": v for k, v in s_bnb.as_dict(packed=True).items()}
    state = QuantState.from_dict(d, device="cpu")
    assert state.shape == x.shape and state.dtype == x.dtype and state.nested == double_quant
    assert torch.equal(qf.dequantize_4bit(p_bnb, state), bnbF.dequantize_4bit(p_bnb, s_bnb))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_state_dict_qpeft_to_bitsandbytes(double_quant, quant_type):
    x = torch.randn(33, 70, dtype=torch.float16)
    packed, state = qf.quantize_4bit(x, 128, quant_type, double_quant)
    ours = state.as_dict(packed=True)
    theirs = _bnb_quantize(x, 128, quant_type, double_quant)[1].as_dict(packed=True)
    assert ours.keys() == theirs.keys()
    for k in ours:  # identical tensors, including the JSON bytes of the packed entry
        assert_bits_equal(ours[k], theirs[k], k)
    s_bnb = bnbF.QuantState.from_dict(dict(ours), device="cpu")
    assert torch.equal(bnbF.dequantize_4bit(packed, s_bnb), qf.dequantize_4bit(packed, state))


def test_nonfinite_blocks_are_nonfinite_like_bitsandbytes():
    x = torch.randn(256)
    x[3], x[200] = float("nan"), float("inf")
    packed, state = qf.quantize_4bit(x, 64, allow_nonfinite=True, double_quant=False)
    p_bnb, s_bnb = _bnb_quantize(x, 64, "nf4", False)
    ours, theirs = qf.dequantize_4bit(packed, state), bnbF.dequantize_4bit(p_bnb, s_bnb).reshape(-1)
    for blk in range(4):
        sl = slice(64 * blk, 64 * blk + 64)
        assert bool(torch.isfinite(ours[sl]).all()) == bool(torch.isfinite(theirs[sl]).all()), blk
    assert bool(torch.isfinite(ours[64:192]).all())
    assert torch.equal(ours[64:192], theirs[64:192])


NONFINITE = {"inf": float("inf"), "-inf": float("-inf"), "nan": float("nan")}


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("value", list(NONFINITE))
def test_nonfinite_double_quant_identical_to_bitsandbytes(backend, dtype, quant_type, value):
    """allow_nonfinite=True with double quantization: the offset (the mean of the block
    absmax values) is then non-finite too, and bitsandbytes keeps it and quantizes the
    nested statistics anyway. qpeft used to refuse this ("double quantization overflowed")."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(96, 64, generator=g)
    x[3, 5] = NONFINITE[value]
    x[50, 1] = -NONFINITE[value]
    x = x.to(dtype)
    p_bnb, s_bnb = _bnb_quantize(x, 64, quant_type, True)
    packed, state = qf.quantize_4bit(x, 64, quant_type, True, allow_nonfinite=True)
    assert_bits_equal(packed, p_bnb, "packed codes")
    assert_bits_equal(state.absmax, s_bnb.absmax, "absmax codes")
    # NaN's payload is not compared: from bf16 input bitsandbytes' NaN block maximum (and so
    # the mean) carries the bits 0x7fff0000, qpeft's the canonical 0x7fc00000
    assert_same_values(state.offset.reshape(-1), s_bnb.offset.reshape(-1), "offset")
    assert not bool(torch.isfinite(state.offset))
    assert_bits_equal(state.state2.absmax, s_bnb.state2.absmax, "nested absmax")
    assert_bits_equal(state.state2.code, s_bnb.state2.code, "nested code")
    ours, theirs = qf.dequantize_4bit(packed, state), bnbF.dequantize_4bit(p_bnb, s_bnb).reshape(x.shape)
    assert torch.equal(ours.isnan(), theirs.isnan())
    assert torch.equal(ours.nan_to_num(), theirs.nan_to_num())


def test_double_quant_overflow_identical_to_bitsandbytes_when_allowed():
    """Finite input whose block maxima sum past fp32's range: the offset overflows to inf.
    Refused by default (a clear error), quantized as bitsandbytes does on request."""
    x = torch.tensor([3e38, -3e38, 1e38, 1.0] * 64)
    with pytest.raises(ValueError, match="double quantization overflowed.*allow_nonfinite=True"):
        qf.quantize_4bit(x, 32, "nf4", True)
    packed, state = qf.quantize_4bit(x, 32, "nf4", True, allow_nonfinite=True)
    p_bnb, s_bnb = _bnb_quantize(x, 32, "nf4", True)
    assert float(state.offset) == float("inf")
    assert_bits_equal(packed, p_bnb, "packed codes")
    assert_bits_equal(state.absmax, s_bnb.absmax, "absmax codes")
    assert_bits_equal(state.offset.reshape(-1), s_bnb.offset.reshape(-1), "offset")
    assert_bits_equal(state.state2.absmax, s_bnb.state2.absmax, "nested absmax")


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", list(NONFINITE))
def test_quantize_blockwise_nonfinite_identical(backend, dtype, value):
    """8-bit blockwise with allow_nonfinite=True: bitsandbytes' block maximum skips NaN
    (0 for a block of NaN only) and a NaN element gets code 0; the finite elements of a
    block holding a NaN are quantized as usual."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(256 * 4 + 17, generator=g) * 3
    x[5] = NONFINITE[value]
    x[300], x[301] = NONFINITE[value], -NONFINITE[value]
    x[512:768] = NONFINITE[value]  # a block of non-finite values only
    x[770] = 0.0
    x = x.to(dtype)
    with pytest.raises(ValueError, match="non-finite"):
        qf.quantize_blockwise(x, 256)
    q_bnb, s_bnb = bnbF.quantize_blockwise(x, blocksize=256)
    q, s = qf.quantize_blockwise(x, 256, allow_nonfinite=True)
    assert_bits_equal(q, q_bnb, "8-bit codes")
    assert_bits_equal(s.absmax, s_bnb.absmax, "8-bit absmax")
