"""The quantization formats, defined once for Python (the backends and the Triton kernels
import them from here).

Mirrors ``csrc/include/qpeft/format.h``: tests/test_formats.py asserts that every table
and constant here, and what the native modules are passed (dtype and quant-type ids,
blocksizes, the GEMV row limit, the dynamic 8-bit maps' encoder tables), equals the C++
values bit for bit, as ``qpeft._C.format_tables()`` reports them. A copy rather than a
read from the native module, so that importing qpeft needs no compiled code. Semantics
and bit layouts are those of docs/design.md, "Formats", and are bit-compatible with
bitsandbytes >= 0.45.
"""

from __future__ import annotations

import functools

import torch


class _Ids(dict):
    """The native code's id of a dtype or quant type; an unknown key is a clear error
    (the ops trust their inputs, but a direct op call must not fail with a KeyError)."""

    def __init__(self, what: str, error: type, values: dict, allowed: str) -> None:
        super().__init__(values)
        self.what, self.error, self.allowed = what, error, allowed

    def __missing__(self, key):
        raise self.error(f"{self.what} must be {self.allowed}, got {key}")


QUANT_TYPES = ("nf4", "fp4")
QUANT_TYPE_IDS = _Ids("quant_type", ValueError, {"fp4": 1, "nf4": 2}, "'nf4' or 'fp4'")  # format.h: QuantType
BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# format.h: DType
DTYPE_IDS = _Ids(
    "dtype",
    TypeError,
    {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2},
    "float32, float16 or bfloat16",
)

NESTED_BLOCKSIZE = 256  # double quantization: one fp32 absmax per 256 absmax values
ABSMAX_FLOOR = 1e-38  # bitsandbytes floors absmax here before taking 1/absmax (4-bit only)
LUT_BINS = 65536  # the 8-bit encoder's lookup resolution (format.h: kLutBins)

NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# Bit 3 is the sign; the magnitudes are 2^e * (1 + m/2) with a subnormal 0.0625.
# Code 8 ("-0") decodes to +0.0: bitsandbytes' table, the quant_map its checkpoints store,
# holds +0.0 there (its source writes the integer -0). Its kernels disagree with each other
# (the CUDA and native AVX2 CPU ones compute sign * 0 = -0.0, its AVX-512 and pure-torch
# CPU paths +0.0); qpeft follows the stored table (tests/test_bitsandbytes_compat.py).
FP4_NUMERATORS = (
    0.0,
    0.0625,
    8.0,
    12.0,
    4.0,
    6.0,
    2.0,
    3.0,
    0.0,
    -0.0625,
    -8.0,
    -12.0,
    -4.0,
    -6.0,
    -2.0,
    -3.0,
)


@functools.cache
def _code4_cpu(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32)
    if quant_type == "fp4":
        return torch.tensor(FP4_NUMERATORS, dtype=torch.float32) / 12
    raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


@functools.cache
def _code4_device(quant_type: str, device: torch.device) -> torch.Tensor:
    return _code4_cpu(quant_type).to(device)


def code4(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 fp32 values of a 4-bit code, indexed by code (a cached tensor: do not mutate)."""
    return _code4_device(quant_type, torch.device(device))


@functools.cache
def _encode4_tables(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    code = _code4_cpu(quant_type)
    # Stable sort keeps FP4's +0 (code 0) before -0 (code 8), as bitsandbytes' CPU path does.
    order = torch.argsort(code, stable=True)
    sorted_code = code[order]
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    return midpoints, order


def encode4_tables(quant_type: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints[15] fp32, order[16] int64): code = order[#{k : !(v <= midpoints[k])}]."""
    mid, order = _encode4_tables(quant_type)
    return mid.to(device), order.to(device)


def zero_code4(quant_type: str) -> int:
    """The code of 0.0: the padding nibble of odd-sized tensors."""
    return 7 if quant_type == "nf4" else 0


@functools.cache
def _dynamic_map(signed: bool, max_exponent_bits: int, total_bits: int) -> torch.Tensor:
    # The dynamic tree map of bitsandbytes (create_dynamic_map): for each exponent
    # 10^-(e) a linear fraction grid whose resolution grows with the exponent, plus
    # 0 and 1. Computed in fp32 with torch.linspace so the values match bit for bit.
    values: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        extra = 0 if signed else 1
        n_fraction = int(2 ** (i + non_sign_bits - max_exponent_bits + extra) + 1)
        bounds = torch.linspace(0.1, 1, n_fraction, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        values += (scale * means).tolist()
        if signed:
            values += (-scale * means).tolist()
    if additional_items > 0:
        bounds = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)
        values += (scale * means).tolist()
        if signed:
            values += (-scale * means).tolist()
    values += [0.0, 1.0]
    if len(values) != 2**total_bits:
        raise AssertionError("dynamic map must fill the code space")
    return torch.tensor(values, dtype=torch.float32).sort().values


def dynamic_map(signed: bool = True, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-value dynamic 8-bit map (signed: [-0.99297, 1.0]; unsigned: [0, 1]), sorted."""
    return _dynamic_map(signed, 7, 8).to(device)


def lut8(code: torch.Tensor) -> torch.Tensor:
    """The 8-bit encoder's table: for each of the 65536 bins, the code index it maps to.

    Bin b stands for the grid value -1 + 2b/65535 (fp32); its code is the number of
    midpoints (code[k] + code[k+1]) / 2 strictly below that value.
    """
    code = code.to(device="cpu", dtype=torch.float32)
    mid = (code[:-1] + code[1:]) / 2
    bins = torch.arange(LUT_BINS, dtype=torch.float32)
    grid = -1.0 + (2.0 * bins) / (LUT_BINS - 1)
    return torch.searchsorted(mid, grid, side="left").to(torch.uint8)


# Rows of x up to which y = x @ W^T is the decode GEMV (qpeft::gemv_4bit): the CUDA kernel
# is instantiated for M = 1..8 (csrc/cuda/gemv_4bit.cu); larger M is a GEMM.
GEMV_MAX_ROWS = 8
