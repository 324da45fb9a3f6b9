"""4-bit and 8-bit blockwise quantization on the C++ CPU kernels: edge cases, strided input
and out=, against the reference; the reference against the format's definition. The random
properties of every backend are in test_backends.py."""

from __future__ import annotations

import pytest
import torch

import qpeft.functional as qf
from qpeft._formats import code4, dynamic_map, encode4_tables

from ._helpers import DTYPES, assert_bits_equal, assert_same_quantization, reference
from .conftest import CPU_BACKENDS

QUANT_TYPES = ["nf4", "fp4"]


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize(
    "case",
    ["zeros", "one_element", "odd", "partial_block", "ties", "subnormal", "signed_zeros", "constant", "huge"],
)
def test_4bit_edge_cases(backend, quant_type, case):
    g = torch.Generator().manual_seed(1)
    if case == "zeros":
        x = torch.zeros(3 * 64 + 5)
    elif case == "one_element":
        x = torch.tensor([-2.5])
    elif case == "odd":
        x = torch.randn(13, 7, generator=g)
    elif case == "partial_block":
        x = torch.randn(64 * 5 + 1, generator=g)
    elif case == "ties":
        # Values exactly on the midpoints of the sorted code (block absmax 1.0): each must take the lower code.
        mid, _ = encode4_tables(quant_type)
        x = torch.cat([torch.tensor([1.0]), mid, -mid, torch.tensor([-1.0])])
    elif case == "subnormal":
        x = torch.tensor([1e-45, -3e-39, 2e-40, 0.0] * 40)
    elif case == "signed_zeros":
        x = torch.tensor([0.0, -0.0, 1e-3, -1e-3, 1.0] * 20)
    elif case == "constant":
        x = torch.full((200,), -7.25)
    else:  # huge magnitudes: still finite in fp32 and bf16
        x = torch.tensor([3e38, -3e38, 1e38, 1.0] * 50)
    for dtype in DTYPES:
        xd = x.to(dtype)
        if not bool(torch.isfinite(xd).all()):
            continue  # 3e38 overflows fp16: covered by the non-finite tests
        for blocksize in (32, 64, 4096):
            what = f"{backend} {case} {dtype} bs{blocksize}"
            assert_same_quantization(xd, blocksize, quant_type, False, what)
            absmax = reference(torch.ops.qpeft.quantize_4bit, xd, blocksize, quant_type)[1]
            if not bool(torch.isfinite(absmax.mean())):  # the fp32 mean overflows: a clear error
                with pytest.raises(ValueError, match="double quantization overflowed"):
                    qf.quantize_4bit(xd, blocksize, quant_type, True)
            else:
                assert_same_quantization(xd, blocksize, quant_type, True, what)


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_4bit_non_contiguous_input(backend, dtype):
    base = torch.randn(130, 90).to(dtype)
    x = base.t()[::2]  # strided and transposed
    assert not x.is_contiguous()
    assert_same_quantization(x, 64, "nf4", True, f"{backend} strided")
    packed, _ = qf.quantize_4bit(x)
    packed_c, _ = qf.quantize_4bit(x.contiguous())
    assert_bits_equal(packed, packed_c, "strided vs contiguous")


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_blockwise_8bit_edge_cases(backend):
    code = dynamic_map(signed=True)
    mids = (code[:-1] + code[1:]) / 2
    cases = [
        torch.zeros(300),  # all-zero blocks encode to index 0
        torch.cat([torch.tensor([1.0]), mids[:255]]),  # on the midpoints
        torch.cat([torch.tensor([-1.0]), code[1:], torch.tensor([0.0] * 10)]),  # on the codes
        torch.tensor([1e-45, -1e-44, 2e-40] * 100),
    ]
    for x in cases:
        for bs in (32, 256, 4096):
            q_ref, s_ref = reference(qf.quantize_blockwise, x, bs, code)
            q, s = qf.quantize_blockwise(x, bs, code)
            assert_bits_equal(q, q_ref, f"8-bit edge codes bs{bs}")
            assert_bits_equal(s.absmax, s_ref.absmax, f"8-bit edge absmax bs{bs}")


# --- the reference against the format's definition ---------------------------------


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_reference_picks_a_nearest_code(quant_type, blocksize):
    x = torch.randn(64 * 40)
    packed, state = reference(qf.quantize_4bit, x, blocksize, quant_type, False)
    codes = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 15], 1).reshape(-1).long()
    table = code4(quant_type)
    v = (x.view(-1, blocksize) * (1 / state.absmax[:, None])).reshape(-1)
    chosen = (table[codes] - v).abs()
    best = (table[None, :] - v[:, None]).abs().min(dim=1).values
    # fp32 rounding of v and of the midpoints allows a choice within one ulp of a tie
    assert bool((chosen <= best + 1e-6).all())
    assert bool((state.absmax == x.view(-1, blocksize).abs().amax(1)).all())


def test_reference_packing_layout():
    # First element in the high nibble; odd numel padded with the code of 0.0.
    x = torch.tensor([1.0, -1.0, 0.0])
    packed, _ = reference(qf.quantize_4bit, x, 64, "nf4", False)
    assert packed.shape == (2, 1) and packed.dtype == torch.uint8
    assert packed.reshape(-1).tolist() == [(15 << 4) | 0, (7 << 4) | 7]
    packed, _ = reference(qf.quantize_4bit, x, 64, "fp4", False)
    assert packed.reshape(-1).tolist() == [(3 << 4) | 11, 0]


@pytest.mark.parametrize("backend", ["default", *CPU_BACKENDS], indirect=True)
@pytest.mark.parametrize("double_quant,mean_abs,mean_rel", [(False, 0.07332, 0.20572), (True, 0.11, 0.28)])
def test_published_nf4_error_bounds(backend, double_quant, mean_abs, mean_rel):
    # bitsandbytes' published NF4 bounds (blocksize 64, randn 1024x1024).
    torch.manual_seed(0)
    x = torch.randn(1024, 1024)
    packed, state = qf.quantize_4bit(x, 64, "nf4", double_quant)
    err = (qf.dequantize_4bit(packed, state) - x).abs()
    assert err.mean() < mean_abs
    assert (err / (x.abs() + 1e-8)).mean() < mean_rel


def test_8bit_roundtrip_error_bounds():
    # 8-bit blockwise (dynamic map, blocksize 256) on randn: bitsandbytes' published bounds.
    torch.manual_seed(0)
    x = torch.randn(1024, 1024)
    q, s = qf.quantize_blockwise(x, 256)
    err = (qf.dequantize_blockwise(q, s) - x).abs()
    assert err.mean() < 0.011
    assert (err / (x.abs() + 1e-8)).mean() < 0.018


# --- out= ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["default", *CPU_BACKENDS], indirect=True)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_into_out(backend, double_quant, dtype):
    x = torch.randn(67, 45)
    packed, state = qf.quantize_4bit(x, 64, "nf4", double_quant)
    want = reference(qf.dequantize_4bit, packed, state, dtype)
    dense = torch.full((67, 45), float("nan"), dtype=dtype)
    assert qf.dequantize_4bit(packed, state, out=dense) is dense
    assert_bits_equal(dense, want, "into a contiguous out")
    strided = torch.full((45, 67), float("nan"), dtype=dtype).t()  # a transposed view
    assert qf.dequantize_4bit(packed, state, dtype, out=strided) is strided
    assert_bits_equal(strided.contiguous(), want, "into a strided out")

    q, s8 = qf.quantize_blockwise(x)
    want8 = reference(qf.dequantize_blockwise, q, s8, dtype)
    out8 = torch.empty(67, 45, dtype=dtype)
    assert qf.dequantize_blockwise(q, s8, out=out8) is out8
    assert_bits_equal(out8, want8, "8-bit into out")
