"""Every CUDA C++ kernel, executed on the CPU by the emulation harness (backend
"cuda_emulated"), against the pure-torch reference: bit-identical for 4-bit and
8-bit quantize/dequantize, within a derived bound for the GEMV (bounds in tests/_helpers.py).
The random properties of every backend, this one included, are in test_backends.py.

The emulator runs every CUDA thread as a fiber (slow): shapes are small but chosen
to reach every path of the kernels (partial tiles and blocks, odd sizes, the
unaligned per-byte paths, blocksize 4096's cross-warp reduction, double
quantization, M from 1 to 8).
"""

from __future__ import annotations

import pytest
import torch

import qpeft
import qpeft.functional as qf
from qpeft._formats import BLOCKSIZES_4BIT, code4, dynamic_map, encode4_tables
from qpeft.backends.cuda_emulated import emulation

from ._helpers import DTYPES, assert_same_quantization, assert_same_values, cuda_gemv_roundings, gemv_bound
from .emu_support import emu_module

QUANT_TYPES = ["nf4", "fp4"]


@pytest.fixture(autouse=True)
def _emulated():
    emu_module()
    with qpeft.use_backend("cuda_emulated"):
        yield


def _reference(fn, *args, **kwargs):
    with qpeft.use_backend("default"):
        return fn(*args, **kwargs)


# --- 4-bit quantize / dequantize -----------------------------------------------------


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES_4BIT)
def test_4bit_every_blocksize(quant_type, dtype, blocksize):
    # Two full quant blocks, a partial one and an odd count: a partial tile, a
    # partial quant block (its own absmax) and the padding nibble. 4096 uses 512
    # threads and the cross-warp reduction through shared memory.
    g = torch.Generator().manual_seed(blocksize)
    n = 2 * blocksize + 77
    x = torch.randn(n, generator=g).to(dtype)
    for dq in (False, True):
        assert_same_quantization(x, blocksize, quant_type, dq, f"emulated n={n} bs={blocksize} dq={dq}")


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize(
    "case", ["zeros", "one_element", "ties", "subnormal", "signed_zeros", "constant", "huge", "tiny_blocks"]
)
def test_4bit_edge_cases(quant_type, case):
    if case == "zeros":
        x = torch.zeros(3 * 64 + 5)
    elif case == "one_element":
        x = torch.tensor([-2.5])
    elif case == "ties":  # exactly on the midpoints: the lower code
        mid, _ = encode4_tables(quant_type)
        x = torch.cat([torch.tensor([1.0]), mid, -mid, torch.tensor([-1.0])])
    elif case == "subnormal":
        x = torch.tensor([1e-45, -3e-39, 2e-40, 0.0] * 40)
    elif case == "signed_zeros":
        x = torch.tensor([0.0, -0.0, 1e-3, -1e-3, 1.0] * 20)
    elif case == "constant":
        x = torch.full((200,), -7.25)
    elif case == "huge":
        x = torch.tensor([3e38, -3e38, 1e38, 1.0] * 50)
    else:  # blocks whose absmax sits below the 1e-38 floor
        x = torch.tensor([1e-39, -5e-40, 0.0, 2e-39] * 33)
    for dtype in DTYPES:
        xd = x.to(dtype)
        if not bool(torch.isfinite(xd).all()):
            continue
        for blocksize in (32, 4096):
            assert_same_quantization(xd, blocksize, quant_type, False, f"{case} {dtype} bs{blocksize}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_4bit_non_finite(dtype):
    # NaN/Inf blocks: the codes and fp32 absmax are bit-identical; decoded NaNs may
    # carry the device's canonical payload instead of torch's.
    x = torch.tensor([float("nan"), 1.0, float("inf"), -2.0] + [0.5] * 200 + [-float("inf")] * 3).to(dtype)
    for quant_type in QUANT_TYPES:
        for blocksize in (32, 64):
            p_ref, s_ref = _reference(qf.quantize_4bit, x, blocksize, quant_type, False, allow_nonfinite=True)
            packed, state = qf.quantize_4bit(x, blocksize, quant_type, False, allow_nonfinite=True)
            assert_same_values(packed, p_ref, "packed")
            assert_same_values(state.absmax, s_ref.absmax, "absmax")
            for out in DTYPES:
                assert_same_values(
                    qf.dequantize_4bit(packed, state, out),
                    _reference(qf.dequantize_4bit, p_ref, s_ref, out),
                    "out",
                )


def test_4bit_partial_last_block_divides():
    # Found by the random property (now test_backends.py) through the emulation: the CUDA kernel multiplied by
    # 1/absmax in the partial last block, where the format divides (format.h:
    # normalize4); 103 of this block's 308 values normalise differently, two of
    # them across a midpoint.
    g = torch.Generator().manual_seed(78813255)
    x = (torch.randn([11, 34, 46], generator=g) * 1e-3).to(torch.bfloat16)
    last = x.reshape(-1)[-(x.numel() % 512) :].float()
    a = last.abs().max()
    assert bool((last * (1.0 / a) != last / a).any())
    assert_same_quantization(x, 512, "fp4", False, "partial last block")


@pytest.mark.parametrize("nested", [False, True])
def test_dequantize_4bit_unaligned_buffers(nested):
    # Packed codes at an odd address and an odd element count: the per-byte path.
    x = torch.randn(333)
    packed, state = _reference(qf.quantize_4bit, x, 64, "nf4", nested)
    storage = torch.empty(packed.numel() + 1, dtype=torch.uint8)
    shifted = storage[1:].view(-1, 1)
    shifted.copy_(packed)
    assert shifted.data_ptr() % 16 != 0
    for out in DTYPES:
        assert_same_values(
            qf.dequantize_4bit(shifted, state, out),
            _reference(qf.dequantize_4bit, packed, state, out),
            f"{out}",
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_unaligned_input(dtype):
    storage = torch.randn(1 + 300).to(dtype)
    x = storage[1:]
    assert x.data_ptr() % 16 != 0
    assert_same_quantization(x, 64, "fp4", True, "unaligned input")


# --- 8-bit blockwise ---------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("blocksize", BLOCKSIZES_4BIT)
def test_blockwise_8bit_every_blocksize(signed, blocksize):
    g = torch.Generator().manual_seed(blocksize + signed)
    code = dynamic_map(signed=signed)
    for dtype in DTYPES:
        x = torch.randn(blocksize + 45, generator=g)
        x = (x if signed else x.abs()).to(dtype)
        q_ref, s_ref = _reference(qf.quantize_blockwise, x, blocksize, code)
        q, s = qf.quantize_blockwise(x, blocksize, code)
        assert_same_values(q, q_ref, f"codes {dtype} bs{blocksize}")
        assert_same_values(s.absmax, s_ref.absmax, f"absmax {dtype} bs{blocksize}")
        for out in DTYPES:
            assert_same_values(
                qf.dequantize_blockwise(q, s, out),
                _reference(qf.dequantize_blockwise, q_ref, s_ref, out),
                f"{out}",
            )


def test_blockwise_8bit_edge_cases():
    code = dynamic_map(signed=True)
    mids = (code[:-1] + code[1:]) / 2
    cases = [
        torch.zeros(300),
        torch.cat([torch.tensor([1.0]), mids[:255]]),
        torch.cat([torch.tensor([-1.0]), code[1:], torch.tensor([0.0] * 10)]),
        torch.tensor([1e-45, -1e-44, 2e-40] * 100),
        torch.tensor([float("nan"), 1.0, -float("inf")] * 7),
    ]
    for x in cases:
        for bs in (32, 256):
            q_ref, s_ref = _reference(qf.quantize_blockwise, x, bs, code, allow_nonfinite=True)
            q, s = qf.quantize_blockwise(x, bs, code, allow_nonfinite=True)
            assert_same_values(q, q_ref, f"codes bs{bs}")
            assert_same_values(s.absmax, s_ref.absmax, f"absmax bs{bs}")


def test_dequantize_blockwise_unaligned():
    x = torch.randn(261)
    q_ref, s = _reference(qf.quantize_blockwise, x, 32)
    storage = torch.empty(q_ref.numel() + 3, dtype=torch.uint8)
    q = storage[3:]
    q.copy_(q_ref)
    for out in DTYPES:
        assert_same_values(
            qf.dequantize_blockwise(q, s, out), _reference(qf.dequantize_blockwise, q_ref, s, out)
        )


def test_results_do_not_depend_on_the_schedule():
    # Every seed interleaves threads differently; correct kernels give the same bits.
    x = torch.randn(4096 + 300, dtype=torch.bfloat16)
    outs = []
    for seed, workers in ((0, 1), (1, 2), (7, 3)):
        with emulation(seed=seed, workers=workers):
            packed, state = qf.quantize_4bit(x, 4096, "nf4", True)
            outs.append((packed, state.absmax, qf.dequantize_4bit(packed, state)))
    for got in outs[1:]:
        for a, b in zip(got, outs[0]):
            assert_same_values(a, b, "seed")


def test_native_entry_points_recheck_sizes():
    mod = emu_module()
    x = torch.randn(128)
    packed = torch.empty(10, dtype=torch.uint8)
    absmax = torch.empty(2)
    with pytest.raises(ValueError, match="packed holds 10"):
        mod.quantize_4bit(x.data_ptr(), 0, 128, 64, 2, packed.data_ptr(), 10, absmax.data_ptr(), 2, 0)
    out = torch.empty(8)
    with pytest.raises(ValueError, match="1 to 8 rows"):
        mod.gemv_4bit(
            x.data_ptr(),
            0,
            128,
            9,
            16,
            packed.data_ptr(),
            10,
            absmax.data_ptr(),
            2,
            8,
            64,
            2,
            0,
            0,
            0,
            0,
            256,
            out.data_ptr(),
            8,
            0,
        )


# --- GEMV -----------------------------------------------------------------------------


def _check_gemv(m, n, k, dtype, quant_type, blocksize, nested, seed, x_offset=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    storage = torch.randn(m * k + x_offset, generator=g).to(dtype)
    x = storage[x_offset:].view(m, k)
    packed, state = _reference(qf.quantize_4bit, w, blocksize, quant_type, nested)
    y = qf.gemv_4bit(x, packed, state)
    y_ref = _reference(qf.gemv_4bit, x, packed, state)
    assert y.shape == (m, n) and y.dtype == dtype
    w_deq = _reference(qf.dequantize_4bit, packed, state, torch.float32)
    what = f"m={m} n={n} k={k} {dtype} {quant_type} bs{blocksize} nested={nested}"
    # Against the exact product: the kernel's own summation depth.
    exact = x.double() @ w_deq.double().T
    err = (y.double() - exact).abs()
    tol = gemv_bound(x, w_deq, dtype, cuda_gemv_roundings(k))
    assert bool((err <= tol).all()), f"{what}: worst error {float((err - tol).max()):.3e} over the bound"
    # Against the reference: both within their bounds of the exact value (torch's
    # summation order is unknown: depth <= K).
    diff = (y.double() - y_ref.double()).abs()
    tol_ref = tol + gemv_bound(x, w_deq, dtype, k)
    assert bool((diff <= tol_ref).all()), f"{what}: differs from the reference by {float(diff.max()):.3e}"


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_rows_and_dtypes(m, dtype):
    # K = 1024 + 64: several 16-byte chunks per lane, lanes with uneven chunk counts.
    _check_gemv(m, 9, 1088, dtype, "nf4", 64, True, seed=m)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", [32, 128, 4096])
@pytest.mark.parametrize("nested", [False, True])
def test_gemv_quant_states(quant_type, blocksize, nested):
    # blocksize 4096 > K: quant blocks span rows of W.
    _check_gemv(2, 6, 320, torch.bfloat16, quant_type, blocksize, nested, seed=blocksize)


@pytest.mark.parametrize("k", [1, 33, 100, 64 + 16])
@pytest.mark.parametrize("nested", [False, True])
def test_gemv_per_element_path(k, nested):
    # K not a multiple of 32: rows start mid-byte or mid-chunk, the per-element path.
    _check_gemv(3, 5, k, torch.float16, "fp4", 32, nested, seed=k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_unaligned_x(dtype):
    _check_gemv(2, 4, 64, dtype, "nf4", 64, False, seed=3, x_offset=1)


def test_gemv_functional_shapes_and_errors():
    w = torch.randn(12, 64)
    packed, state = qf.quantize_4bit(w)
    x = torch.randn(2, 3, 64)
    y = qf.gemv_4bit(x, packed, state)
    assert y.shape == (2, 3, 12)
    with pytest.raises(ValueError, match="1 to 8 rows"):
        qf.gemv_4bit(torch.randn(9, 64), packed, state)
    with pytest.raises(ValueError, match="in_features=64"):
        qf.gemv_4bit(torch.randn(1, 65), packed, state)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        torch.ops.qpeft.gemv_4bit(
            torch.randn(1, 64, dtype=torch.float64),
            packed,
            state.absmax,
            state.state2.absmax,
            state.state2.code,
            state.offset.reshape(1),
            64,
            256,
            "nf4",
            12,
            64,
        )


@pytest.mark.parametrize("backend", ["default", "cuda_emulated"])
def test_gemv_opcheck(backend):
    w = torch.randn(8, 64)
    with qpeft.use_backend("default"):
        packed, state = qf.quantize_4bit(w, 64, "nf4", True)
    args = (
        torch.randn(2, 64, dtype=torch.bfloat16),
        packed,
        state.absmax,
        state.state2.absmax,
        state.state2.code,
        state.offset.reshape(1),
        64,
        256,
        "nf4",
        8,
        64,
    )
    with qpeft.use_backend(backend):
        torch.library.opcheck(torch.ops.qpeft.gemv_4bit.default, args)


def test_gemv_bound_is_not_vacuous():
    # The bound is a few ulps of the accumulated magnitude, far below the effect of
    # the smallest decoding mistake: one weight read as its neighbouring code moves
    # y by |x_k| * absmax * (code gap >= 0.0796 for NF4), here over 100x the bound
    # for a median |x_k|.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 256, generator=g)
    w = torch.randn(4, 256, generator=g)
    packed, state = _reference(qf.quantize_4bit, w, 64, "nf4", False)
    w_deq = _reference(qf.dequantize_4bit, packed, state, torch.float32)
    tol = gemv_bound(x, w_deq, torch.float32, cuda_gemv_roundings(256))
    smallest_gap = float((code4("nf4")[1:] - code4("nf4")[:-1]).min())
    effect = float(x.abs().median()) * float(state.absmax.min()) * smallest_gap
    assert effect > 100 * float(tol.max())
