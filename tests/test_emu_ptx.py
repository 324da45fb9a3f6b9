"""The emulation of csrc/cuda/ptx.h (csrc/emu/emu_ptx.h): mma.m16n8k16, ldmatrix, cp.async,
lop3 and prmt held to the PTX ISA's definitions, and planted bugs in kernels that use them.

The probes build fragments element by element from the ISA's formulas, independently of the
emulator's decoding (csrc/emu/probe_kernels.cu); the planted bugs are csrc/emu/planted_bugs.cu.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qpeft.backends.cuda_emulated import emulation

from .emu_support import emu_module

SEEDS = [0, 1, 2, 3]  # 0: in order, 1: reverse, >= 2: random interleavings
U32 = 0xFFFFFFFF


@pytest.fixture(scope="module")
def t():
    return emu_module().testing


def _bits(x):
    return x.contiguous().view(torch.int16)


def _mma(t, a, b, c, threads=64):
    """d = a @ b + c on tiles of a [T, 16, 16] and b [T, 16, 8] (bf16 or fp16), c fp32; one
    tile per warp, blocks of `threads` threads."""
    d = torch.full(c.shape, float("nan"))
    a_bits, b_bits, c = _bits(a), _bits(b), c.contiguous()
    t.probe_mma(
        int(a.dtype == torch.bfloat16),
        a_bits.data_ptr(),
        b_bits.data_ptr(),
        c.data_ptr(),
        d.data_ptr(),
        a.shape[0],
        threads,
    )
    return d


def _ref64(a, b, c):
    return a.double() @ b.double() + c.double()


DTYPES = [torch.bfloat16, torch.float16]


# --- mma.m16n8k16 -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_mma_integer_values_are_exact(t, dtype):
    # Integer products and sums below 2^24 are exact in fp32 in any order: D must equal the
    # fp64 product whatever the accumulation order. 5 tiles: the last block has one warp.
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-16, 17, (5, 16, 16), generator=g).to(dtype)
    b = torch.randint(-16, 17, (5, 16, 8), generator=g).to(dtype)
    c = torch.randint(-1000, 1001, (5, 16, 8), generator=g).float()
    d = _mma(t, a, b, c)
    assert torch.equal(d.double(), _ref64(a, b, c))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    bf16=st.booleans(),
    mag=st.integers(0, 6),
    zero_c=st.booleans(),
)
def test_mma_integer_values_property(t, seed, bf16, mag, zero_c):
    # Magnitudes up to 2^mag: |sum| <= 16 * 2^12 + 2^12, exact in fp32 (and in bf16 inputs,
    # which hold integers up to 256 exactly).
    dtype = torch.bfloat16 if bf16 else torch.float16
    g = torch.Generator().manual_seed(seed)
    hi = 2**mag
    a = torch.randint(-hi, hi + 1, (2, 16, 16), generator=g).to(dtype)
    b = torch.randint(-hi, hi + 1, (2, 16, 8), generator=g).to(dtype)
    c = torch.zeros(2, 16, 8) if zero_c else torch.randint(-4096, 4097, (2, 16, 8), generator=g).float()
    assert torch.equal(_mma(t, a, b, c).double(), _ref64(a, b, c))


@pytest.mark.parametrize("dtype", DTYPES)
def test_mma_random_values_within_the_fp32_accumulation_bound(t, dtype):
    # Each product of two bf16 / fp16 values is exact in fp32; D adds 16 of them to C with
    # fp32 roundings. Whatever the order (the ISA leaves it to the hardware), a sum of
    # n + 1 = 17 terms by n roundings errs by at most gamma_n * sum|terms|,
    # gamma_n = n u / (1 - n u), u = 2^-24 (Higham, Accuracy and Stability, (4.4)).
    g = torch.Generator().manual_seed(2)
    a = (torch.randn(8, 16, 16, generator=g) * 3).to(dtype)
    b = (torch.randn(8, 16, 8, generator=g) * 3).to(dtype)
    c = torch.randn(8, 16, 8, generator=g) * 10
    d = _mma(t, a, b, c)
    ref = _ref64(a, b, c)
    u = 2.0**-24
    gamma = 16 * u / (1 - 16 * u)
    bound = gamma * (a.double().abs() @ b.double().abs() + c.double().abs())
    err = (d.double() - ref).abs()
    assert bool((err <= bound).all()), float((err - bound).max())
    assert float(err.max()) > 0, "random inputs should show some rounding"

    # The emulator's documented order: acc = C, then acc += A[i][k] * B[k][j] for k = 0..15,
    # each addition rounded to fp32 (csrc/emu/emu_ptx.h). Bit-exact.
    acc = c.clone()
    for k in range(16):
        acc = acc + a[:, :, k, None].float() * b[:, None, k, :].float()
    assert torch.equal(d, acc)


@pytest.mark.parametrize("threads", [32, 128])
def test_mma_in_blocks_of_other_sizes(t, threads):
    g = torch.Generator().manual_seed(threads)
    a = torch.randint(-8, 9, (6, 16, 16), generator=g).bfloat16()
    b = torch.randint(-8, 9, (6, 16, 8), generator=g).bfloat16()
    c = torch.randint(-8, 9, (6, 16, 8), generator=g).float()
    assert torch.equal(_mma(t, a, b, c, threads).double(), _ref64(a, b, c))


def test_mma_in_an_incomplete_warp_is_reported(t):
    a = torch.zeros(2, 16, 16, dtype=torch.bfloat16)
    b = torch.zeros(2, 16, 8, dtype=torch.bfloat16)
    with pytest.raises(
        RuntimeError,
        match=r"mma_m16n8k16<bf16> at probe_kernels.cu:\d+ is warp-collective over all 32 lanes, but warp 1 of a block of 48 threads has only lanes 0-15",
    ):
        _mma(t, a, b, torch.zeros(2, 16, 8), threads=48)


def test_mma_nonfinite_values_propagate(t):
    a = torch.zeros(2, 16, 16, dtype=torch.bfloat16)
    b = torch.zeros(2, 16, 8, dtype=torch.bfloat16)
    a[0, 3, 5] = float("inf")
    b[0, 5, 2] = 2.0
    a[1, 7, 0] = float("nan")
    c = torch.zeros(2, 16, 8)
    d = _mma(t, a, b, c)
    assert float(d[0, 3, 2]) == float("inf")
    assert bool(d[0, 3, [0, 1, 3, 4, 5, 6, 7]].isnan().all())  # inf * 0 is nan
    assert bool(d[1, 7].isnan().all())  # nan * 0 is nan
    d[0, 3] = 0
    d[1, 7] = 0
    assert bool((d == 0).all())


def _mma_gemm(t, a, b, bug):
    c = torch.full((16, 8), float("nan"))
    t.bug_mma_layout(_bits(a).data_ptr(), _bits(b).data_ptr(), c.data_ptr(), a.shape[1], bug)
    return c


def test_planted_wrong_fragment_layout_gives_a_wrong_product(t):
    g = torch.Generator().manual_seed(3)
    a = torch.randint(-8, 9, (16, 64), generator=g).bfloat16()
    b = torch.randint(-8, 9, (64, 8), generator=g).bfloat16()
    ref = (a.double() @ b.double()).float()
    assert torch.equal(_mma_gemm(t, a, b, 0), ref)
    assert not torch.allclose(_mma_gemm(t, a, b, 1), ref), "a[1] <-> a[2] swapped must be seen"


@pytest.mark.parametrize("seed", SEEDS)
def test_mma_needs_every_lane_at_one_line(t, seed):
    a = torch.ones(16, 16).bfloat16()
    b = torch.ones(16, 8).bfloat16()
    with emulation(seed=seed):
        # Only lanes 0-15 call it: the others exit (or are found exited) while it waits.
        with pytest.raises(
            RuntimeError, match=r"(exits|exited).*mma_m16n8k16<bf16>|mma_m16n8k16<bf16>.*(exits|exited)"
        ) as info:
            _mma_gemm(t, a, b, 2)
        assert "planted_bugs.cu:" in str(info.value)
        with pytest.raises(
            RuntimeError,
            match=r"mma_m16n8k16<bf16> at planted_bugs.cu:\d+ meets lanes .* at the same source line",
        ):
            _mma_gemm(t, a, b, 3)
        assert torch.equal(_mma_gemm(t, a, b, 0), torch.full((16, 8), 16.0))  # still usable


# --- ldmatrix ---------------------------------------------------------------------------------


def _expected_ldmatrix(m, num, trans):
    """PTX ISA: lane l gets, per matrix i, row l/4 columns 2(l%4), 2(l%4)+1 (trans: column l/4,
    rows 2(l%4), 2(l%4)+1), the lower-indexed element in the low half."""
    u = m.to(torch.int64) & 0xFFFF
    out = torch.zeros(32, 4, dtype=torch.int64)
    for lane in range(32):
        q, e = lane // 4, 2 * (lane % 4)
        for i in range(num):
            lo, hi = (u[i, e, q], u[i, e + 1, q]) if trans else (u[i, q, e], u[i, q, e + 1])
            out[lane, i] = int(lo) | (int(hi) << 16)
    return out


@pytest.mark.parametrize("storage", [0, 1], ids=["dynamic_smem", "static_shared"])
@pytest.mark.parametrize("trans", [False, True], ids=["rows", "trans"])
@pytest.mark.parametrize("num", [1, 2, 4])
def test_ldmatrix_layout(t, num, trans, storage):
    g = torch.Generator().manual_seed(num * 10 + trans)
    m = torch.randint(-(2**15), 2**15, (4, 8, 8), generator=g, dtype=torch.int16)
    out = torch.zeros(32 * 5, dtype=torch.int32)
    # Lanes past 8 * num pass a misaligned non-shared address: ignored, as in PTX.
    t.probe_ldmatrix(num, int(trans), m.data_ptr(), out.data_ptr(), 0, storage)
    got = out.view(32, 5).to(torch.int64) & U32
    assert torch.equal(got[:, :4], _expected_ldmatrix(m, num, trans))
    # smem_addr: offsets in one shared window (rows of 32 bytes).
    lanes = torch.arange(32)
    expected_addr = torch.where(lanes < 8 * num, (8 * (lanes // 8) + lanes % 8) * 32, U32)
    assert torch.equal(got[:, 4], expected_addr)


@pytest.mark.parametrize("offset", [2, 8])
def test_ldmatrix_misaligned_row_is_reported(t, offset):
    m = torch.zeros(4, 8, 8, dtype=torch.int16)
    out = torch.zeros(32 * 5, dtype=torch.int32)
    with pytest.raises(
        RuntimeError,
        match=r"ldmatrix.x2: lane \d+'s row address 0x[0-9a-f]+ .* is not 16-byte aligned at probe_kernels.cu:\d+",
    ):
        t.probe_ldmatrix(2, 0, m.data_ptr(), out.data_ptr(), offset, 0)


def test_ldmatrix_past_the_dynamic_shared_memory_is_reported(t):
    m = torch.zeros(4, 8, 8, dtype=torch.int16)
    out = torch.zeros(32 * 5, dtype=torch.int32)
    # 32 bytes further: row 31 starts at byte 1024 of the launch's 1024.
    with pytest.raises(
        RuntimeError,
        match=r"ldmatrix.x4 at probe_kernels.cu:\d+: bytes 1024..1039 of dynamic shared memory lie past the launch's 1024 bytes",
    ):
        t.probe_ldmatrix(4, 0, m.data_ptr(), out.data_ptr(), 32, 0)


def test_ldmatrix_of_local_memory_is_reported(t):
    m = torch.zeros(4, 8, 8, dtype=torch.int16)
    out = torch.zeros(32 * 5, dtype=torch.int32)
    with pytest.raises(
        RuntimeError, match=r"ldmatrix.x4 at probe_kernels.cu:\d+: address 0x[0-9a-f]+ is not shared memory"
    ):
        t.probe_ldmatrix(4, 0, m.data_ptr(), out.data_ptr(), 0, 2)


# --- cp.async ---------------------------------------------------------------------------------


def _cp_async(t, nbytes, src_bytes, mode=0, storage=0, seed=5):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, 256, (3 * 32 * nbytes,), generator=g, dtype=torch.uint8)
    # 64-byte alignment: the kernel offsets by multiples of nbytes.
    buf = torch.zeros(src.numel() + 64, dtype=torch.uint8)
    off = (-buf.data_ptr()) % 64
    aligned = buf[off : off + src.numel()]
    aligned.copy_(src)
    sb = torch.tensor(src_bytes, dtype=torch.int32)
    snap = torch.full((3, 3, 32, 16), 7, dtype=torch.uint8)
    t.probe_cp_async(nbytes, aligned.data_ptr(), sb.data_ptr(), snap.data_ptr(), mode, storage)
    return src.view(3, 32, nbytes), snap


@pytest.mark.parametrize("storage", [0, 1], ids=["dynamic_smem", "static_shared"])
@pytest.mark.parametrize("nbytes", [4, 8, 16])
def test_cp_async_groups_land_at_their_wait(t, nbytes, storage):
    # Three groups (stages 0, 1, 2). Before any wait every destination is poisoned (0xff);
    # wait<1> lands groups 0 and 1 only; wait<0> lands group 2. A copy reads src_bytes of
    # its source and zero-fills the rest of its Bytes; the slot past Bytes is untouched
    # (dynamic smem starts 0xff, the static array is set to 0xee by the kernel).
    src_bytes = [[0, nbytes, 1, nbytes - 1][i % 4] for i in range(32)]
    src_bytes[5] = nbytes // 2
    src, snap = _cp_async(t, nbytes, src_bytes, storage=storage)
    untouched = 0xFF if storage == 0 else 0xEE
    landed = torch.full((3, 32, 16), untouched, dtype=torch.uint8)
    for p in range(3):
        for th in range(32):
            n = src_bytes[th]
            landed[p, th, :n] = src[p, th, :n]
            landed[p, th, n:nbytes] = 0
    poisoned = torch.full((3, 32, 16), untouched, dtype=torch.uint8)
    poisoned[:, :, :nbytes] = 0xFF
    assert torch.equal(snap[0], poisoned), "before the wait the destination reads as poison"
    assert torch.equal(snap[1, :2], landed[:2]), "wait<1> retires groups 0 and 1"
    assert torch.equal(snap[1, 2], poisoned[2]), "wait<1> leaves the newest group in flight"
    assert torch.equal(snap[2], landed), "wait<0> retires everything"


@pytest.mark.parametrize(
    "mode,error",
    [
        (1, r"exits with 3 cp.async copies in flight \(the first issued at probe_kernels.cu:\d+\)"),
        (2, r"exits with 3 cp.async copies in flight .*1 never committed"),
        (
            3,
            r"cp_async<16> at probe_kernels.cu:\d+: destination 0x[0-9a-f]+ and source 0x[0-9a-f]+ must both be aligned to 16 bytes",
        ),
        (4, r"must both be aligned to 16 bytes"),
        (5, r"src_bytes 17 outside 0..16"),
        (6, r"cp_async destination at probe_kernels.cu:\d+: address 0x[0-9a-f]+ is not shared memory"),
        (
            7,
            r"ldmatrix.x1 at probe_kernels.cu:\d+ reads shared memory at 0x[0-9a-f]+ that a cp.async issued at probe_kernels.cu:\d+ by thread \(\d+,0,0\) still writes",
        ),
        (8, r"the source 0x[0-9a-f]+ is shared memory"),
    ],
)
@pytest.mark.parametrize("storage", [0, 1], ids=["dynamic_smem", "static_shared"])
def test_cp_async_misuse_is_reported(t, mode, error, storage):
    with pytest.raises(RuntimeError, match=error):
        _cp_async(t, 16, [16] * 32, mode=mode, storage=storage)
    _cp_async(t, 16, [16] * 32, storage=storage)  # the harness is clean for the next block


def _pipeline(t, bug, k=64, blocks=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(blocks, 16, k, generator=g).bfloat16()
    b = torch.randn(blocks, k, 16, generator=g).bfloat16()
    c = torch.full((blocks, 16, 16), float("nan"))
    ct = torch.full((blocks, 16, 16), float("nan"))
    t.bug_cp_async_pipeline(a.data_ptr(), b.data_ptr(), c.data_ptr(), ct.data_ptr(), k, blocks, bug)
    ref = a.double() @ b.double()
    u = 2.0**-24
    gamma = k * u / (1 - k * u)  # k fp32 additions (see the mma bound above)
    bound = gamma * (a.double().abs() @ b.double().abs())
    ok = bool(((c.double() - ref).abs() <= bound).all())
    # Warp 1 computes C^T = B^T A^T from the same products in the same k order.
    return ok and torch.equal(ct, c.transpose(1, 2))


@pytest.mark.parametrize("seed", SEEDS)
def test_cp_async_pipeline_and_its_planted_bugs(t, seed):
    with emulation(seed=seed):
        assert _pipeline(t, 0, k=96, blocks=3), "the correct 3-stage pipeline"
        # Missing cp_async_wait: the first ldmatrix reads a stage still in flight.
        with pytest.raises(
            RuntimeError,
            match=r"ldmatrix.x4(.trans)? at planted_bugs.cu:\d+ reads shared memory .* still writes",
        ):
            _pipeline(t, 1)


def test_cp_async_pipeline_missing_barrier_is_caught_for_every_seed(t):
    # Missing __syncthreads() after the wait: a warp's ldmatrix reads bytes another warp's
    # threads copy. Each warp's first ldmatrix reads bytes of every thread of the other
    # warp, so whichever warp completes one first finds a copy still in flight -- except
    # when a warp reads before the other has even issued its copies (possible once: the
    # prologue has no barrier either), which reads the 0xff poison: a wrong result.
    trapped = 0
    for seed in [0, 1, 2, 3, 4, 5, 6, 7]:
        with emulation(seed=seed):
            try:
                ok = _pipeline(t, 2)
            except RuntimeError as e:
                assert "still writes" in str(e) and "planted_bugs.cu:" in str(e)
                trapped += 1
            else:
                assert not ok, f"seed {seed}: the missing barrier went unnoticed"
            assert _pipeline(t, 0)
    assert trapped >= 4, trapped


# --- shuffles of the packed pair types (used next to mma fragments) ----------------------------


def test_shuffles_of_half2_and_bfloat162(t):
    threads = 64
    g = torch.Generator().manual_seed(6)
    x = torch.randint(0, 2**32, (threads,), generator=g, dtype=torch.int64)
    out = torch.zeros(2 * threads, dtype=torch.int32)
    x32 = x.to(torch.int32)  # same bits; kept alive across the call
    t.probe_shuffle_pairs(x32.data_ptr(), out.data_ptr(), threads)
    got = out.to(torch.int64) & U32
    lanes = torch.arange(threads)
    assert torch.equal(got[:threads], x[lanes ^ 1])  # __half2, xor 1
    down = torch.where(lanes % 8 + 3 < 8, lanes + 3, lanes)  # bf16x2, down 3 in 8-lane segments
    assert torch.equal(got[threads:], x[down])


# --- lop3, prmt -------------------------------------------------------------------------------


def _u32(n, g):
    return torch.randint(0, 2**32, (n,), generator=g, dtype=torch.int64)


def test_lop3_every_truth_table_and_prmt(t):
    n = 64
    g = torch.Generator().manual_seed(4)
    a, b, c = _u32(n, g), _u32(n, g), _u32(n, g)
    a[0], b[0], c[0] = 0xF0F0F0F0, 0xCCCCCCCC, 0xAAAAAAAA  # the canonical operands: result == lut
    sel = _u32(n, g)
    sel[1] = 0x3210  # identity on a
    sel[2] = 0x7654  # b
    sel[3] = 0xBA98  # sign of a's bytes
    a[3] = 0x80017FFF
    out = torch.zeros(256 * n, dtype=torch.int32)
    out2 = torch.zeros(n, dtype=torch.int32)
    as32 = [x.to(torch.int32) for x in (a, b, c, sel)]  # wraps to the same bits
    t.probe_bitops(*(x.data_ptr() for x in as32), out.data_ptr(), out2.data_ptr(), n)
    got = out.view(256, n).to(torch.int64) & U32
    # Truth-table definition, bit by bit: result bit = lut bit (a << 2 | b << 1 | c).
    for bit in range(32):
        idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        for lut in range(256):
            assert torch.equal((got[lut] >> bit) & 1, (lut >> idx) & 1), (lut, bit)
    assert got[:, 0].tolist() == [lut * 0x01010101 for lut in range(256)]

    # prmt.b32 default mode (PTX ISA): bytes {b, a} = b7..b4, b3..b0; nibble i of sel picks
    # byte (nibble & 7); with nibble bit 3 set, that byte's sign bit fills the byte.
    got2 = out2.to(torch.int64) & U32
    for i in range(n):
        v = (int(b[i]) << 32) | int(a[i])
        expected = 0
        for j in range(4):
            nib = (int(sel[i]) >> (4 * j)) & 0xF
            byte = (v >> (8 * (nib & 7))) & 0xFF
            if nib & 8:
                byte = 0xFF if byte & 0x80 else 0
            expected |= byte << (8 * j)
        assert int(got2[i]) == expected, i
    assert int(got2[1]) == int(a[1]) and int(got2[2]) == int(b[2])
    assert int(got2[3]) == 0xFF0000FF
