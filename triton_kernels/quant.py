"""Triton kernels for 4-bit (NF4/FP4) and 8-bit blockwise quantization, and their launchers.

Each kernel reproduces the pure-torch reference (qpeft/backends/default/ops.py) bit
for bit, on a GPU and under ``TRITON_INTERPRET=1``. What makes that hold:
- bf16 is widened and narrowed with integer ops (``_to_f32``, ``_to_out``): the
  interpreter's bf16 casts truncate and mangle subnormals; on a GPU these are exact too;
- every fp32 step rounds on its own: launches pass ``enable_fp_fusion=False`` (no
  mul+add contracted into an FMA) and divisions are ``tl.math.div_rn`` (IEEE), never
  the approximate ``/`` of fp32 in Triton;
- absmax propagates NaN explicitly: a GPU's max reduction drops NaN operands.

Tiling (all kernels): one program owns ROWS whole quantization blocks as a
[ROWS, BLOCKSIZE] tile, so a block's absmax is a row reduction that never leaves the
program, and small blocksizes still give each program ``_TILE`` elements of work.
Element offsets are int64 (n > 2^31 works); the tables (codes, midpoints) are read
through pointers, so one compiled kernel serves both NF4 and FP4.

The launchers take contiguous tensors, allocate outputs and launch; validation,
contiguity and op registration live in ``qpeft.backends.triton.quant``.
"""

from __future__ import annotations

import functools
from math import prod

import torch
import triton
import triton.language as tl

from .._formats import ABSMAX_FLOOR, BLOCKSIZES_4BIT, code4, encode4_tables, zero_code4

# Elements per program for blocksizes below it (ROWS = _TILE // BLOCKSIZE blocks); at
# and above it one block per program. 1024 elements over 4 warps is 8 per thread, so
# each thread has several loads in flight in these memory-bound kernels. A design choice,
# not tuned: no GPU was available (the AOT report gives registers and spills only).
_TILE = 1024
# The 4-bit dequantize kernels: 4096 elements (2 KiB packed) per program at every
# blocksize, so 4 warps give each thread 16 packed bytes (see launch_config).
_TILE4_DEQUANT = 4096
_FP = {"enable_fp_fusion": False}  # see the module docstring
_FLOOR = tl.constexpr(ABSMAX_FLOOR)  # globals read inside @triton.jit must be constexpr


def launch_config(blocksize: int, kernel: str = "") -> tuple[int, int]:
    """(ROWS, num_warps) of ``kernel`` at a blocksize: every launcher and AOT_CONFIGS use this."""
    if kernel in ("dequantize_4bit", "dequantize_4bit_nested"):
        # 32 outputs (16 packed bytes) per thread over 4 warps: each thread's bytes are one
        # 16-byte LDG.128 and its outputs 2-8 STG.128 (the unmasked tiles; see
        # _decode4_tile). Checked in benchmarks/results/sass_report.md (W load B = 16).
        return max(1, _TILE4_DEQUANT // blocksize), 4
    rows = max(1, _TILE // blocksize)
    if kernel == "quantize_blockwise":
        # 8 warps at every blocksize: at 4, compiled without the 16-byte pointer alignment
        # (a launch on an unaligned view), ptxas (Triton 3.9) kept a value on the stack
        # around the per-row div_rn slow-path CALLs (8-byte frame on sm_90 at bs 256, 32
        # registers); at 8 warps no config has a stack, aligned or not.
        return rows, 8
    return rows, 4 if rows * blocksize <= 1024 else 8  # 2048/4096-element blocks: 8 or 16 per thread


# --- shared device functions -----------------------------------------------------------


@triton.jit
def _absmax_rows(x):
    """max |x| per row of an fp32 [ROWS, COLS] tile, NaN when the row holds a NaN
    (torch.amax propagates NaN; a GPU max reduction would drop it)."""
    a = tl.max(tl.abs(x), axis=1)
    nan_probe = tl.sum(tl.where(x != x, x, 0.0), axis=1)  # NaN if the row has one, else +0.0
    return a + nan_probe  # a >= +0, so a + 0.0 == a bit for bit


@triton.jit
def _to_f32(x):
    """Exact upcast to fp32. bf16 goes by its bits (bf16 is the top half of an fp32): the
    interpreter's bf16->fp32 cast mangles subnormals; on a GPU this is the same shift."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def _to_out(v, OUT: tl.constexpr):
    """Cast fp32 to the output element type, rounding to nearest even."""
    if OUT == tl.bfloat16:
        # RNE by hand: the interpreter's fp32->bf16 cast truncates. Carries out of the
        # mantissa round up into the exponent, to Inf past bf16's max, as the IEEE cast does.
        u = v.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(v != v, 0x7FC0, r)  # NaN: the canonical quiet NaN
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(OUT)


@triton.jit
def _encode4(v, mid_ptr, step_ptr):
    """4-bit code of scaled values v: code = order[#{k : !(v <= mid[k])}] over the 15 sorted
    midpoints (a tie takes the lower code, NaN the top). ``step_ptr`` holds order[0] then
    order[k+1] - order[k], so the code is accumulated without a per-element gather."""
    code = tl.zeros(v.shape, tl.int32) + tl.load(step_ptr)
    for k in tl.static_range(15):
        m = tl.load(mid_ptr + k)
        s = tl.load(step_ptr + 1 + k)
        code += tl.where(v <= m, 0, s)
    return code


# --- kernels ---------------------------------------------------------------------------


@triton.jit
def quantize_4bit_kernel(
    x_ptr,
    packed_ptr,
    absmax_ptr,
    mid_ptr,
    step_ptr,
    n,
    BLOCKSIZE: tl.constexpr,
    ROWS: tl.constexpr,
):
    # Tile [ROWS, BLOCKSIZE] of whole blocks, loaded contiguously then split into the
    # (even, odd) element pairs that share a byte: the absmax is a row reduction and the
    # packed bytes of a row are contiguous, so both loads and stores coalesce.
    HALF: tl.constexpr = BLOCKSIZE // 2
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    x = _to_f32(tl.load(x_ptr + offs, mask=offs < n, other=0.0))  # zeros never raise |x|
    absmax = _absmax_rows(x)
    nblocks = (n + BLOCKSIZE - 1) // BLOCKSIZE

    # ABSMAX_FLOOR (1e-38, an fp32 subnormal): a bare literal below 2^-126 would be typed
    # fp64 by Triton and pull the whole computation into fp64. NaN stays NaN.
    floor = tl.full([ROWS], _FLOOR, tl.float32)
    floored = tl.where(absmax < floor, floor, absmax)
    v = x * tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), floored)[:, None]
    if (pid + 1) * ROWS * BLOCKSIZE > n:  # this program holds the last block
        # A partial last block divides instead of multiplying by the reciprocal (the
        # reference's, i.e. bitsandbytes' CPU rule); only this program pays for div_rn.
        # Its stored absmax is the floored one, as bitsandbytes stores it (format.h).
        partial = (rows == nblocks - 1) & (n % BLOCKSIZE != 0)
        v = tl.where(partial[:, None], tl.math.div_rn(x, floored[:, None]), v)
        absmax = tl.where(partial, floored, absmax)
    tl.store(absmax_ptr + rows, absmax, mask=rows < nblocks)

    hi, lo = tl.split(tl.reshape(v, (ROWS, HALF, 2)))
    code_hi = _encode4(hi, mid_ptr, step_ptr)
    code_lo = _encode4(lo, mid_ptr, step_ptr)
    byte = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
    # Odd n: the missing second element of the last byte is the code of 0.0, whatever
    # its block's absmax (0 * (1/NaN) would otherwise encode as NaN's code).
    code_lo = tl.where(2 * byte + 1 < n, code_lo, tl.load(step_ptr + 16))
    tl.store(packed_ptr + byte, ((code_hi << 4) | code_lo).to(tl.uint8), mask=2 * byte < n)


@triton.jit
def _decode4_tile(
    packed_ptr, absmax, code_ptr, out_ptr, rows, n, BLOCKSIZE: tl.constexpr, MASKED: tl.constexpr
):
    """Decode the [ROWS, BLOCKSIZE] tile of blocks ``rows`` with their fp32 absmax [ROWS]:
    one byte load gives two outputs, interleaved back (join) so the store is contiguous.

    MASKED=False (every element of the tile is < n): no masks, so the compiler sees whole
    contiguous 16-byte runs of packed bytes and of outputs and emits LDG.128 / STG.128; a
    mask on ``< n`` (n of any value) would limit it to one element per access."""
    HALF: tl.constexpr = BLOCKSIZE // 2
    byte = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
    offs = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    if MASKED:
        p = tl.load(packed_ptr + byte, mask=2 * byte < n, other=0).to(tl.int32)
    else:
        p = tl.load(packed_ptr + byte).to(tl.int32)
    hi = tl.load(code_ptr + (p >> 4)) * absmax[:, None]  # 16-entry table: L1-resident gather
    lo = tl.load(code_ptr + (p & 15)) * absmax[:, None]
    v = _to_out(tl.reshape(tl.join(hi, lo), (absmax.shape[0], BLOCKSIZE)), out_ptr.dtype.element_ty)
    if MASKED:
        tl.store(out_ptr + offs, v, mask=offs < n)
    else:
        tl.store(out_ptr + offs, v)


@triton.jit
def _decode4_program(packed_ptr, absmax, code_ptr, out_ptr, pid, rows, n, BLOCKSIZE: tl.constexpr):
    """_decode4_tile, unmasked when the program's whole tile lies below n (all programs but
    the last, for n a multiple of the tile), masked otherwise."""
    if (pid + 1) * (absmax.shape[0] * BLOCKSIZE) <= n:
        _decode4_tile(packed_ptr, absmax, code_ptr, out_ptr, rows, n, BLOCKSIZE, False)
    else:
        _decode4_tile(packed_ptr, absmax, code_ptr, out_ptr, rows, n, BLOCKSIZE, True)


@triton.jit
def dequantize_4bit_kernel(
    packed_ptr,
    absmax_ptr,
    code_ptr,
    out_ptr,
    n,
    BLOCKSIZE: tl.constexpr,
    ROWS: tl.constexpr,
):
    # Tile [ROWS, BLOCKSIZE] of whole blocks: one absmax load per row.
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    nblocks = (n + BLOCKSIZE - 1) // BLOCKSIZE
    absmax = tl.load(absmax_ptr + rows, mask=rows < nblocks, other=0.0)
    _decode4_program(packed_ptr, absmax, code_ptr, out_ptr, pid, rows, n, BLOCKSIZE)


@triton.jit
def dequantize_4bit_nested_kernel(
    packed_ptr,
    absmax_codes_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset_ptr,
    code_ptr,
    out_ptr,
    n,
    nested_blocksize,
    BLOCKSIZE: tl.constexpr,
    ROWS: tl.constexpr,
):
    # As dequantize_4bit_kernel, with each row's absmax decoded in place from its 8-bit
    # code: nested_code[q] * nested_absmax[b // nested_blocksize], then + offset (two
    # roundings: fp fusion is off). ROWS scalars per program, so no separate pass.
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    nblocks = (n + BLOCKSIZE - 1) // BLOCKSIZE
    live = rows < nblocks
    q = tl.load(absmax_codes_ptr + rows, mask=live, other=0).to(tl.int32)
    scale = tl.load(nested_absmax_ptr + rows // nested_blocksize, mask=live, other=0.0)
    absmax = tl.load(nested_code_ptr + q) * scale + tl.load(offset_ptr)
    _decode4_program(packed_ptr, absmax, code_ptr, out_ptr, pid, rows, n, BLOCKSIZE)


@triton.jit
def quantize_blockwise_kernel(
    x_ptr,
    code_ptr,
    q_ptr,
    absmax_ptr,
    n,
    BLOCKSIZE: tl.constexpr,
    ROWS: tl.constexpr,
):
    # Tile [ROWS, BLOCKSIZE] of whole blocks. The code of each value is the reference's
    # 65536-bin lookup computed in place: the bin's grid value, then a branchless binary
    # search for #{k : mid[k] < grid} over the 255 midpoints of the (sorted) code, read
    # from the 1 KiB code table (L1-resident), instead of a 64 KiB table built per call.
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    x = _to_f32(tl.load(x_ptr + offs, mask=offs < n, other=0.0))
    absmax = _absmax_rows(x)
    nblocks = (n + BLOCKSIZE - 1) // BLOCKSIZE
    tl.store(absmax_ptr + rows, absmax, mask=rows < nblocks)

    idx = _encode8(x, absmax, code_ptr)
    tl.store(q_ptr + offs, idx.to(tl.uint8), mask=offs < n)


@triton.jit
def _encode8(x, absmax, code_ptr):
    """8-bit codes of an fp32 [R, C] tile whose rows have the fp32 absmax [R]."""
    v = x * tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), absmax)[:, None]
    v = tl.where(v < -1.0, -1.0, tl.where(v > 1.0, 1.0, v))  # clamp; NaN passes through
    bins = (((v + 1.0) * 0.5) * 65535.0 + 0.5).to(tl.int32)  # LUT_BINS - 1; truncation
    bins = tl.where(v != v, 0, bins)
    # grid = -1 + 2 * bins / 65535 without a division: 1/65535 = 2^-16 (1 + 2^-16 + ...), and
    # summing the first three terms smallest first rounds to the IEEE quotient for all 65536
    # bins (checked exhaustively in tests/test_triton_quant.py). A per-element div_rn
    # compiled to a slow-path CALL per element and spilled (4 bytes on sm_80, bs 1024).
    t = (2.0 * bins.to(tl.float32)) * 0.0000152587890625  # 2^-16: exact
    t2 = t * 0.0000152587890625
    grid = -1.0 + (t + (t2 + t2 * 0.0000152587890625))
    idx = tl.zeros(v.shape, tl.int32)
    for i in tl.static_range(8):
        step = 128 >> i  # constexpr: 128, 64, ..., 1
        k = idx + (step - 1)
        mid = (tl.load(code_ptr + k) + tl.load(code_ptr + k + 1)) * 0.5  # == (a + b) / 2 exactly
        idx = tl.where(mid < grid, idx + step, idx)
    return tl.where((absmax == 0.0)[:, None], 0, idx)  # an all-zero block encodes to index 0


@triton.jit
def quantize_blockwise_any_kernel(x_ptr, code_ptr, q_ptr, absmax_ptr, n, blocksize, CHUNK: tl.constexpr):
    # Any other blocksize > 0 (bitsandbytes' CPU quantize_blockwise takes every positive
    # one): one program per block, two passes over it in CHUNK-element steps, the absmax
    # then the codes, with quantize_blockwise_kernel's per-element math (_encode8).
    b = tl.program_id(0).to(tl.int64)
    begin = b * blocksize
    end = tl.minimum(begin + blocksize, n)
    cols = tl.arange(0, CHUNK)[None, :]
    absmax = tl.zeros([1], tl.float32)
    for start in range(0, blocksize, CHUNK):
        offs = begin + start + cols
        x = _to_f32(tl.load(x_ptr + offs, mask=offs < end, other=0.0))
        a = _absmax_rows(x)
        absmax = tl.where((a > absmax) | (a != a), a, absmax)  # a NaN, once in, stays
    tl.store(absmax_ptr + b + tl.arange(0, 1), absmax)
    for start in range(0, blocksize, CHUNK):
        offs = begin + start + cols
        x = _to_f32(tl.load(x_ptr + offs, mask=offs < end, other=0.0))
        idx = _encode8(x, absmax, code_ptr)
        tl.store(q_ptr + offs, idx.to(tl.uint8), mask=offs < end)


@triton.jit
def dequantize_blockwise_any_kernel(q_ptr, absmax_ptr, code_ptr, out_ptr, n, blocksize, CHUNK: tl.constexpr):
    # The blocksizes quantize_blockwise_any_kernel serves: element-wise, the absmax of
    # each element found by a division.
    offs = tl.program_id(0).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    live = offs < n
    absmax = tl.load(absmax_ptr + offs // blocksize, mask=live, other=0.0)
    q = tl.load(q_ptr + offs, mask=live, other=0).to(tl.int32)
    v = tl.load(code_ptr + q) * absmax
    tl.store(out_ptr + offs, _to_out(v, out_ptr.dtype.element_ty), mask=live)


@triton.jit
def dequantize_blockwise_kernel(
    q_ptr,
    absmax_ptr,
    code_ptr,
    out_ptr,
    n,
    BLOCKSIZE: tl.constexpr,
    ROWS: tl.constexpr,
):
    # Tile [ROWS, BLOCKSIZE] of whole blocks: one absmax load per row, one gather from
    # the 256-entry code table per element.
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    nblocks = (n + BLOCKSIZE - 1) // BLOCKSIZE
    absmax = tl.load(absmax_ptr + rows, mask=rows < nblocks, other=0.0)
    q = tl.load(q_ptr + offs, mask=offs < n, other=0).to(tl.int32)
    v = tl.load(code_ptr + q) * absmax[:, None]
    tl.store(out_ptr + offs, _to_out(v, out_ptr.dtype.element_ty), mask=offs < n)


# --- launchers -------------------------------------------------------------------------


@functools.cache
def _encode4_device_tables(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints fp32[15], int32[17] = order[0], order[k+1] - order[k] for k < 15, zero code).

    Built from qpeft/_formats.py; tests/test_formats.py checks that they decode back to
    csrc/include/qpeft/format.h's midpoints, sorted order and padding code bit for bit.
    """
    mid, order = encode4_tables(quant_type)
    steps = torch.cat([order[:1], order[1:] - order[:-1], torch.tensor([zero_code4(quant_type)])])
    return mid.to(device), steps.to(device=device, dtype=torch.int32)


def _grid(n: int, blocksize: int, rows: int) -> tuple[int]:
    return (triton.cdiv(triton.cdiv(n, blocksize), rows),)


def quantize_4bit(x: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x contiguous fp32/fp16/bf16 -> (packed uint8 [(n + 1) // 2, 1], absmax fp32 [blocks])."""
    n = x.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=x.device)
    absmax = torch.empty((triton.cdiv(n, blocksize),), dtype=torch.float32, device=x.device)
    mid, steps = _encode4_device_tables(quant_type, x.device)
    rows, warps = launch_config(blocksize)
    quantize_4bit_kernel[_grid(n, blocksize, rows)](
        x, packed, absmax, mid, steps, n, BLOCKSIZE=blocksize, ROWS=rows, num_warps=warps, **_FP
    )
    return packed, absmax


def _out(out, shape, dtype, device) -> torch.Tensor:
    """The caller's contiguous ``out`` (checked by the wrapper), or a new tensor."""
    return torch.empty(tuple(shape), dtype=dtype, device=device) if out is None else out


def dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype, out=None) -> torch.Tensor:
    """Contiguous packed codes + fp32 absmax -> a ``shape``/``dtype`` tensor (into ``out`` if given)."""
    n = prod(int(s) for s in shape)
    out = _out(out, shape, dtype, packed.device)
    rows, warps = launch_config(blocksize, "dequantize_4bit")
    dequantize_4bit_kernel[_grid(n, blocksize, rows)](
        packed,
        absmax,
        code4(quant_type, packed.device),
        out,
        n,
        BLOCKSIZE=blocksize,
        ROWS=rows,
        num_warps=warps,
        **_FP,
    )
    return out


def dequantize_4bit_nested(
    packed,
    absmax_codes,
    nested_absmax,
    nested_code,
    offset,
    blocksize,
    nested_blocksize,
    quant_type,
    shape,
    dtype,
    out=None,
) -> torch.Tensor:
    """As dequantize_4bit with double-quantized absmax, decoded in the same kernel."""
    n = prod(int(s) for s in shape)
    out = _out(out, shape, dtype, packed.device)
    rows, warps = launch_config(blocksize, "dequantize_4bit_nested")
    dequantize_4bit_nested_kernel[_grid(n, blocksize, rows)](
        packed,
        absmax_codes,
        nested_absmax,
        nested_code,
        offset,
        code4(quant_type, packed.device),
        out,
        n,
        nested_blocksize,
        BLOCKSIZE=blocksize,
        ROWS=rows,
        num_warps=warps,
        **_FP,
    )
    return out


def quantize_blockwise(
    x: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """x contiguous float, code contiguous sorted fp32[256] -> (uint8 codes of x's shape, fp32 absmax)."""
    n = x.numel()
    q = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    absmax = torch.empty((triton.cdiv(n, blocksize),), dtype=torch.float32, device=x.device)
    if blocksize not in BLOCKSIZES_4BIT:
        quantize_blockwise_any_kernel[(absmax.numel(),)](
            x, code, q, absmax, n, blocksize, CHUNK=_TILE, num_warps=8, **_FP
        )
        return q, absmax
    rows, warps = launch_config(blocksize, "quantize_blockwise")
    quantize_blockwise_kernel[_grid(n, blocksize, rows)](
        x, code, q, absmax, n, BLOCKSIZE=blocksize, ROWS=rows, num_warps=warps, **_FP
    )
    return q, absmax


def dequantize_blockwise(q, absmax, code, blocksize, dtype, out=None) -> torch.Tensor:
    """Contiguous uint8 codes + fp32 absmax + fp32[256] code -> ``dtype`` tensor of q's shape."""
    n = q.numel()
    out = _out(out, q.shape, dtype, q.device)
    if blocksize not in BLOCKSIZES_4BIT:
        dequantize_blockwise_any_kernel[(triton.cdiv(n, _TILE),)](
            q, absmax, code, out, n, blocksize, CHUNK=_TILE, num_warps=4, **_FP
        )
        return out
    rows, warps = launch_config(blocksize)
    dequantize_blockwise_kernel[_grid(n, blocksize, rows)](
        q, absmax, code, out, n, BLOCKSIZE=blocksize, ROWS=rows, num_warps=warps, **_FP
    )
    return out


# --- ahead-of-time configurations (format: triton_kernels/__init__.py) -----------------

_DTYPES = ("fp32", "fp16", "bf16")


def _aot(name: str, fn, args: dict, blocksize: int) -> dict:
    rows, warps = launch_config(blocksize, fn.__name__.removesuffix("_kernel"))
    constexprs = {"BLOCKSIZE": blocksize, "ROWS": rows}
    signature = {a: args.get(a, "constexpr") for a in fn.arg_names}
    # As the JIT specializes a launch on torch tensors: 16-byte aligned pointers. n is
    # left general (not assumed divisible by 16).
    attrs = {
        (i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if signature[a].startswith("*")
    }
    return {
        "name": name,
        "fn": fn,
        "signature": signature,
        "constexprs": constexprs,
        "num_warps": warps,
        "num_stages": 3,  # no loops to pipeline: the value does not change the code
        "attrs": attrs,
        "options": dict(_FP),
        "default": True,  # every entry is a config the launchers run
    }


def _aot_configs() -> list[dict]:
    configs = []
    for bs in BLOCKSIZES_4BIT:
        for dt in _DTYPES:
            configs += [
                _aot(
                    f"quantize_4bit_bs{bs}_{dt}",
                    quantize_4bit_kernel,
                    {
                        "x_ptr": f"*{dt}",
                        "packed_ptr": "*u8",
                        "absmax_ptr": "*fp32",
                        "mid_ptr": "*fp32",
                        "step_ptr": "*i32",
                        "n": "i32",
                    },
                    bs,
                ),
                _aot(
                    f"dequantize_4bit_bs{bs}_{dt}",
                    dequantize_4bit_kernel,
                    {
                        "packed_ptr": "*u8",
                        "absmax_ptr": "*fp32",
                        "code_ptr": "*fp32",
                        "out_ptr": f"*{dt}",
                        "n": "i32",
                    },
                    bs,
                ),
                _aot(
                    f"dequantize_4bit_nested_bs{bs}_{dt}",
                    dequantize_4bit_nested_kernel,
                    {
                        "packed_ptr": "*u8",
                        "absmax_codes_ptr": "*u8",
                        "nested_absmax_ptr": "*fp32",
                        "nested_code_ptr": "*fp32",
                        "offset_ptr": "*fp32",
                        "code_ptr": "*fp32",
                        "out_ptr": f"*{dt}",
                        "n": "i32",
                        "nested_blocksize": "i32",
                    },
                    bs,
                ),
                _aot(
                    f"quantize_blockwise_bs{bs}_{dt}",
                    quantize_blockwise_kernel,
                    {
                        "x_ptr": f"*{dt}",
                        "code_ptr": "*fp32",
                        "q_ptr": "*u8",
                        "absmax_ptr": "*fp32",
                        "n": "i32",
                    },
                    bs,
                ),
                _aot(
                    f"dequantize_blockwise_bs{bs}_{dt}",
                    dequantize_blockwise_kernel,
                    {
                        "q_ptr": "*u8",
                        "absmax_ptr": "*fp32",
                        "code_ptr": "*fp32",
                        "out_ptr": f"*{dt}",
                        "n": "i32",
                    },
                    bs,
                ),
            ]
    return configs


AOT_CONFIGS = _aot_configs()
