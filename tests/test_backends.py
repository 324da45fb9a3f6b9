"""One property per op, run on every backend that implements it (the ``backend`` fixture of
conftest.py): each backend bit for bit against the reference ("default"), within derived
bounds where the summation order is the kernel's own (GEMV, qlora_linear).

The reference itself is held to the format's definition (absmax per block, a nearest code,
decoded value = table value * absmax rounded once), so its runs are not a comparison of the
reference with itself. Budgets (examples, shape caps) per backend are in conftest.BUDGETS.
Backend-specific paths (SIMD vs scalar, threads, Triton mask edges, the emulator's schedules)
are tested in the per-backend files.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st

import qpeft
import qpeft.functional as qf
from qpeft._formats import ABSMAX_FLOOR, BLOCKSIZES_4BIT, dynamic_map

from ._helpers import (
    CASES,
    DTYPES,
    assert_bits_equal,
    assert_same_quantization,
    assert_same_values,
    assert_within,
    case_id,
    check_qlora_linear,
    gemv_tolerance,
    make_problem,
    reference,
)
from .conftest import GEMV_BACKENDS, OPTIM_BACKENDS, QLORA_BACKENDS, QUANT_BACKENDS

QUANT_TYPES = ["nf4", "fp4"]
# The interpreter evaluates with numpy, which warns on 1/0 and NaN casts that the Triton
# kernels resolve on purpose (absmax 0, NaN inputs).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _shapes(budget):
    return st.lists(st.integers(1, budget.max_dim), min_size=1, max_size=budget.max_ndim)


def _unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """4-bit codes of ``packed``: the first element in the high nibble."""
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 15], 1).reshape(-1)[:n].long()


def _per_element(values: torch.Tensor, per_block: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values[i] * per_block[i // blocksize] in fp32 (one rounding), for flat values."""
    return values * per_block.repeat_interleave(blocksize)[: values.numel()]


# --- the backend lists of conftest against what is registered ----------------------------------


def _try(fn) -> bool:
    """Whether fn() runs with the forced backend; False only when it has no kernel."""
    try:
        fn()
    except qpeft.BackendUnavailableError as exc:
        assert "has no kernel" in str(exc), exc
        return False
    return True


def test_backend_lists_cover_every_kernel(backend):
    """Each op family runs on exactly the backends conftest lists for it, so a new kernel (or
    a lost one) changes which backends these properties run on instead of going untested."""
    x = torch.randn(4, 64)
    with qpeft.use_backend("default"):
        packed, state = qf.quantize_4bit(x, 64, "nf4", True)
        plain = qf.quantize_4bit(x, 64, "nf4", False)[1].absmax
        q, s8 = qf.quantize_blockwise(x.reshape(-1))
    ops = {
        "quant": [
            lambda: torch.ops.qpeft.quantize_4bit(x, 64, "nf4"),
            lambda: torch.ops.qpeft.dequantize_4bit(packed, plain, 64, "nf4", [4, 64], torch.float32),
            lambda: qf.dequantize_4bit(packed, state),  # nested
            lambda: torch.ops.qpeft.quantize_blockwise(x, s8.code, 256),
            lambda: qf.dequantize_blockwise(q, s8),
        ],
        "gemv": [lambda: qf.gemv_4bit(x[:1], packed, state)],
        "qlora": [lambda: qf.qlora_linear(x, packed, state, torch.zeros(2, 64), torch.zeros(4, 2), 1.0)],
        "optim": [
            lambda: torch.ops.qpeft.adamw32_step_(
                torch.zeros(8), torch.ones(8), torch.zeros(8), torch.zeros(8), 1e-3, 0.9, 0.999, 1e-8, 0.0, 1
            ),
            lambda: torch.ops.qpeft.lion32_step_(
                torch.zeros(8), torch.ones(8), torch.zeros(8), 1e-3, 0.9, 0.99, 0.0
            ),
        ],
    }
    lists = {"quant": QUANT_BACKENDS, "gemv": GEMV_BACKENDS, "qlora": QLORA_BACKENDS, "optim": OPTIM_BACKENDS}
    for family, calls in ops.items():
        runs = [_try(fn) for fn in calls]
        assert runs == [backend in lists[family]] * len(calls), (family, backend, runs)


# --- 4-bit quantize (and its round trip) ----------------------------------------------------


def _check_4bit_definition(x, blocksize, quant_type, packed, state) -> None:
    """The reference against the format (bitsandbytes' NF4/FP4): absmax is each block's max |x|
    (with double quantization: offset = mean(absmax), and the absmax codes are the 8-bit
    blockwise quantization of absmax - offset), each code is a nearest table value to
    x / absmax, and decoding is table value * absmax, rounded once to the output dtype. A
    partial last block stores its absmax floored at 1e-38, as bitsandbytes does."""
    n = x.numel()
    flat = x.reshape(-1).float()
    blocks = torch.nn.functional.pad(flat, (0, -n % blocksize)).view(-1, blocksize)
    amax = blocks.abs().amax(1)
    if n % blocksize:  # bitsandbytes stores a partial last block's absmax floored at 1e-38
        amax[-1] = amax[-1].clamp(min=ABSMAX_FLOOR)
    if state.nested:
        assert_bits_equal(state.offset.reshape(()), amax.mean(), "offset")
        q, s2 = qf.quantize_blockwise(amax - amax.mean(), state.state2.blocksize, state.state2.code)
        assert_bits_equal(state.absmax, q, "absmax codes")
        assert_bits_equal(state.state2.absmax, s2.absmax, "nested absmax")
        absmax = _per_element(state.state2.code[state.absmax.long()], s2.absmax, s2.blocksize) + state.offset
    else:
        assert_bits_equal(state.absmax, amax, "absmax")
        absmax = amax
    codes = _unpack(packed, n)
    table = state.code
    # A nearest code to x / absmax: fp32 rounding of the normalised value (a reciprocal
    # product, a division in the partial last block) allows a choice within 1e-6 of a tie.
    # Blocks with a subnormal absmax are normalised by bitsandbytes' 1e-38 floor instead.
    normal = (amax >= torch.finfo(torch.float32).tiny).repeat_interleave(blocksize)[:n]
    v = (blocks / amax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]).reshape(-1)[:n]
    chosen = (table[codes] - v).abs()
    best = (table[None, :] - v[:, None]).abs().min(1).values
    assert bool((chosen <= best + 1e-6)[normal].all()), "a code is not a nearest one"
    if n % 2:  # the padding nibble is the code of 0.0
        assert int(packed.reshape(-1)[-1]) & 15 == int((table == 0).nonzero()[0, 0])
    for dtype in DTYPES:
        want = _per_element(table[codes], absmax, blocksize).to(dtype).reshape(x.shape)
        assert_bits_equal(qf.dequantize_4bit(packed, state, out_dtype=dtype), want, f"decoded to {dtype}")


@pytest.mark.parametrize("backend", QUANT_BACKENDS, indirect=True)
def test_quantize_4bit_matchesreference(backend, budget):
    def check(shape, blocksize, quant_type, double_quant, dtype, scale, seed):
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(shape, generator=g) * scale).to(dtype)
        if backend == "default":
            packed, state = qf.quantize_4bit(x, blocksize, quant_type, double_quant)
            _check_4bit_definition(x, blocksize, quant_type, packed, state)
        else:
            assert_same_quantization(x, blocksize, quant_type, double_quant, f"{backend} {shape}")

    budget.run(
        check,
        shape=_shapes(budget),
        blocksize=st.sampled_from(BLOCKSIZES_4BIT),
        quant_type=st.sampled_from(QUANT_TYPES),
        double_quant=st.booleans(),
        dtype=st.sampled_from(DTYPES),
        scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e4]),
        seed=st.integers(0, 2**31 - 1),
    )


# --- 4-bit dequantize of any state ------------------------------------------------------------

SPECIAL_ABSMAX = [
    1.0 + 2**-8,  # bf16 rounding ties
    1.0 + 3 * 2**-8,
    1.0 + 2**-11,  # fp16 rounding tie
    3.3e38,
    6.6e4,  # overflows fp16
    1e-40,
    0.0,
    -0.0,
    float("inf"),
    float("nan"),
    -1.0,
    2**-24,
    3 * 2**-25,
    2**-133,
    65520.0,
    65519.0,
]


def _check_dequantize_any(backend, nested, n, blocksize, quant_type, dtype, nested_blocksize, seed):
    g = torch.Generator().manual_seed(seed)
    nblocks = -(n // -blocksize)
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), generator=g, dtype=torch.uint8)
    shape = [n]
    if nested:
        codes8 = torch.randint(0, 256, (nblocks,), generator=g, dtype=torch.uint8)
        nested_absmax = torch.rand(-(nblocks // -nested_blocksize), generator=g) * 10
        offset = torch.rand(1, generator=g)
        code = dynamic_map(signed=True)
        args = (packed, codes8, nested_absmax, code, offset, blocksize, nested_blocksize, quant_type)
        op = torch.ops.qpeft.dequantize_4bit_nested
        absmax = _per_element(code[codes8.long()], nested_absmax, nested_blocksize) + offset
    else:
        raw = torch.randint(-(2**31), 2**31 - 1, (nblocks,), generator=g, dtype=torch.int64)
        absmax = raw.to(torch.int32).view(torch.float32)
        special = torch.tensor(SPECIAL_ABSMAX)[: max(0, nblocks - 1)]
        absmax[1 : 1 + special.numel()] = special
        args = (packed, absmax, blocksize, quant_type)
        op = torch.ops.qpeft.dequantize_4bit
    out = op(*args, shape, dtype)
    if backend == "default":
        table = reference(qf.quantize_4bit, torch.ones(1), 64, quant_type, False)[1].code
        want = _per_element(table[_unpack(packed, n)], absmax, blocksize).to(dtype)
    else:
        want = reference(op, *args, shape, dtype)
    assert_same_values(out, want, f"{backend} n={n} bs={blocksize} {quant_type} -> {dtype}")


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("backend", QUANT_BACKENDS, indirect=True)
def test_dequantize_4bit_any_state(backend, budget, nested):
    """Any packed bytes and any fp32 absmax (random bit patterns over every exponent, finite or
    not, and rounding ties/overflow of the 16-bit outputs), or any nested state (8-bit codes,
    nested absmax, offset), not only what quantize_4bit produces: the output cast must round
    to nearest even exactly as torch's does. NaN payloads may differ (assert_same_values)."""

    def check(n, blocksize, quant_type, dtype, nested_blocksize, seed):
        _check_dequantize_any(backend, nested, n, blocksize, quant_type, dtype, nested_blocksize, seed)

    cap = budget.max_dim**2
    budget.run(
        check,
        weight=0.5,
        n=st.integers(1, cap),
        blocksize=st.sampled_from(BLOCKSIZES_4BIT),
        quant_type=st.sampled_from(QUANT_TYPES),
        dtype=st.sampled_from(DTYPES),
        nested_blocksize=st.sampled_from([32, 256]),
        seed=st.integers(0, 2**31 - 1),
    )


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("backend", QUANT_BACKENDS, indirect=True)
def test_dequantize_4bit_every_special_absmax(backend, quant_type):
    """Every value of SPECIAL_ABSMAX in one call (112 blocks of 32, a partial odd last block:
    random bytes hold every code), plain and nested with more blocks than one nested block."""
    for dtype in DTYPES:
        _check_dequantize_any(backend, False, 112 * 32 - 9, 32, quant_type, dtype, 256, seed=7)
        for nested_blocksize in (32, 256):
            n = (2 * nested_blocksize + 5) * 32 - 1
            _check_dequantize_any(
                backend, True, n, 32, quant_type, dtype, nested_blocksize, seed=nested_blocksize
            )


# --- 8-bit blockwise ----------------------------------------------------------------------------


def _check_8bit_definition(x, blocksize, code, q, state) -> None:
    """The reference against the format: absmax per block, a code within one lookup bin
    (2 / 65535, the 65536-bin table bitsandbytes' CPU path uses) of the nearest one to
    x / absmax, all-zero blocks at index 0, and decoding = code * absmax rounded once."""
    n = x.numel()
    flat = x.reshape(-1).float()
    blocks = torch.nn.functional.pad(flat, (0, -n % blocksize)).view(-1, blocksize)
    amax = blocks.abs().amax(1)
    assert_bits_equal(state.absmax, amax, "absmax")
    v = (blocks / amax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]).reshape(-1)[:n]
    chosen = (code[q.reshape(-1).long()] - v).abs()
    best = (code[None, :] - v[:, None]).abs().min(1).values
    assert bool((chosen <= best + 2 / 65535).all()), "a code is further than one bin from the nearest"
    zero_block = (amax == 0).repeat_interleave(blocksize)[:n]
    assert bool((q.reshape(-1)[zero_block] == 0).all())
    for dtype in DTYPES:
        want = _per_element(code[q.reshape(-1).long()], amax, blocksize).to(dtype).reshape(x.shape)
        assert_bits_equal(qf.dequantize_blockwise(q, state, dtype), want, f"decoded to {dtype}")


@pytest.mark.parametrize("backend", QUANT_BACKENDS, indirect=True)
def test_quantize_blockwise_matchesreference(backend, budget):
    def check(n, blocksize, dtype, signed, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, generator=g)
        x = (x if signed else x.abs()).to(dtype)
        code = dynamic_map(signed=signed)
        q, s = qf.quantize_blockwise(x, blocksize, code)
        if backend == "default":
            _check_8bit_definition(x, blocksize, code, q, s)
            return
        q_ref, s_ref = reference(qf.quantize_blockwise, x, blocksize, code)
        assert_bits_equal(q, q_ref, f"{backend} n={n} 8-bit codes")
        assert_bits_equal(s.absmax, s_ref.absmax, f"{backend} n={n} 8-bit absmax")
        for out_dtype in DTYPES:
            assert_bits_equal(
                qf.dequantize_blockwise(q, s, out_dtype),
                reference(qf.dequantize_blockwise, q_ref, s_ref, out_dtype),
                f"{backend} n={n} 8-bit dequantized to {out_dtype}",
            )

    budget.run(
        check,
        weight=0.75,
        n=st.integers(1, min(3000, budget.max_dim**2)),
        blocksize=st.sampled_from(BLOCKSIZES_4BIT),
        dtype=st.sampled_from(DTYPES),
        signed=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )


# --- GEMV ---------------------------------------------------------------------------------------


_gemv_tolerance = gemv_tolerance  # each backend's bound (derivations in qpeft/testing.py)


@pytest.mark.parametrize("backend", GEMV_BACKENDS, indirect=True)
def test_gemv_4bit_within_bound(backend, budget):
    """y = x @ dequantize(W)^T for 1 to 8 rows: within the backend's derived bound of the exact
    product, and (other than the reference) within both bounds of the reference's result."""

    def check(m, n, k, dtype, quant_type, blocksize, nested, seed):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(n, k, generator=g)
        x = torch.randn(m, k, generator=g).to(dtype)
        packed, state = reference(qf.quantize_4bit, w, blocksize, quant_type, nested)
        y = qf.gemv_4bit(x, packed, state)
        assert y.shape == (m, n) and y.dtype == dtype
        w_deq = reference(qf.dequantize_4bit, packed, state, torch.float32)
        what = f"{backend} m={m} n={n} k={k} {dtype} {quant_type} bs{blocksize} nested={nested}"
        tol = _gemv_tolerance(backend, x, w_deq, dtype, blocksize)
        assert_within(y, x.double() @ w_deq.double().T, tol, f"{what} vs the exact product")
        if backend != "default":
            y_ref = reference(qf.gemv_4bit, x, packed, state)
            tol_ref = tol + _gemv_tolerance("default", x, w_deq, dtype, blocksize)
            assert_within(y, y_ref.double(), tol_ref, f"{what} vs the reference")

    budget.run(
        check,
        weight=0.5,
        m=st.integers(1, 8),
        n=st.integers(1, budget.max_dim // 2),
        k=st.integers(1, 4 * budget.max_dim),
        dtype=st.sampled_from(DTYPES),
        quant_type=st.sampled_from(QUANT_TYPES),
        blocksize=st.sampled_from([32, 64, 128, 4096]),
        nested=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )


# --- qlora_linear forward and backward ------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("backend", QLORA_BACKENDS, indirect=True)
def test_qlora_linear_cases(backend, case):
    """y, dx, dA, dB, dbias within the fp64 oracle's worst-case bounds (tests/_helpers.py),
    for shapes chosen to hit every mask edge of the Triton tiles and the CPU panels."""
    check_qlora_linear(make_problem(case), backend)


@pytest.mark.parametrize("backend", QLORA_BACKENDS, indirect=True)
def test_qlora_linear_random_shapes(backend, budget):
    def check(dtype, m, n, k, r, quant_type, double_quant, blocksize, bias, rank_scale, out_scale, seed):
        case = (dtype, m, n, k, r, quant_type, double_quant, blocksize, bias, rank_scale, out_scale)
        check_qlora_linear(make_problem(case, seed=seed), backend)

    dim = max(8, budget.max_dim // 2)
    budget.run(
        check,
        weight=0.2,
        dtype=st.sampled_from(DTYPES),
        m=st.integers(1, dim),
        n=st.integers(1, dim),
        k=st.integers(1, 2 * dim),
        r=st.integers(1, 9),
        quant_type=st.sampled_from(QUANT_TYPES),
        double_quant=st.booleans(),
        blocksize=st.sampled_from([32, 64, 128]),
        bias=st.booleans(),
        rank_scale=st.booleans(),
        out_scale=st.booleans(),
        seed=st.integers(0, 2**16),
    )


def test_use_backend_scopes_and_restores():
    """use_backend forces a backend only inside its block: a nested block restores the outer
    one, and an exception inside leaves no backend forced."""
    assert qpeft.current_backend() is None
    with qpeft.use_backend("default"):
        assert qpeft.current_backend() == "default"
        with qpeft.use_backend("cpu"):
            assert qpeft.current_backend() == "cpu"
        assert qpeft.current_backend() == "default"
    with pytest.raises(RuntimeError, match="inside"), qpeft.use_backend("cpu"):
        raise RuntimeError("inside")
    assert qpeft.current_backend() is None


@pytest.mark.parametrize("blocksize", [63, 96, 16])
def test_op_refuses_unsupported_blocksize(backend, blocksize):
    # the ops' own check, before any backend: every backend gives the same error (the native
    # kernels refused a blocksize that is not a power of two, the others computed something)
    from qpeft.functional import _quant_args

    packed, st = qf.quantize_4bit(torch.randn(33, 70), 64, "nf4", double_quant=False)
    absmax = st.absmax
    x, a, b = torch.randn(5, 70), torch.randn(3, 70), torch.randn(33, 3)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        torch.ops.qpeft.qlora_linear(
            x,
            packed,
            absmax,
            None,
            None,
            None,
            blocksize,
            256,
            "nf4",
            33,
            70,
            a,
            b,
            0.5,
            None,
            None,
            None,
            False,
        )
    with pytest.raises(ValueError, match="blocksize must be one of"):
        torch.ops.qpeft.dequantize_4bit(packed, absmax, blocksize, "nf4", [33, 70], torch.float32)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        torch.ops.qpeft.quantize_4bit(torch.randn(256), blocksize, "nf4")
    packed, st = qf.quantize_4bit(torch.randn(33, 70), 64, "nf4", double_quant=True)
    absmax, na, nc, off, (bs, _, qt, n, k) = _quant_args(st)
    with pytest.raises(ValueError, match="scaling must be finite"):
        torch.ops.qpeft.qlora_linear(
            x, packed, absmax, na, nc, off, bs, 256, qt, n, k, a, b, float("nan"), None, None, None, False
        )
    with pytest.raises(ValueError, match=r"lora_A must be 2-D \[r, 70\]"):
        torch.ops.qpeft.qlora_linear(
            x, packed, absmax, na, nc, off, bs, 256, qt, n, k, a[:, :69], b, 0.5, None, None, None, False
        )
