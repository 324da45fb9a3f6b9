"""The Triton quantization kernels against the reference, bit for bit: every mask edge,
edge-case inputs, out=. The random properties and arbitrary-state dequantization of every
backend are in test_backends.py.

Without a GPU, conftest.py sets TRITON_INTERPRET=1 and these run the real kernels
on CPU tensors. The interpreter is slow, so shapes are small but chosen to hit every
mask edge: odd n (padding nibble), a partial last block (the division rule), tiles
with rows past the last block, and more than one program per launch.
"""

from __future__ import annotations

import pytest
import torch

import qpeft
import qpeft.functional as qf
from qpeft._formats import BLOCKSIZES_4BIT, LUT_BINS, dynamic_map, encode4_tables

from ._helpers import DTYPES, assert_bits_equal, assert_same_values, triton_test_device

pytest.importorskip("triton")

QUANT_TYPES = ["nf4", "fp4"]
DEQUANT4_TILE = 4096  # elements per program of the 4-bit dequantize kernels (checked below)
# The interpreter evaluates with numpy, which warns on 1/0 and NaN casts that the kernels
# resolve on purpose (absmax 0, NaN inputs).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(autouse=True)
def _on_triton_device():
    with triton_test_device():
        yield


@pytest.fixture(autouse=True)
def triton_backend():
    with qpeft.use_backend("triton"):
        yield


def _reference(fn, *args, **kwargs):
    with qpeft.use_backend("default"):
        return fn(*args, **kwargs)


def _check_4bit(x, blocksize, quant_type, double_quant, what, out_dtypes=DTYPES):
    try:
        p_ref, s_ref = _reference(
            qf.quantize_4bit, x, blocksize, quant_type, double_quant, allow_nonfinite=True
        )
    except ValueError:  # double quantization of a non-finite absmax mean: refused either way
        with pytest.raises(ValueError):
            qf.quantize_4bit(x, blocksize, quant_type, double_quant, allow_nonfinite=True)
        return
    packed, state = qf.quantize_4bit(x, blocksize, quant_type, double_quant, allow_nonfinite=True)
    assert_bits_equal(packed, p_ref, f"{what} packed")
    assert_same_values(state.absmax, s_ref.absmax, f"{what} absmax")
    if double_quant:
        assert_same_values(state.offset, s_ref.offset, f"{what} offset")
        assert_same_values(state.state2.absmax, s_ref.state2.absmax, f"{what} nested absmax")
    for dtype in out_dtypes:
        out = qf.dequantize_4bit(packed, state, out_dtype=dtype)
        assert_same_values(
            out, _reference(qf.dequantize_4bit, p_ref, s_ref, out_dtype=dtype), f"{what} -> {dtype}"
        )


def _check_8bit(x, blocksize, code, what, out_dtypes=DTYPES):
    q_ref, s_ref = _reference(qf.quantize_blockwise, x, blocksize, code, allow_nonfinite=True)
    q, s = qf.quantize_blockwise(x, blocksize, code, allow_nonfinite=True)
    assert_bits_equal(q, q_ref, f"{what} codes")
    assert_same_values(s.absmax, s_ref.absmax, f"{what} absmax")
    for dtype in out_dtypes:
        out = qf.dequantize_blockwise(q, s, dtype)
        assert_same_values(
            out, _reference(qf.dequantize_blockwise, q_ref, s_ref, dtype), f"{what} -> {dtype}"
        )


def _mask_edges(blocksize: int) -> list[int]:
    """n values for one blocksize: a lone element, a partial single block, and two
    programs' worth plus a partial odd block (ROWS * blocksize is 1024 or one block; the
    4-bit dequantize's 4096-element tiles: test_4bit_dequantize_whole_tiles)."""
    tile = max(blocksize, 1024)
    return [1, blocksize // 2 + 1, 2 * tile + blocksize + 3]


# --- 4-bit ----------------------------------------------------------------------------


def test_dequantize4_tile_is_the_kernels():
    from qpeft.triton_kernels import quant

    for bs in BLOCKSIZES_4BIT:
        for kernel in ("dequantize_4bit", "dequantize_4bit_nested"):
            rows, warps = quant.launch_config(bs, kernel)
            assert rows * bs == DEQUANT4_TILE and warps == 4  # 32 outputs = 16 packed bytes per thread


@pytest.mark.parametrize("blocksize", BLOCKSIZES_4BIT)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_4bit_dequantize_whole_tiles(blocksize, quant_type):
    # n one dequantize tile (the only program takes the unmasked 16-byte path), and one
    # tile plus a partial odd block (an unmasked program, then a masked one whose last
    # byte's second nibble is padding).
    g = torch.Generator().manual_seed(7 + blocksize)
    for i, n in enumerate((DEQUANT4_TILE, DEQUANT4_TILE + blocksize // 2 + 3)):
        x = torch.randn(n, generator=g)
        for dtype in DTYPES:
            _check_4bit(x.to(dtype), blocksize, quant_type, i == 0, f"n={n} bs={blocksize} {dtype}")


@pytest.mark.parametrize("blocksize", BLOCKSIZES_4BIT)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_4bit_every_blocksize(blocksize, quant_type):
    g = torch.Generator().manual_seed(blocksize)
    for i, n in enumerate(_mask_edges(blocksize)):
        x = torch.randn(n, generator=g) * 3
        for dtype in DTYPES:
            _check_4bit(x.to(dtype), blocksize, quant_type, i % 2 == 0, f"n={n} bs={blocksize} {dtype}")
    # Double quantization both ways at the largest n (more than one nested block at bs 32).
    x = torch.randn(_mask_edges(blocksize)[-1], generator=g)
    _check_4bit(x, blocksize, quant_type, False, f"bs={blocksize} dq off", [torch.float32])
    _check_4bit(x, blocksize, quant_type, True, f"bs={blocksize} dq on", [torch.float32])


def _edge_input(case: str, quant_type: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if case == "zeros":
        return torch.zeros(3 * 64 + 5)
    if case == "one_element":
        return torch.tensor([-2.5])
    if case == "odd":
        return torch.randn(13, 7, generator=g)
    if case == "ties":
        # Exactly on the midpoints of the sorted code with block absmax 1.0: the lower code
        # wins. 32 elements: a full block at bs 32 (multiply rule), partial at 64 (divide rule).
        mid, _ = encode4_tables(quant_type)
        return torch.cat([torch.tensor([1.0]), mid, -mid, torch.tensor([-1.0])])
    if case == "subnormal":
        return torch.tensor([1e-45, -3e-39, 2e-40, 0.0] * 40)
    if case == "signed_zeros":
        return torch.tensor([0.0, -0.0, 1e-3, -1e-3, 1.0] * 20)
    if case == "constant":
        return torch.full((200,), -7.25)
    if case == "huge":
        return torch.tensor([3e38, -3e38, 1e38, 1.0] * 50)
    # Non-finite values (allow_nonfinite=True): a NaN block, an Inf block, a clean block,
    # and NaN/Inf in the partial last block and in the odd padding byte's block.
    x = torch.randn(32 * 3 + 7, generator=g)
    x[5], x[40], x[41], x[100], x[102] = (
        float("nan"),
        float("inf"),
        -float("inf"),
        float("nan"),
        float("-inf"),
    )
    return x


EDGE_CASES = [
    "zeros",
    "one_element",
    "odd",
    "ties",
    "subnormal",
    "signed_zeros",
    "constant",
    "huge",
    "nonfinite",
]


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("case", EDGE_CASES)
def test_4bit_edge_cases(quant_type, case):
    x = _edge_input(case, quant_type)
    for dtype in DTYPES:
        xd = x.to(dtype)
        if case != "nonfinite" and not bool(torch.isfinite(xd).all()):
            continue  # 3e38 overflows fp16
        for blocksize in (32, 64, 4096):
            for double_quant in (False, True):
                _check_4bit(
                    xd,
                    blocksize,
                    quant_type,
                    double_quant,
                    f"{case} {dtype} bs={blocksize} dq={double_quant}",
                )


def test_4bit_strided_input():
    x = torch.randn(130, 90).to(torch.bfloat16).t()[::2]
    assert not x.is_contiguous()
    _check_4bit(x, 64, "nf4", True, "strided")


# --- 8-bit ----------------------------------------------------------------------------


@pytest.mark.parametrize("blocksize", BLOCKSIZES_4BIT)
def test_8bit_every_blocksize(blocksize):
    g = torch.Generator().manual_seed(blocksize)
    for n in _mask_edges(blocksize):
        x = torch.randn(n, generator=g)
        for dtype in DTYPES:
            _check_8bit(x.to(dtype), blocksize, dynamic_map(signed=True), f"n={n} bs={blocksize} {dtype}")
        _check_8bit(
            x.abs(), blocksize, dynamic_map(signed=False), f"unsigned n={n} bs={blocksize}", [torch.float32]
        )


def test_8bit_every_lookup_bin():
    # quantize_blockwise_kernel computes the reference's grid value -1 + (2b) / 65535 as
    # -1 + (t + (t2 + t2 * 2^-16)), t = 2b * 2^-16, t2 = t * 2^-16 (no division; the kernel
    # disables FMA contraction so each step rounds alone). Each of the 65536 grid values (and their negatives) once, in blocks whose absmax is
    # 1.0: the in-kernel bin + binary search must equal the reference's lookup table.
    grid = -1.0 + (2.0 * torch.arange(LUT_BINS, dtype=torch.float32)) / (LUT_BINS - 1)
    x = torch.cat([torch.tensor([1.0]), grid, -grid])
    for signed in (True, False):
        _check_8bit(x, 4096, dynamic_map(signed=signed), f"all bins signed={signed}", [])


def test_8bit_edge_cases():
    code = dynamic_map(signed=True)
    mids = (code[:-1] + code[1:]) / 2
    nonfinite = torch.randn(300)
    nonfinite[3], nonfinite[70], nonfinite[299] = float("nan"), float("inf"), -float("inf")
    cases = {
        "zeros": torch.zeros(300),
        "midpoints": torch.cat([torch.tensor([1.0]), mids]),
        "codes": torch.cat([torch.tensor([-1.0]), code[1:], torch.zeros(10)]),
        "subnormal": torch.tensor([1e-45, -1e-44, 2e-40] * 100),
        "signed_zeros": torch.tensor([0.0, -0.0, 1e-3] * 50),
        "nonfinite": nonfinite,
    }
    for name, x in cases.items():
        for blocksize in (32, 256, 4096):
            _check_8bit(x, blocksize, code, f"{name} bs={blocksize}", [torch.float32, torch.bfloat16])


def test_8bit_custom_code():
    # Any sorted map, including repeated values (ties between midpoints).
    g = torch.Generator().manual_seed(3)
    code = torch.sort(torch.rand(256, generator=g) * 2 - 1).values
    code[10:20] = code[10]
    code[-1] = 1.0
    _check_8bit(torch.randn(1000, generator=g), 64, code, "custom code")


def test_kernels_ran():
    # The autouse fixture forces "triton": make sure the ops really dispatched to it.
    from qpeft._dispatch import kernel_for

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert kernel_for("quantize_4bit", device).__module__ == "qpeft.backends.triton.quant"


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_into_out(double_quant):
    x = torch.randn(33, 70)
    packed, state = qf.quantize_4bit(x, 64, "nf4", double_quant)
    want = _reference(qf.dequantize_4bit, packed, state, torch.float16)
    for out in (torch.empty(33, 70, dtype=torch.float16), torch.empty(70, 33, dtype=torch.float16).t()):
        assert qf.dequantize_4bit(packed, state, out=out) is out
        assert_bits_equal(out.contiguous(), want, f"into out (contiguous={out.is_contiguous()})")
    q, s8 = qf.quantize_blockwise(x)
    out8 = torch.empty(33, 70, dtype=torch.bfloat16)
    qf.dequantize_blockwise(q, s8, out=out8)
    assert_bits_equal(out8, _reference(qf.dequantize_blockwise, q, s8, torch.bfloat16), "8-bit into out")
