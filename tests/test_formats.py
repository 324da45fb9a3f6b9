"""qpeft/_formats.py (what Python, the Triton kernels and the calls into native code use)
equals csrc/include/qpeft/format.h (what the C++ and CUDA kernels use), bit for bit.

The C++ side is read from ``qpeft._C.format_tables()``, which returns format.h's (and
optim.h's) tables and constants as the compiled code sees them. A value changed on one
side only fails here instead of producing codes that the other side decodes differently.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from qpeft import _formats, _optim_math
from qpeft._native import cpu_module


@pytest.fixture(scope="module")
def tables():
    return cpu_module().format_tables()


def _f32_bits(values) -> list[int]:
    """The fp32 bit patterns of a sequence of numbers (so -0.0 != 0.0 and NaN == NaN)."""
    return torch.tensor(values, dtype=torch.float32).view(torch.int32).tolist()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_tables(tables, quant_type):
    # format.h's fp32 constants arrive as doubles (exact), so comparing fp32 bits is exact.
    assert _f32_bits(_formats.code4(quant_type).tolist()) == _f32_bits(tables[quant_type])
    mid, order = _formats.encode4_tables(quant_type)
    assert _f32_bits(mid.tolist()) == _f32_bits(tables[f"{quant_type}_mid"])
    assert order.tolist() == tables[f"{quant_type}_order"]
    assert _formats.zero_code4(quant_type) == tables[f"{quant_type}_zero_code"]


def test_ids_and_constants(tables):
    dtype_ids = {str(dt).removeprefix("torch."): i for dt, i in _formats.DTYPE_IDS.items()}
    assert dtype_ids == tables["dtype_ids"]
    assert tuple(str(dt).removeprefix("torch.") for dt in _formats.FLOAT_DTYPES) == tuple(dtype_ids)
    assert _formats.QUANT_TYPE_IDS == tables["quant_type_ids"]
    assert set(_formats.QUANT_TYPES) == set(tables["quant_type_ids"])
    assert list(_formats.BLOCKSIZES_4BIT) == tables["blocksizes"]
    assert _formats.LUT_BINS == tables["lut_bins"]
    assert _f32_bits([_formats.ABSMAX_FLOOR]) == _f32_bits([tables["absmax_floor"]])
    assert _formats.GEMV_MAX_ROWS == tables["gemv_max_rows"]
    assert _optim_math.STATE_BLOCK == tables["state_block"]
    assert _optim_math.MIN_8BIT_NUMEL == tables["min_8bit_numel"]


def test_gemv_row_limit_of_the_cpu_forward(tables):
    """The CPU QLoRA forward switches to the GEMV at format.h's kGemvMaxRows rows."""
    cpu_qlora = importlib.import_module("qpeft.backends.cpu.qlora")
    assert cpu_qlora.GEMV_MAX_ROWS == tables["gemv_max_rows"]


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_maps_encode_alike(tables, signed):
    """The dynamic 8-bit maps Python passes to native code: the C++ encoder table built
    from them (format.h's lut_grid_value / code8_for_grid) equals Python's lut8, and the
    optimizer's one-compare state encoder accepts them as exact."""
    native = cpu_module()
    code = _formats.dynamic_map(signed)
    assert code.dtype == torch.float32 and code.numel() == tables["num_codes8"]
    assert bool((code[1:] > code[:-1]).all())
    lut = torch.tensor(native.lut8(code.data_ptr()), dtype=torch.uint8)
    assert lut.numel() == tables["lut_bins"]
    assert torch.equal(lut, _formats.lut8(code))
    assert native.state_table_exact(code.data_ptr())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_triton_encoder_tables(tables, quant_type):
    """The Triton quantizer's device tables (midpoints, then the order as steps and the
    padding code) decode back to format.h's."""
    pytest.importorskip("triton")
    quant = importlib.import_module("qpeft.triton_kernels.quant")
    mid, steps = quant._encode4_device_tables(quant_type, torch.device("cpu"))
    assert _f32_bits(mid.tolist()) == _f32_bits(tables[f"{quant_type}_mid"])
    assert steps.cumsum(0)[:16].tolist() == tables[f"{quant_type}_order"]
    assert int(steps[16]) == tables[f"{quant_type}_zero_code"]
