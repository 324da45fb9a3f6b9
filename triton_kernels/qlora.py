"""Fused 4-bit dequant + LoRA GEMM (forward and the dX backward), as plain launchers.

    y  = out_scale * (x @ dequant(W)^T + bias + ((s * (x @ A^T) * rank_scale) @ B^T))
    dx = dy' @ dequant(W) + ((s * (dy' @ B) * rank_scale) @ A),   dy' = dy * out_scale

W is the qpeft packed layout (docs/design.md, "Formats"): uint8 codes of the row-major
[N, K] weight flattened, two per byte (high nibble first), one absmax per
``BLOCKSIZE`` consecutive elements of the flat weight, so a quant block can straddle
rows. Double quantization decodes absmax in the kernel as
``nested_code[q] * nested_absmax[b // NESTED_BLOCKSIZE] + offset``. W tiles are
dequantized in registers inside the K (or N) loop and never written to memory.

The LoRA down-projection (x @ A^T, or dy @ B in the backward) is accumulated from the
same activation tiles as the base GEMM, so the activations are read once per program;
every program along N (K) recomputes it for its rows, which costs r / BLOCK_N extra
FLOPs and no extra activation traffic. The program at pid_n == 0 (pid_k == 0) writes it
out when the backward needs it. At large M on sm_90 (``use_pre_lora``: M >= PRE_LORA_M,
where that recompute is MMA time the kernel is bound by) the launcher instead computes it
once with ``qlora_lora_down_kernel`` and the main kernel (PRE_LORA) reads the fp32 product
in its epilogue (docs/design.md, "Triton configs: the precomputed down-projection").

No registration or autograd here (``qpeft.backends.triton.qlora`` does that); the
launchers take contiguous-or-strided torch tensors and return new ones.

Configs: each launch runs its shape regime's default config (``default_config``: M <= 16
or larger, LoRA rank bucket), with no autotuning unless QPEFT_TRITON_AUTOTUNE=1, which
autotunes over the regime's table (docs/design.md, "Triton configs").
At M <= SPLIT_M (64), when the output tiles do not fill the SMs, the split schedule runs
instead: the loop range is split across programs, fp32 partials are reduced in a fixed
order by a second kernel that also runs the epilogue (``_split_plan``, below).

Interpreter (TRITON_INTERPRET=1, CPU): one small fixed config (never autotuned),
and ``UPCAST`` turns bf16 tiles into fp32 before ``tl.dot`` (the interpreter's bf16
dot returns garbage); the tiles are rounded to bf16 first, so the values are those
the GPU multiplies (up to the interpreter's truncating fp32->bf16 cast).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _absmax(
    absmax_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset_ptr,
    blk,
    mask,
    NESTED_BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
):
    """fp32 absmax of quant blocks ``blk`` (int32), 0 where masked."""
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0)
        scale = tl.load(nested_absmax_ptr + blk // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        # Same fp32 steps as the reference (code * nested_absmax, then + offset); on GPU
        # the compiler may contract them into one FMA (an ulp of absmax at most).
        absmax = tl.where(mask, tl.load(nested_code_ptr + q) * scale + tl.load(offset_ptr), 0.0)
    else:
        absmax = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return absmax


@triton.jit
def _dequant_rows(
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset_ptr,
    code_ptr,
    offs_n,
    n_base,
    k0,
    N,
    K,
    BLOCK_K: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """W[offs_n, k0 : k0 + BLOCK_K] as fp32 [BN, BLOCK_K], 0 outside W.

    offs_n = n_base + arange(BN); n_base and k0 are multiples of power-of-two BLOCK sizes
    >= 16, so every tile starts on an even flat index (a whole byte).
    ALIGNED (K % BLOCKSIZE == 0, every LLM shape): rows hold whole quant blocks and K is
    even, so the tile is [BN, BLOCK_K/2] contiguous bytes per row (vector loads) whose two
    nibbles are interleaved with tl.join, and absmax is one value per row and per
    min(BLOCK_K, BLOCKSIZE) run: BN * max(1, BLOCK_K/BLOCKSIZE) loads, not BN * BLOCK_K.
    Otherwise (quant blocks straddle rows) every element computes its byte and block
    from its flat index: a 64-bit scalar base plus a 32-bit offset, so the index tiles
    stay 32-bit; blocks are counted in int32 (W < 2^36 elements).
    """
    BN: tl.constexpr = offs_n.shape[0]
    n_ok = offs_n < N
    if ALIGNED:
        HALF: tl.constexpr = BLOCK_K // 2
        j = tl.arange(0, HALF)
        row_byte = offs_n.to(tl.int64) * (K // 2)
        byte = tl.load(
            packed_ptr + row_byte[:, None] + (k0 // 2 + j)[None, :],
            mask=n_ok[:, None] & (k0 + 2 * j < K)[None, :],
            other=0,
        )
        codes = tl.join(byte >> 4, byte & 0xF).reshape(BN, BLOCK_K)  # element 2j: high nibble
        value = tl.load(code_ptr + codes)  # 16-entry table, L1-resident
        SUB: tl.constexpr = BLOCK_K if BLOCK_K < BLOCKSIZE else BLOCKSIZE
        G: tl.constexpr = BLOCK_K // SUB
        g_k = k0 + tl.arange(0, G) * SUB
        blk = offs_n[:, None] * (K // BLOCKSIZE) + (g_k // BLOCKSIZE)[None, :]
        scale = _absmax(
            absmax_ptr,
            nested_absmax_ptr,
            nested_code_ptr,
            offset_ptr,
            blk,
            n_ok[:, None] & (g_k < K)[None, :],
            NESTED_BLOCKSIZE,
            NESTED,
        )
        scale = tl.broadcast_to(scale[:, :, None], (BN, G, SUB)).reshape(BN, BLOCK_K)
        return value * scale  # masked: finite code value * 0 (groups are wholly in or out)
    e0 = tl.cast(n_base, tl.int64) * K + k0
    offs_k = tl.arange(0, BLOCK_K)
    local = (offs_n - n_base)[:, None] * K + offs_k[None, :]
    mask = n_ok[:, None] & (k0 + offs_k < K)[None, :]
    byte = tl.load(packed_ptr + (e0 >> 1) + (local >> 1), mask=mask, other=0)
    value = tl.load(code_ptr + tl.where((local & 1) == 0, byte >> 4, byte & 0xF))
    blk = (e0 // BLOCKSIZE).to(tl.int32) + ((e0 % BLOCKSIZE).to(tl.int32) + local) // BLOCKSIZE
    scale = _absmax(
        absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, blk, mask, NESTED_BLOCKSIZE, NESTED
    )
    return tl.where(mask, value * scale, 0.0)


# ---------------------------------------------------------------------------------------
# Register decode (docs/design.md, "Fused kernels: register decode"): the 16-entry code
# table is scaled by each quant block's absmax once per block and rounded to the 16-bit
# output type, so a table entry is exactly the reference dequantize's value
# (dtype(code[q] * absmax), fp32 product, one rounding); every element is then a pure
# 16-entry lookup done with byte permutes (PTX prmt) on the packed 32-bit word of 8
# codes. Nothing is gathered from memory. Under the interpreter (no inline PTX) every
# prmt is the bit-exact emulation below, so the tests run the same selectors and tables.
# ---------------------------------------------------------------------------------------


@triton.jit
def _prmt(a, b, sel, ASM: tl.constexpr):
    """PTX ``prmt.b32 d, a, b, sel`` (default mode) on uint32 tensors: byte i of d is byte
    (sel >> 4i) & 7 of the 8 bytes {b, a} (a holds bytes 0-3), or, when bit 3 of that
    selector nibble is set, that byte's sign bit replicated; only sel's low 16 bits count."""
    if ASM:
        d = tl.inline_asm_elementwise(
            "prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, sel], dtype=tl.uint32, is_pure=True, pack=1
        )
    else:
        # the 4 byte lanes as a new last axis (few interpreter ops per call)
        ab = a.to(tl.uint64) | (b.to(tl.uint64) << 32)  # bytes 0-3: a, 4-7: b
        lane = tl.arange(0, 4)
        nib = ((tl.expand_dims((a * 0 + sel).to(tl.uint32), -1) >> (4 * lane)) & 0xF).to(tl.uint64)
        byte = (tl.expand_dims(ab, -1) >> ((nib & 7) * 8)) & 0xFF
        sign = tl.where((byte & 0x80) != 0, 0xFF, 0).to(tl.uint64)
        byte = tl.where((nib & 8) != 0, sign, byte)
        d = tl.sum(byte << (8 * lane).to(tl.uint64), axis=-1).to(tl.uint32)  # disjoint bytes: sum = or
    return d


@triton.jit
def _pack2(lo, hi, dt: tl.constexpr, ASM: tl.constexpr):
    """uint32 holding (lo, hi) fp32 rounded to nearest-even to fp16/bf16, lo in bits 0-15
    (PTX cvt.rn.{bf16x2,f16x2}.f32). The interpreter's fp32->bf16 cast truncates, so
    there bf16 is rounded by integer arithmetic (finite inputs)."""
    if ASM:
        if dt == tl.bfloat16:
            d = tl.inline_asm_elementwise(
                "cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,r,r", [lo, hi], dtype=tl.uint32, is_pure=True, pack=1
            )
        else:
            d = tl.inline_asm_elementwise(
                "cvt.rn.f16x2.f32 $0, $2, $1;", "=r,r,r", [lo, hi], dtype=tl.uint32, is_pure=True, pack=1
            )
    else:
        if dt == tl.bfloat16:
            bl = lo.to(tl.uint32, bitcast=True)
            bh = hi.to(tl.uint32, bitcast=True)
            rl = (bl + 0x7FFF + ((bl >> 16) & 1)) >> 16
            rh = (bh + 0x7FFF + ((bh >> 16) & 1)) >> 16
        else:
            rl = lo.to(dt).to(tl.uint16, bitcast=True).to(tl.uint32)
            rh = hi.to(dt).to(tl.uint16, bitcast=True).to(tl.uint32)
        d = rl | (rh << 16)
    return d


@triton.jit
def _load_codes(code_ptr):
    """The 16 fp32 code values as scalars, loaded once per program (before the loop)."""
    return (
        tl.load(code_ptr + 0),
        tl.load(code_ptr + 1),
        tl.load(code_ptr + 2),
        tl.load(code_ptr + 3),
        tl.load(code_ptr + 4),
        tl.load(code_ptr + 5),
        tl.load(code_ptr + 6),
        tl.load(code_ptr + 7),
        tl.load(code_ptr + 8),
        tl.load(code_ptr + 9),
        tl.load(code_ptr + 10),
        tl.load(code_ptr + 11),
        tl.load(code_ptr + 12),
        tl.load(code_ptr + 13),
        tl.load(code_ptr + 14),
        tl.load(code_ptr + 15),
    )


@triton.jit
def _planes(codes, a, dt: tl.constexpr, ASM: tl.constexpr):
    """The block table dt(codes[j] * a), j = 0..15, of every absmax in ``a`` (fp32), as 8
    uint32 byte planes: p[q] (q < 4) holds the low bytes of entries 4q..4q+3, p[4 + q]
    their high bytes. 16 FMUL + 8 packed conversions + 8 prmt per block."""
    p0 = _pack2(codes[0] * a, codes[1] * a, dt, ASM)
    p1 = _pack2(codes[2] * a, codes[3] * a, dt, ASM)
    p2 = _pack2(codes[4] * a, codes[5] * a, dt, ASM)
    p3 = _pack2(codes[6] * a, codes[7] * a, dt, ASM)
    p4 = _pack2(codes[8] * a, codes[9] * a, dt, ASM)
    p5 = _pack2(codes[10] * a, codes[11] * a, dt, ASM)
    p6 = _pack2(codes[12] * a, codes[13] * a, dt, ASM)
    p7 = _pack2(codes[14] * a, codes[15] * a, dt, ASM)
    return (
        _prmt(p0, p1, 0x6420, ASM),
        _prmt(p2, p3, 0x6420, ASM),
        _prmt(p4, p5, 0x6420, ASM),
        _prmt(p6, p7, 0x6420, ASM),
        _prmt(p0, p1, 0x7531, ASM),
        _prmt(p2, p3, 0x7531, ASM),
        _prmt(p4, p5, 0x7531, ASM),
        _prmt(p6, p7, 0x7531, ASM),
    )


@triton.jit
def _lookup4(t, sa, sb, ASM: tl.constexpr, LOW_FIRST: tl.constexpr):
    """Entries of the tables ``t`` for the 4 codes in the low 16 bits of a word (byte k of
    ``lo``/``hi``: the code in selector nibble k), as 2 uint32 of 2 entries each in element
    order: ((e0, e1), (e2, e3)), with e0 = nibble 1 (bitsandbytes: the high nibble of the
    first byte) or, LOW_FIRST (the fragment layout), nibble 0. sa: the word & 0x7777
    (entry within a half table); sb: per nibble, i + 4 * (code >= 8) (which half's byte i)."""
    lo = _prmt(_prmt(t[0], t[1], sa, ASM), _prmt(t[2], t[3], sa, ASM), sb, ASM)
    hi = _prmt(_prmt(t[4], t[5], sa, ASM), _prmt(t[6], t[7], sa, ASM), sb, ASM)
    if LOW_FIRST:
        return _prmt(lo, hi, 0x5140, ASM), _prmt(lo, hi, 0x7362, ASM)
    return _prmt(lo, hi, 0x4051, ASM), _prmt(lo, hi, 0x6273, ASM)


@triton.jit
def _halves(p):
    """uint32 of two 16-bit values -> (bits 0-15, bits 16-31) as uint16."""
    return (p & 0xFFFF).to(tl.uint16), (p >> 16).to(tl.uint16)


@triton.jit
def _dequant_lut(
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset_ptr,
    codes,
    offs_n,
    k0,
    N,
    K,
    dt: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    ASM: tl.constexpr,
    FRAG: tl.constexpr,
):
    """W[offs_n, k0 : k0 + BLOCK_K] as ``dt`` (fp16/bf16) [BN, BLOCK_K], 0 outside W; for
    K % BLOCKSIZE == 0 (rows hold whole quant blocks; BLOCKSIZE >= 32, so a row is a whole
    number of 16-byte chunks) and a 16-byte aligned ``packed`` (the launcher's ``_lut``).

    W is read as 32-bit words of 8 codes, [BN, BLOCK_K / 8] per tile, each row's words
    contiguous (16-byte vector loads). Each quant block's 16-entry table is built once
    per block and row of the tile (``_planes``), then every word is decoded by 16 prmt
    and 5 integer ops into 4 packed pairs (docs/design.md, "Fused kernels: register
    decode"). Masked words read 0 and masked blocks have absmax 0: their entries are +-0.
    FRAG: ``packed`` is in the fragment layout (qpeft/layout.py; BLOCK_K % 128 == 0): the
    same row-local words, each decoded low nibble first and the tile's codes permuted back
    to k order in registers (docs/design.md, "The GPU fragment layout")."""
    BN: tl.constexpr = offs_n.shape[0]
    WPR: tl.constexpr = BLOCK_K // 8  # words per tile row
    SUB: tl.constexpr = BLOCK_K if BLOCK_K < BLOCKSIZE else BLOCKSIZE
    G: tl.constexpr = BLOCK_K // SUB
    n_ok = offs_n < N
    j = tl.arange(0, WPR)
    # Words per row, written K // BLOCKSIZE * (BLOCKSIZE // 8) so that the compiler knows
    # it is a multiple of 4: row starts are 16-byte aligned and the K mask is constant over
    # each thread's 4 contiguous words (a mask on k0 + 8 * j would not be: 4-byte loads).
    words = K // BLOCKSIZE * (BLOCKSIZE // 8)
    wj = k0 // 8 + j
    w = tl.load(
        tl.multiple_of(packed_ptr.to(tl.pointer_type(tl.uint32)), 16)
        + offs_n.to(tl.int64)[:, None] * words
        + wj[None, :],
        mask=n_ok[:, None] & (wj < words)[None, :],
        other=0,
    )
    g_k = k0 + tl.arange(0, G) * SUB
    blk = offs_n[:, None] * (K // BLOCKSIZE) + (g_k // BLOCKSIZE)[None, :]
    a = _absmax(
        absmax_ptr,
        nested_absmax_ptr,
        nested_code_ptr,
        offset_ptr,
        blk,
        n_ok[:, None] & (g_k < K)[None, :],
        NESTED_BLOCKSIZE,
        NESTED,
    )
    t = _planes(codes, a, dt, ASM)  # 8 x [BN, G]
    # each word takes its block's tables: [BN, G] -> [BN, WPR]
    t = (
        _word_tables(t[0], BN, G, SUB, WPR, FRAG),
        _word_tables(t[1], BN, G, SUB, WPR, FRAG),
        _word_tables(t[2], BN, G, SUB, WPR, FRAG),
        _word_tables(t[3], BN, G, SUB, WPR, FRAG),
        _word_tables(t[4], BN, G, SUB, WPR, FRAG),
        _word_tables(t[5], BN, G, SUB, WPR, FRAG),
        _word_tables(t[6], BN, G, SUB, WPR, FRAG),
        _word_tables(t[7], BN, G, SUB, WPR, FRAG),
    )
    # Element e of a word (e0 first in memory) is nibble e ^ 1 (byte e // 2, high nibble
    # first). Selectors: low 16 bits for e0..e3, high 16 bits for e4..e7.
    sa = w & 0x77777777
    sb = ((w >> 1) & 0x44444444) | 0x32103210
    p01, p23 = _lookup4(t, sa, sb, ASM, FRAG)
    p45, p67 = _lookup4(t, sa >> 16, sb >> 16, ASM, FRAG)
    l01, h01 = _halves(p01)
    l23, h23 = _halves(p23)
    l45, h45 = _halves(p45)
    l67, h67 = _halves(p67)
    # [BN, WPR, q, p, h] -> element 4q + 2p + h of the word
    v = tl.join(tl.join(tl.join(l01, l45), tl.join(l23, l67)), tl.join(tl.join(h01, h45), tl.join(h23, h67)))
    if FRAG:
        # memory order [chunk, lane t, word j, e = 4h + 2q + p] -> k = 32j + 16h + 8q + 2t + p
        v = v.reshape(BN, BLOCK_K // 128, 4, 4, 2, 2, 2).permute(0, 1, 3, 4, 5, 2, 6)
    return v.reshape(BN, BLOCK_K).to(dt, bitcast=True)


@triton.jit
def _word_tables(
    t, BN: tl.constexpr, G: tl.constexpr, SUB: tl.constexpr, WPR: tl.constexpr, FRAG: tl.constexpr
):
    """Per-block tables [BN, G] (G blocks of SUB codes per tile row) -> one per word [BN,
    WPR]. bitsandbytes order: a block is SUB / 8 consecutive words. Fragment order (words
    [chunk c, lane t, word j], word j holding k in [128c + 32j, 128c + 32j + 32)): for SUB
    < 128 the block of word (c, t, j) is (128 / SUB) c + j // (SUB / 32), for every t."""
    if FRAG and SUB < 128:
        BPC: tl.constexpr = 128 // SUB  # blocks per chunk
        t5 = t.reshape(BN, G // BPC, 1, BPC, 1)
        return tl.broadcast_to(t5, (BN, G // BPC, 4, BPC, SUB // 32)).reshape(BN, WPR)
    return tl.broadcast_to(t[:, :, None], (BN, G, SUB // 8)).reshape(BN, WPR)


@triton.jit
def _dequant_tile(
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset_ptr,
    code_ptr,
    codes,
    offs_n,
    n_base,
    k0,
    N,
    K,
    dt: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    ALIGNED: tl.constexpr,
    LUT: tl.constexpr,
    ASM: tl.constexpr,
):
    """W[offs_n, k0 : k0 + BLOCK_K] in ``dt``: the register decode (LUT) or the fp32 path."""
    if LUT:
        w = _dequant_lut(
            packed_ptr,
            absmax_ptr,
            nested_absmax_ptr,
            nested_code_ptr,
            offset_ptr,
            codes,
            offs_n,
            k0,
            N,
            K,
            dt,
            BLOCK_K,
            BLOCKSIZE,
            NESTED_BLOCKSIZE,
            NESTED,
            ASM,
            LUT == 2,
        )
    else:
        w = _dequant_rows(
            packed_ptr,
            absmax_ptr,
            nested_absmax_ptr,
            nested_code_ptr,
            offset_ptr,
            code_ptr,
            offs_n,
            n_base,
            k0,
            N,
            K,
            BLOCK_K,
            BLOCKSIZE,
            NESTED_BLOCKSIZE,
            NESTED,
            ALIGNED,
        ).to(dt)
    return w


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ b with fp32 accumulation (see module docstring for UPCAST)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:  # fp32 operands: exact fp32 products, not TF32
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _fwd_loop(
    x_ptr,
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset_ptr,
    code_ptr,
    a_ptr,
    offs_m,
    offs_n,
    n_base,
    k_lo,
    k_hi,
    M,
    N,
    K,
    R,
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    ALIGNED: tl.constexpr,
    LUT: tl.constexpr,
    HAS_LORA: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    ASM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """The forward's K loop over [k_lo, k_hi) (k_lo a multiple of BLOCK_K): fp32
    (x @ W^T, x @ A^T) for rows offs_m and columns offs_n."""
    dt = x_ptr.dtype.element_ty
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    r_ok = offs_r < R
    if LUT:
        codes = _load_codes(code_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w = _dequant_tile(
            packed_ptr,
            absmax_ptr,
            nested_absmax_ptr,
            nested_code_ptr,
            offset_ptr,
            code_ptr,
            codes if LUT else 0,
            offs_n,
            n_base,
            k0,
            N,
            K,
            dt,
            BLOCK_K,
            BLOCKSIZE,
            NESTED_BLOCKSIZE,
            NESTED,
            ALIGNED,
            LUT,
            ASM,
        )
        acc = _mma(x, tl.trans(w), acc, UPCAST, IEEE)
        if HAS_LORA:
            at = tl.load(
                a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                mask=k_ok[:, None] & r_ok[None, :],
                other=0.0,
            )
            xa = _mma(x, at.to(dt), xa, UPCAST, IEEE)

    return acc, xa


@triton.jit
def qlora_fwd_kernel(
    x_ptr,
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset_ptr,
    code_ptr,
    a_ptr,
    b_ptr,
    bias_ptr,
    rank_scale_ptr,
    out_scale_ptr,
    y_ptr,
    xa_ptr,
    M,
    N,
    K,
    R,
    M_BUCKET,
    scaling,
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    pre_ptr,
    BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    ALIGNED: tl.constexpr,
    LUT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RANK_SCALE: tl.constexpr,
    HAS_OUT_SCALE: tl.constexpr,
    HAS_LORA: tl.constexpr,
    WRITE_XA: tl.constexpr,
    PRE_LORA: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    ASM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of y; loops over K in BLOCK_K steps.

    Per step: x tile [BM, BK] (read once, used twice), W tile [BN, BK] dequantized in
    registers (used transposed), A^T tile [BK, BR]; acc += x @ W^T, xa += x @ A^T.
    Epilogue: acc += (s * xa * rank_scale) @ B^T, + bias, * out_scale. HAS_LORA=False (no
    adapter) compiles the A/B loads and both LoRA dots out. PRE_LORA (large M, the
    launcher's ``use_pre_lora``): xa is not accumulated in the loop (no A tiles, no x @ A^T
    dot) but loaded from pre_ptr, the fp32 [M, R] (contiguous) x @ A^T that
    ``qlora_lora_down_kernel`` computed before; the epilogue, and the xa store (WRITE_XA:
    the loaded product rounded to x's dtype), are unchanged. Grouped program
    order (GROUP_M M-tiles walk each N-column of W together) keeps W tiles in L2 at large M.
    """
    dt = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_base = pid_n * BLOCK_N
    offs_n = n_base + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    n_ok = offs_n < N
    r_ok = offs_r < R

    acc, xa = _fwd_loop(
        x_ptr,
        packed_ptr,
        absmax_ptr,
        nested_absmax_ptr,
        nested_code_ptr,
        offset_ptr,
        code_ptr,
        a_ptr,
        offs_m,
        offs_n,
        n_base,
        0,
        K,
        M,
        N,
        K,
        R,
        stride_xm,
        stride_xk,
        stride_ar,
        stride_ak,
        BLOCKSIZE,
        NESTED_BLOCKSIZE,
        NESTED,
        ALIGNED,
        LUT,
        HAS_LORA and not PRE_LORA,
        UPCAST,
        IEEE,
        ASM,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        BLOCK_R,
    )

    if HAS_LORA:
        if PRE_LORA:
            xa = tl.load(
                pre_ptr + offs_m[:, None] * R + offs_r[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0
            )
        t = xa * scaling
        if HAS_RANK_SCALE:
            t = t * tl.load(rank_scale_ptr + offs_r, mask=r_ok, other=0.0).to(tl.float32)[None, :]
        bt = tl.load(
            b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
            mask=r_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        acc = _mma(t.to(dt), bt.to(dt), acc, UPCAST, IEEE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_OUT_SCALE:
        acc *= tl.load(out_scale_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )
    if WRITE_XA:
        if pid_n == 0:  # xa: contiguous [M, R]
            tl.store(
                xa_ptr + offs_m[:, None] * R + offs_r[None, :],
                xa.to(xa_ptr.dtype.element_ty),
                mask=m_ok[:, None] & r_ok[None, :],
            )


@triton.jit
def _dx_loop(
    dy_ptr,
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset_ptr,
    code_ptr,
    b_ptr,
    offs_m,
    k0,
    n_lo,
    n_hi,
    M,
    N,
    K,
    R,
    stride_dym,
    stride_dyn,
    stride_bn,
    stride_br,
    BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    ALIGNED: tl.constexpr,
    LUT: tl.constexpr,
    HAS_LORA: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    ASM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """The dx kernel's N loop over [n_lo, n_hi) (n_lo a multiple of BLOCK_N): fp32
    (dy @ W, dy @ B) for rows offs_m and columns k0 .. k0 + BLOCK_K."""
    dt = dy_ptr.dtype.element_ty
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    r_ok = offs_r < R
    if LUT:
        codes = _load_codes(code_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n_base in range(n_lo, n_hi, BLOCK_N):
        offs_n = n_base + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        dy = tl.load(
            dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
            mask=m_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        w = _dequant_tile(
            packed_ptr,
            absmax_ptr,
            nested_absmax_ptr,
            nested_code_ptr,
            offset_ptr,
            code_ptr,
            codes if LUT else 0,
            offs_n,
            n_base,
            k0,
            N,
            K,
            dt,
            BLOCK_K,
            BLOCKSIZE,
            NESTED_BLOCKSIZE,
            NESTED,
            ALIGNED,
            LUT,
            ASM,
        )
        acc = _mma(dy, w, acc, UPCAST, IEEE)
        if HAS_LORA:
            b = tl.load(
                b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                mask=n_ok[:, None] & r_ok[None, :],
                other=0.0,
            )
            g = _mma(dy, b.to(dt), g, UPCAST, IEEE)

    return acc, g


@triton.jit
def qlora_dx_kernel(
    dy_ptr,
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset_ptr,
    code_ptr,
    a_ptr,
    b_ptr,
    rank_scale_ptr,
    dx_ptr,
    g_ptr,
    M,
    N,
    K,
    R,
    M_BUCKET,
    scaling,
    stride_dym,
    stride_dyn,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    stride_dxm,
    stride_dxk,
    pre_ptr,
    BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    ALIGNED: tl.constexpr,
    LUT: tl.constexpr,
    HAS_RANK_SCALE: tl.constexpr,
    HAS_LORA: tl.constexpr,
    WRITE_G: tl.constexpr,
    PRE_LORA: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    ASM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_K] tile of dx; loops over N in BLOCK_N steps (dy already scaled by out_scale).

    Per step: dy tile [BM, BN] (read once, used twice), W tile [BN, BK] dequantized in
    registers, B tile [BN, BR]; acc += dy @ W, g += dy @ B. Epilogue: acc += (s * g *
    rank_scale) @ A. g = dy @ B is written in fp32 by the pid_k == 0 programs when dA is
    needed. PRE_LORA (large M): g is not accumulated in the loop but loaded from pre_ptr,
    the fp32 [M, R] dy @ B of ``qlora_lora_down_kernel`` (which is then the g the
    launcher returns; WRITE_G is off).
    """
    dt = dy_ptr.dtype.element_ty
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_k = tl.cdiv(K, BLOCK_K)
    per_group = GROUP_M * num_k
    first_m = (pid // per_group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_k = (pid % per_group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    k_ok = offs_k < K
    r_ok = offs_r < R

    acc, g = _dx_loop(
        dy_ptr,
        packed_ptr,
        absmax_ptr,
        nested_absmax_ptr,
        nested_code_ptr,
        offset_ptr,
        code_ptr,
        b_ptr,
        offs_m,
        k0,
        0,
        N,
        M,
        N,
        K,
        R,
        stride_dym,
        stride_dyn,
        stride_bn,
        stride_br,
        BLOCKSIZE,
        NESTED_BLOCKSIZE,
        NESTED,
        ALIGNED,
        LUT,
        HAS_LORA and not PRE_LORA,
        UPCAST,
        IEEE,
        ASM,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        BLOCK_R,
    )

    if HAS_LORA:
        if PRE_LORA:
            g = tl.load(
                pre_ptr + offs_m[:, None] * R + offs_r[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0
            )
        t = g * scaling
        if HAS_RANK_SCALE:
            t = t * tl.load(rank_scale_ptr + offs_r, mask=r_ok, other=0.0).to(tl.float32)[None, :]
        a = tl.load(
            a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
            mask=r_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        acc = _mma(t.to(dt), a.to(dt), acc, UPCAST, IEEE)
    tl.store(
        dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
        acc.to(dx_ptr.dtype.element_ty),
        mask=m_ok[:, None] & k_ok[None, :],
    )
    if WRITE_G:
        if pid_k == 0:  # g: contiguous fp32 [M, R]
            tl.store(g_ptr + offs_m[:, None] * R + offs_r[None, :], g, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def qlora_lora_down_kernel(
    a_ptr,
    l_ptr,
    out_ptr,
    M,
    C,
    R,
    stride_am,
    stride_ac,
    stride_lc,
    stride_lr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """One [BLOCK_M, R] row block of out = a @ L in fp32 (out: contiguous [M, R]), a [M, C]
    the activations (x, or dy' for dx), L [C, R] (A^T, or B) cast to a's dtype: the LoRA
    down-projection of the PRE_LORA launches (large M). The same products as the fused
    loop's (a's dtype operands, exact in fp32) accumulated in fp32 over C in BLOCK_C steps;
    only the order of the fp32 sums differs (a BLOCK_C-wide tl.dot per step, not the main
    kernel's BLOCK_K / BLOCK_N), inside the oracle's fp32 accumulation bound."""
    dt = a_ptr.dtype.element_ty
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    r_ok = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_am + offs_c[None, :] * stride_ac,
            mask=m_ok[:, None] & c_ok[None, :],
            other=0.0,
        )
        lt = tl.load(
            l_ptr + offs_c[:, None] * stride_lc + offs_r[None, :] * stride_lr,
            mask=c_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        acc = _mma(a, lt.to(dt), acc, UPCAST, IEEE)
    tl.store(out_ptr + offs_m[:, None] * R + offs_r[None, :], acc, mask=m_ok[:, None] & r_ok[None, :])


# ---------------------------------------------------------------------------------------
# Split schedule for small M (docs/design.md, "Triton configs"): at M <= 64 the output has
# few tiles (M = 32, N = 4096, BLOCK_N = 64: 64 programs on 132 SMs), so the loop range
# (K for the forward, N for dx) is cut into SPLITS contiguous runs of whole loop tiles.
# Program (tile, s) runs the unchanged loop over run s and stores its fp32 tile to a
# [SPLITS, M, C] workspace (the LoRA down-projection's fp32 partial [SPLITS, M, R] too,
# from the column-0 programs); a second kernel sums the partials in split order 0, 1, ...
# (fixed: results are the same run to run, no atomics) and runs the epilogue once: the
# LoRA up-projection on the summed down-projection, bias, out_scale, the xa / g output.
# ---------------------------------------------------------------------------------------


@triton.jit
def qlora_fwd_split_kernel(
    x_ptr,
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset_ptr,
    code_ptr,
    a_ptr,
    part_ptr,
    lpart_ptr,
    M,
    N,
    K,
    R,
    TILES_PER_SPLIT,
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    ALIGNED: tl.constexpr,
    LUT: tl.constexpr,
    HAS_LORA: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    ASM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Partial [BLOCK_M, BLOCK_N] tile of x @ W^T (and x @ A^T) over K tiles
    [s * TILES_PER_SPLIT, (s + 1) * TILES_PER_SPLIT), s = program_id(1); M-tiles vary
    fastest along program_id(0), so the programs sharing a W tile run together."""
    pid = tl.program_id(0)
    s = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m
    pid_n = pid // num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_base = pid_n * BLOCK_N
    offs_n = n_base + tl.arange(0, BLOCK_N)
    k_lo = s * TILES_PER_SPLIT * BLOCK_K
    k_hi = min(k_lo + TILES_PER_SPLIT * BLOCK_K, K)
    acc, xa = _fwd_loop(
        x_ptr,
        packed_ptr,
        absmax_ptr,
        nested_absmax_ptr,
        nested_code_ptr,
        offset_ptr,
        code_ptr,
        a_ptr,
        offs_m,
        offs_n,
        n_base,
        k_lo,
        k_hi,
        M,
        N,
        K,
        R,
        stride_xm,
        stride_xk,
        stride_ar,
        stride_ak,
        BLOCKSIZE,
        NESTED_BLOCKSIZE,
        NESTED,
        ALIGNED,
        LUT,
        HAS_LORA,
        UPCAST,
        IEEE,
        ASM,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        BLOCK_R,
    )
    _store_partials(part_ptr, lpart_ptr, acc, xa, s, offs_m, offs_n, pid_n, M, N, R, HAS_LORA)


@triton.jit
def qlora_dx_split_kernel(
    dy_ptr,
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset_ptr,
    code_ptr,
    b_ptr,
    part_ptr,
    lpart_ptr,
    M,
    N,
    K,
    R,
    TILES_PER_SPLIT,
    stride_dym,
    stride_dyn,
    stride_bn,
    stride_br,
    BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    ALIGNED: tl.constexpr,
    LUT: tl.constexpr,
    HAS_LORA: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    ASM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Partial [BLOCK_M, BLOCK_K] tile of dy @ W (and dy @ B) over N tiles
    [s * TILES_PER_SPLIT, (s + 1) * TILES_PER_SPLIT), s = program_id(1)."""
    pid = tl.program_id(0)
    s = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m
    pid_k = pid // num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    n_lo = s * TILES_PER_SPLIT * BLOCK_N
    n_hi = min(n_lo + TILES_PER_SPLIT * BLOCK_N, N)
    acc, g = _dx_loop(
        dy_ptr,
        packed_ptr,
        absmax_ptr,
        nested_absmax_ptr,
        nested_code_ptr,
        offset_ptr,
        code_ptr,
        b_ptr,
        offs_m,
        k0,
        n_lo,
        n_hi,
        M,
        N,
        K,
        R,
        stride_dym,
        stride_dyn,
        stride_bn,
        stride_br,
        BLOCKSIZE,
        NESTED_BLOCKSIZE,
        NESTED,
        ALIGNED,
        LUT,
        HAS_LORA,
        UPCAST,
        IEEE,
        ASM,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        BLOCK_R,
    )
    _store_partials(
        part_ptr, lpart_ptr, acc, g, s, offs_m, k0 + tl.arange(0, BLOCK_K), pid_k, M, K, R, HAS_LORA
    )


@triton.jit
def _store_partials(
    part_ptr, lpart_ptr, acc, lacc, s, offs_m, offs_c, pid_c, M, C, R, HAS_LORA: tl.constexpr
):
    """acc -> part[s, offs_m, offs_c] ([SPLITS, M, C] fp32 contiguous); the column-0
    programs also store lacc -> lpart[s, offs_m, :R] ([SPLITS, M, R])."""
    m_ok = offs_m < M
    row = s.to(tl.int64) * M + offs_m
    tl.store(part_ptr + row[:, None] * C + offs_c[None, :], acc, mask=m_ok[:, None] & (offs_c < C)[None, :])
    if HAS_LORA:
        if pid_c == 0:
            offs_r = tl.arange(0, lacc.shape[1])
            tl.store(
                lpart_ptr + row[:, None] * R + offs_r[None, :],
                lacc,
                mask=m_ok[:, None] & (offs_r < R)[None, :],
            )


@triton.jit
def qlora_split_reduce_kernel(
    part_ptr,
    lpart_ptr,
    l_ptr,
    bias_ptr,
    rank_scale_ptr,
    out_scale_ptr,
    out_ptr,
    side_ptr,
    M,
    C,
    R,
    SPLITS,
    scaling,
    stride_lr,
    stride_lc,
    stride_om,
    stride_oc,
    HAS_BIAS: tl.constexpr,
    HAS_RANK_SCALE: tl.constexpr,
    HAS_OUT_SCALE: tl.constexpr,
    HAS_LORA: tl.constexpr,
    WRITE_SIDE: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_C] output tile: acc = sum_s part[s] and, with LoRA, la = sum_s
    lpart[s], both in split order; then the epilogue of the unsplit kernels, the same
    operations in the same order: acc += dt(s * la * rank_scale) @ dt(L) with L = B^T
    (forward) or A (dx), + bias, * out_scale, out = acc in out's dtype, and the column-0
    programs store la (xa in x's dtype, or g in fp32) to side [M, R]. dt: out's dtype."""
    dt = out_ptr.dtype.element_ty
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m
    pid_c = pid // num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    c_ok = offs_c < C
    r_ok = offs_r < R
    # split 0 starts the sums (not 0.0 + part[0]: a -0.0 partial stays -0.0, so one split
    # is the unsplit kernel bit for bit)
    row = offs_m.to(tl.int64)
    acc = tl.load(
        part_ptr + row[:, None] * C + offs_c[None, :], mask=m_ok[:, None] & c_ok[None, :], other=0.0
    )
    if HAS_LORA:
        lmask = m_ok[:, None] & r_ok[None, :]
        la = tl.load(lpart_ptr + row[:, None] * R + offs_r[None, :], mask=lmask, other=0.0)
    for s in range(1, SPLITS):
        row = s * M + offs_m.to(tl.int64)
        acc += tl.load(
            part_ptr + row[:, None] * C + offs_c[None, :], mask=m_ok[:, None] & c_ok[None, :], other=0.0
        )
        if HAS_LORA:
            la += tl.load(lpart_ptr + row[:, None] * R + offs_r[None, :], mask=lmask, other=0.0)
    if HAS_LORA:
        t = la * scaling
        if HAS_RANK_SCALE:
            t = t * tl.load(rank_scale_ptr + offs_r, mask=r_ok, other=0.0).to(tl.float32)[None, :]
        lt = tl.load(
            l_ptr + offs_r[:, None] * stride_lr + offs_c[None, :] * stride_lc,
            mask=r_ok[:, None] & c_ok[None, :],
            other=0.0,
        )
        acc = _mma(t.to(dt), lt.to(dt), acc, UPCAST, IEEE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_OUT_SCALE:
        acc *= tl.load(out_scale_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_c[None, :] * stride_oc,
        acc.to(dt),
        mask=m_ok[:, None] & c_ok[None, :],
    )
    if WRITE_SIDE:
        if pid_c == 0:  # xa / g: contiguous [M, R]
            tl.store(
                side_ptr + offs_m[:, None] * R + offs_r[None, :],
                la.to(side_ptr.dtype.element_ty),
                mask=m_ok[:, None] & r_ok[None, :],
            )


# ---------------------------------------------------------------------------------------
# Tile configurations
# ---------------------------------------------------------------------------------------
# Why these tiles (AOT build for bf16 + nested NF4 at the bucket's largest r, sm_80 /
# sm_90, all with 0 spills; registers, spills, W load width and SASS instructions per W
# element of every config in benchmarks/results/sass_report.md):
# - The register decode (_dequant_lut) builds one 16-entry table per quant block and row
#   a thread touches (32 instructions) and spends 21 per 32-bit word of 8 codes, so a tile
#   should give each thread several words of one block: 4 contiguous words (16 bytes, one
#   vector load) per thread needs BLOCK_N x BLOCK_K >= 32 x threads.
# - Large M (training), forward 128x128x32, 8 warps: the usual tensor-core tile (2 words
#   per thread, 8-byte loads); on sm_80's mma.sync path larger K tiles (128x128x64) cost
#   more or spill. sm_90 runs 128x128x64 (4 words per thread; _ARCH_DEFAULTS below).
#   r > 64 adds a BM x BLOCK_R fp32 LoRA accumulator (up to 256 columns), so BM halves:
#   64x64x32 (64x64x64, 4 words per thread, needs 24 B of stack on sm_80; sm_90: 64x128x64).
# - Small M (decode, M <= 16), forward 16x64x128, 4 warps: GEMV-shaped. BM = 16 is the
#   tl.dot minimum, so each W element is decoded exactly once; N / 64 = 64 programs at
#   N = 4096 (fewer than an H100's 132 SMs: the launchers then run these tiles in the
#   split schedule, _FWD_SPLIT_CONFIGS, with a deterministic reduction); 64 x 128 codes =
#   4 KiB of packed W per step, 32 bytes (two 16-byte loads, 64 codes of one row: one
#   block table per 64 codes at blocksize 64) per thread: 7.5 SASS instructions per
#   element on sm_90 against 10.6 for 16x32x128 (2 KiB, 16 bytes per thread). r > 64:
#   16x128x32 (the [BK, 256] A tile is the bulk of the step, so BK stays 32 and BN takes
#   the 16 bytes per thread: 11.75 instructions per element on sm_90 against 29.75 for
#   16x32x32; 16x32x128 and 16x64x64 spill on sm_90; N / 128 programs, so the split
#   schedule, whose BM = 16 tile at r > 64 is the same, runs at any N below 128 x SMs).
#   No warp repeats another's MMAs (mma_macs_ratio 1 in benchmarks/results/sass_report.md):
#   BLOCK_R >= 32 at small M (block_r), and every small-M tile has BLOCK_N (dx: BLOCK_K)
#   >= 8 x num_warps, so the warps split the n8 MMA columns instead of sharing the 16 rows.
# - dx mirrors this with the output tile [BM, BLOCK_K] and the loop over N (BLOCK_N):
#   128x32x128 at large M (no spills at r = 16; at r = 64 on sm_80 it needs 88 B of stack
#   with the register decode's 16 code registers: benchmarks/roofline_qlora.md), 64x32x128
#   at r > 64 (sm_90: _ARCH_DEFAULTS); at small M the output tile is BLOCK_K = 64 (K / 64
#   programs, the split schedule fills the GPU) and the loop tile BLOCK_N = 128: 32 bytes
#   of W per thread per step, 8.7 instructions per element against 13.4 for 16x128x32
#   (r > 64: 16x32x128, the [BN, 256] B tile kept at BN = 32: 10.3 against 21.4 for 16x64x32).
# Pointers, N, K and strides divisible by 16 matter: without those hints (the JIT adds
# them at run time) the same tiles spill; see AOT_CONFIGS' "attrs". The per-element
# path for K % blocksize != 0 (no LLM shape) is not tuned.


def _cfg(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m}, num_warps=warps, num_stages=stages
    )


# (regime, r bucket) -> configs, default first; "small" is M <= 16, r bucket "lo" is
# BLOCK_R <= 64. Registers/spills of every config below, compiled ahead of time with
# run-time-like divisibility hints for bf16, nested NF4, at the bucket's largest BLOCK_R
# (64 / 256) for sm_80 / sm_90 (ptxas of triton 3.9), are in benchmarks/roofline_qlora.md.
_FWD_CONFIGS = {
    ("small", "lo"): [
        _cfg(16, 64, 128, 4, 3),
        _cfg(16, 32, 128, 4, 3),
        _cfg(16, 32, 128, 4, 4),
        _cfg(16, 64, 64, 4, 3),
    ],
    ("small", "hi"): [
        _cfg(16, 128, 32, 4, 3),
        _cfg(16, 32, 32, 4, 3),
        _cfg(16, 64, 64, 4, 3),
        _cfg(16, 64, 64, 8, 3),
    ],
    ("large", "lo"): [
        _cfg(128, 128, 32, 8, 3),
        _cfg(128, 128, 64, 8, 3),  # sm_90's default (_ARCH_DEFAULTS)
        _cfg(128, 128, 32, 8, 4),
        _cfg(64, 128, 32, 8, 3),
    ],
    ("large", "hi"): [
        _cfg(64, 64, 32, 8, 3),
        _cfg(64, 128, 64, 8, 3),  # sm_90's default
        _cfg(64, 64, 64, 8, 3),
        _cfg(32, 128, 32, 8, 3),
    ],
}
# In the dx kernel BLOCK_N is the loop dimension and BLOCK_K the output tile.
_DX_CONFIGS = {
    ("small", "lo"): [_cfg(16, 128, 64, 4, 3), _cfg(16, 128, 32, 4, 3), _cfg(16, 64, 32, 4, 3)],
    ("small", "hi"): [
        _cfg(16, 32, 128, 4, 3),
        _cfg(16, 64, 32, 4, 3),
        _cfg(16, 64, 64, 4, 3),
        _cfg(16, 32, 64, 8, 3),
    ],
    ("large", "lo"): [
        _cfg(128, 32, 128, 8, 3),
        _cfg(128, 64, 128, 8, 3),  # sm_90's default
        _cfg(128, 32, 128, 8, 4),
        _cfg(64, 64, 128, 8, 3),
    ],
    ("large", "hi"): [
        _cfg(64, 32, 128, 8, 3),
        _cfg(64, 64, 128, 8, 3),
        _cfg(64, 64, 64, 8, 3),
    ],  # 2nd: sm_90's
}
# Per-arch defaults (compute capability major -> {(kernel, regime): index into the table};
# absent: the table's first). These give each thread 16 bytes of packed W per loop step
# (BLOCK_N x BLOCK_K >= 32 x threads): one 16-byte load, 4 words of one row, so each block
# table the register decode builds serves 32 codes instead of 8 or 16. SASS per decoded
# element, NF4+DQ, bf16 (benchmarks/results/sass_report.md), all 0 spills:
# - 9 (Hopper: Triton lowers tl.dot to wgmma, operands from shared memory), large M:
#   forward 14.25 -> 9.06 (r <= 64), 26.12 -> 10.5 (r > 64); dx 13.94 -> 9.28, 15.19 ->
#   10.41. On sm_80's mma.sync path the same tiles cost more (forward 128x128x64: 18.0 ->
#   22.4, ptxas copies the accumulators around each HMMA: 256 IMAD.MOV per step) or spill.
# Any other capability runs the tables' first configs.
_ARCH_DEFAULTS = {
    9: {
        ("fwd", ("large", "lo")): 1,
        ("fwd", ("large", "hi")): 1,
        ("dx", ("large", "lo")): 1,
        ("dx", ("large", "hi")): 1,
    },
}
_PER_ARCH = {key for table in _ARCH_DEFAULTS.values() for key in table}  # (kernel, regime) with arch tiles
# Under the interpreter: one small config that still exercises every mask edge.
_INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "GROUP_M": 2}
# ... and for a weight in the fragment layout read in place (whole 128-code chunks per tile)
_INTERPRET_FRAG_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 128, "GROUP_M": 2}

# Split schedule (M <= SPLIT_M; qlora_*_split_kernel + qlora_split_reduce_kernel): (BLOCK_M,
# r bucket) -> configs, default first. BLOCK_M = 16 at M <= 16 (the small tiles above),
# 32 at M = 17..64: W is decoded once per 32 rows (at most twice for M <= 64), not once per
# 128 padded rows' worth of MMAs. The BM = 32 tiles are wide (BLOCK_N, dx: BLOCK_K, = 64 >
# BM) and their LoRA tile is too (block_r: BLOCK_R >= 64), so Triton lays the chained dots
# out with the warps along N (no warp repeats another's MMAs; mma_macs_ratio in
# benchmarks/results/sass_report.md). All compile spill-free for sm_80/sm_90 (the report);
# dx at BM = 32 with a [128, 64] W step (32x128x64) or 4 warps at r > 64 spilled; at r > 64
# dx takes a [64, 128] W step over 8 warps (16 bytes per thread: 13.8 instructions per
# element on sm_90 against 21.4 for 32x64x64), the forward keeps 32x64x32 (its 16-byte
# candidates spill on sm_90: docs/design.md, "Triton configs").
SPLIT_M = 64
_FWD_SPLIT_CONFIGS = {
    (16, "lo"): [_cfg(16, 64, 128, 4, 3)],
    (16, "hi"): [_cfg(16, 128, 32, 4, 3)],
    (32, "lo"): [_cfg(32, 64, 128, 4, 3)],
    (32, "hi"): [_cfg(32, 64, 32, 4, 3)],
}
_DX_SPLIT_CONFIGS = {
    (16, "lo"): [_cfg(16, 128, 64, 4, 3)],
    (16, "hi"): [_cfg(16, 32, 128, 4, 3)],
    (32, "lo"): [_cfg(32, 64, 64, 4, 3)],
    (32, "hi"): [_cfg(32, 64, 128, 8, 3)],
}
# Precomputed LoRA down-projection at large M (PRE_LORA; docs/design.md, "Triton configs:
# the precomputed down-projection"). The fused loop accumulates x @ A^T (dx: dy' @ B) from
# the activation tiles it already holds, so every program along N (dx: K) recomputes it for
# its rows: r / BLOCK_N extra MMA work (dx: r / BLOCK_K, its output tile), 16 / 128 = 12.5%
# at r = 16 for the large-M tiles of both (forward 128x128xBK, dx 128xBNx128), plus the A
# (B) tile loads in every step. At M >= PRE_LORA_M the launcher instead runs qlora_lora_down_kernel
# first (one skinny GEMM: [M, K] x [K, r] in fp32) and the main kernel with PRE_LORA, whose
# loop is the base GEMM alone and whose epilogue reads the fp32 [M, r] product. That costs
# one more read of the activations (M x K x 2 bytes; dx: M x N x 2), 2 x M x r x 4 bytes of
# fp32 product, and one more launch. Per row, at K = N = 4096, r = 16, on an H100 (3.35 TB/s,
# 989 TFLOP/s bf16): the forward saves 2 x K x r x N / BLOCK_N = 4.2 MFLOP = 4.2 ns of MMA
# time (dx alike, N and K swapped) for 8 KiB = 2.5 ns of HBM time, 1.8 ns net; a launch and
# the small kernel's tail cost a few us (benchmarks/roofline_qlora.py assumes 2 us), so both
# gain from about M = 1100: the roofline estimate has the fused recompute ahead at M = 1024
# (39.2 against 40.9 us) and the precompute ahead at 2048 (76.8 against 78.4 us) and 4096
# (151.6 against 156.9 us, 0.92x of a cuBLAS bf16 GEMM against 0.89x; benchmarks/
# roofline_qlora.md). So PRE_LORA_M = 2048. Where the split schedule runs (M <= SPLIT_M, the kernel bound
# by W's bytes or instruction issue, not MMA) or M < PRE_LORA_M, the fused recompute stays:
# there its MMA work is hidden and re-reading x would add bytes to a memory-bound kernel.
# Only on PRE_LORA_ARCHS (compute capability majors): on sm_90 the PRE_LORA loop is also
# shorter (SASS per W element, benchmarks/results/sass_report.md: forward 9.06 -> 7.78, dx
# 9.28 -> 8.16), but on sm_80's mma.sync path ptxas schedules it longer (forward 18.0 ->
# 20.75, dx 15.62 -> 20.94), and an A100 running these tiles is issue-bound, not MMA-bound
# (18 instructions per element per 128-row tile at 19.5 T lane-instructions/s against 256
# FLOP at 312 TFLOP/s), so the saved MMA work would not shorten it. Other archs (no SASS
# evidence): the fused recompute. The interpreter (arch 0) never takes it unless a test
# says it runs as an sm_90.
PRE_LORA_M = 2048
PRE_LORA_ARCHS = (9,)
# qlora_lora_down_kernel tiles (BLOCK_M, BLOCK_C, warps, stages) by r bucket: a memory-bound
# skinny GEMM, so BLOCK_M = 32 (M / 32 programs: 128 at M = 4096 for 132 SMs), 16-byte
# activation loads, and the [BLOCK_C, BLOCK_R] L tile kept within 32 KiB per stage.
_DOWN_CONFIGS = {"lo": (32, 128, 4, 3), "hi": (32, 64, 4, 3)}
_INTERPRET_DOWN_CONFIG = (16, 64, 4, 1)
MIN_SPLIT_TILES = 4  # loop tiles per split at least (each split amortizes its prologue/epilogue)
INTERPRET_SMS = 132  # nominal SM count (H100/H200 SXM) for the heuristic under the interpreter


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


SMALL_M = 16  # M <= SMALL_M is the "small" regime (decode)


def block_r(r: int, m: int) -> int:
    """BLOCK_R, the LoRA tile width, for rank r at M rows: r rounded up to a power of two,
    at least 16 (the tl.dot minimum); at small M at least 32. Why 32: with BLOCK_M = 16 a
    [16, 16] LoRA accumulator is square, and for a kernel with chained dots Triton lays out
    a square (or tall) dot over all warps along M ([num_warps, 1]), so with BM = 16 every
    warp repeated the same MMAs, the main dot's too (the SASS report's mma_macs_ratio was 4
    at r <= 16). [16, 32] puts the warps along r and N, each MMA issued once; the columns
    r..31 are masked to zero (docs/design.md, "Triton configs"). r = 0 (no adapter): 16,
    unused."""
    br = max(16, triton.next_power_of_2(r))
    return max(32, br) if 0 < r and m <= SMALL_M else br


def block_r_split(r: int, bm: int) -> int:
    """BLOCK_R of the split kernels at tile height ``bm``: wider than ``bm`` (32 at bm = 16,
    64 at bm = 32) so the chained dots put the warps along N (see block_r), r = 0: 16."""
    br = max(16, triton.next_power_of_2(r))
    return max(2 * bm, br) if r > 0 else br


def split_count(out_tiles: int, loop_tiles: int, sms: int) -> int:
    """Splits of the loop range for a grid of ``out_tiles`` output tiles: 1 when they fill the
    ``sms`` SMs; else enough for >= 2 x sms programs, at most loop_tiles / MIN_SPLIT_TILES
    splits, rounded so that no split is empty (docs/design.md, "Triton configs")."""
    if out_tiles >= sms:
        return 1
    want = min(triton.cdiv(2 * sms, out_tiles), max(1, loop_tiles // MIN_SPLIT_TILES))
    return triton.cdiv(loop_tiles, triton.cdiv(loop_tiles, want))


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda" or interpreting():  # the interpreter (also behind a mocked CUDA device)
        return INTERPRET_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_config(kernel_name: str, m: int, r: int) -> tuple[dict, int, int, int]:
    """(tile kwargs, num_warps, num_stages, BLOCK_R) of the split kernels at M = m <= SPLIT_M."""
    if interpreting():
        return _INTERPRET_CONFIG, 4, 1, block_r(r, m)
    bm = 16 if m <= SMALL_M else 32
    br = block_r_split(r, bm)
    table = _FWD_SPLIT_CONFIGS if kernel_name == "fwd" else _DX_SPLIT_CONFIGS
    cfg = table[(bm, "lo" if br <= 64 else "hi")][0]
    return cfg.kwargs, cfg.num_warps, cfg.num_stages, br


def _split_plan(kernel_name: str, m: int, c: int, loop: int, r: int, device, split):
    """None (the unsplit kernel) or (cfg, warps, stages, BLOCK_R, splits, tiles per split).
    c: output columns (N, dx: K), loop: the reduced extent (K, dx: N). split: None picks
    (``split_count``; M > SPLIT_M or 1 split: unsplit), 0 forces the unsplit kernel, s >= 1
    forces the split kernels with s splits (fewer if some would be empty)."""
    if split == 0 or (split is None and m > SPLIT_M):
        return None
    cfg, warps, stages, br = split_config(kernel_name, m, r)
    bc, bl = (cfg["BLOCK_N"], cfg["BLOCK_K"]) if kernel_name == "fwd" else (cfg["BLOCK_K"], cfg["BLOCK_N"])
    loop_tiles = triton.cdiv(loop, bl)
    if split is None:
        split = split_count(
            triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(c, bc), loop_tiles, _sm_count(device)
        )
        if split == 1:
            return None
    tps = triton.cdiv(loop_tiles, max(1, min(split, loop_tiles)))
    return cfg, warps, stages, br, triton.cdiv(loop_tiles, tps), tps


def _run_split(kernel_name, plan, m, c, r, device, split_args, reduce_args, reduce_kwargs, flags, kwargs):
    """Partials into fp32 workspaces, then the fixed-order reduction + epilogue."""
    cfg, warps, stages, br, splits, tps = plan
    part = torch.empty((splits, m, c), device=device, dtype=torch.float32)
    lpart = torch.empty((splits, m, r) if kwargs["HAS_LORA"] else (1,), device=device, dtype=torch.float32)
    bc = cfg["BLOCK_N"] if kernel_name == "fwd" else cfg["BLOCK_K"]
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(c, bc), splits)
    kernel = qlora_fwd_split_kernel if kernel_name == "fwd" else qlora_dx_split_kernel
    tiles = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
    head, tail = split_args
    kernel[grid](
        *head,
        part,
        lpart,
        *tail[:4],
        tps,
        *tail[4:],
        **kwargs,
        **flags,
        **tiles,
        BLOCK_R=br,
        num_warps=warps,
        num_stages=stages,
    )
    rgrid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(c, bc),)
    qlora_split_reduce_kernel[rgrid](
        part,
        lpart,
        *reduce_args[:6],
        m,
        c,
        r,
        splits,
        *reduce_args[6:],
        **reduce_kwargs,
        UPCAST=flags["UPCAST"],
        IEEE=flags["IEEE"],
        HAS_LORA=kwargs["HAS_LORA"],
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_C=bc,
        BLOCK_R=br,
        num_warps=4,
    )


def _regime(m: int, br: int) -> tuple[str, str]:
    return ("small" if m <= SMALL_M else "large", "lo" if br <= 64 else "hi")


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 8192)


def _tables(kernel_name: str):
    return {"fwd": (qlora_fwd_kernel, _FWD_CONFIGS), "dx": (qlora_dx_kernel, _DX_CONFIGS)}[kernel_name]


def autotune_enabled() -> bool:
    """QPEFT_TRITON_AUTOTUNE=1 opts in to autotuning (docs/design.md, "Triton configs")."""
    return os.environ.get("QPEFT_TRITON_AUTOTUNE") == "1"


@functools.cache
def default_config(kernel_name: str, regime: tuple[str, str], arch: int = 0) -> triton.Config:
    """The config a launch of ``kernel_name`` runs in ``regime`` on a GPU of compute
    capability ``arch`` (major * 10 + minor) when not autotuning: the table's first, or on
    ``_ARCH_DEFAULTS`` entry of its major version where there is one; AOT_CONFIGS compiles
    each for its arch and the report shows them spill-free (tests/test_triton_configs.py).
    Chosen once per (kernel, regime, arch) from the shape at call time: no benchmark runs,
    so the first call of a shape costs one compile, not one per candidate config (4 for
    the forward at small M) plus their timed runs."""
    table = _tables(kernel_name)[1][regime]
    index = _ARCH_DEFAULTS.get(arch // 10, {}).get((kernel_name, regime), 0)
    return table[index]


@functools.cache
def _arch(device: torch.device) -> int:
    """Compute capability major * 10 + minor of a CUDA device; 0 elsewhere (the tables'
    first configs: the interpreter, and the tests' recording launchers on CPU tensors)."""
    if device.type != "cuda" or interpreting():
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


@functools.cache
def _tuned(kernel_name: str, regime: tuple[str, str]):
    kernel, table = _tables(kernel_name)
    return triton.autotune(configs=table[regime], key=["M_BUCKET", "N", "K"])(kernel)


def _launch(kernel_name: str, kernel, m: int, n_out, br: int, args: tuple, kwargs: dict) -> None:
    """Launch over ceil(m / BLOCK_M) * n_out(meta) programs (n_out: tiles along N or K)."""
    if interpreting():
        cfg = _INTERPRET_FRAG_CONFIG if kwargs["LUT"] == 2 else _INTERPRET_CONFIG
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * n_out(cfg),)
        kernel[grid](*args, **kwargs, **cfg)
        return
    regime = _regime(m, br)
    if autotune_enabled():
        tuned = _tuned(kernel_name, regime)
        tuned[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * n_out(meta),)](*args, **kwargs)
        return
    cfg = default_config(kernel_name, regime, _arch(args[0].device))
    grid = (triton.cdiv(m, cfg.kwargs["BLOCK_M"]) * n_out(cfg.kwargs),)
    kernel[grid](*args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------


def use_pre_lora(m: int, has_lora: bool, plan, arch: int) -> bool:
    """The large-M rule (PRE_LORA_M above): the LoRA down-projection is precomputed by
    ``lora_down`` instead of recomputed in every program, for launches with an adapter that
    run the unsplit kernel (``plan`` None) at M >= PRE_LORA_M on a GPU of compute capability
    ``arch`` (major * 10 + minor, ``_arch``) whose major is in PRE_LORA_ARCHS."""
    return has_lora and plan is None and m >= PRE_LORA_M and arch // 10 in PRE_LORA_ARCHS


def lora_down(a: torch.Tensor, lmat: torch.Tensor, br: int) -> torch.Tensor:
    """fp32 [M, r] = a @ lmat (a [M, C] activations, lmat [C, r], any strides; cast to a's
    dtype) by ``qlora_lora_down_kernel``: the PRE_LORA launches' down-projection."""
    m, c = a.shape
    r = lmat.shape[1]
    out = torch.empty((m, r), device=a.device, dtype=torch.float32)
    if m == 0:
        return out
    if interpreting():
        bm, bc, warps, stages = _INTERPRET_DOWN_CONFIG
    else:
        bm, bc, warps, stages = _DOWN_CONFIGS["lo" if br <= 64 else "hi"]
    qlora_lora_down_kernel[(triton.cdiv(m, bm),)](
        a,
        lmat,
        out,
        m,
        c,
        r,
        a.stride(0),
        a.stride(1),
        lmat.stride(0),
        lmat.stride(1),
        **{k: v for k, v in _flags(a.dtype).items() if k != "ASM"},
        BLOCK_M=bm,
        BLOCK_C=bc,
        BLOCK_R=br,
        num_warps=warps,
        num_stages=stages,
    )
    return out


def _check_offsets(**tensors: torch.Tensor) -> None:
    # Activation/output offsets are int32 in the kernels (offs * stride); W's are 64-bit.
    for name, t in tensors.items():
        span = sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0)
        if span >= 2**31:
            raise ValueError(
                f"{name} spans {span} elements (shape {tuple(t.shape)}): the fused QLoRA kernels "
                "index activations with 32-bit offsets; split the batch"
            )


def _flags(dtype: torch.dtype) -> dict:
    upcast = interpreting() and dtype == torch.bfloat16
    return {"UPCAST": upcast, "IEEE": dtype == torch.float32 or upcast, "ASM": not interpreting()}


def _layout(kernel_name, layout, packed, dtype, m, n, k, blocksize, br, plan):
    """(packed, LUT) for a launch on a weight in ``layout`` ("bnb" or "fragment", qpeft/layout.py).
    LUT: 0/False the per-byte fp32 path, 1/True the register decode, 2 the register decode
    reading the fragment layout in place, which the unsplit kernels do when the register
    decode applies and the tile the launch runs spans whole 128-code chunks (BLOCK_K % 128
    == 0; not while autotuning, whose tables mix tiles). Every other launch on a fragment
    weight decodes a bitsandbytes-order copy (``unrepack_4bit``; docs/design.md, "The GPU
    fragment layout")."""
    if packed.dtype != torch.uint8 or not packed.is_contiguous():
        raise ValueError(
            f"packed must be contiguous uint8 codes, got {packed.dtype} with strides {packed.stride()}"
        )
    if layout == "bnb":
        if packed.numel() != (n * k + 1) // 2:
            raise ValueError(f"a [{n}, {k}] weight has {(n * k + 1) // 2} packed bytes, got {packed.numel()}")
        return packed, _lut(dtype, packed, k, blocksize)
    if layout != "fragment":
        raise ValueError(f"layout must be 'bnb' or 'fragment', got {layout!r}")
    from qpeft.layout import _check

    _check(packed, n, k, blocksize)  # shape the layout allows, and its byte count
    if plan is None and _lut(dtype, packed, k, blocksize) and not (autotune_enabled() and not interpreting()):
        if interpreting():
            bk = _INTERPRET_FRAG_CONFIG["BLOCK_K"]
        else:
            bk = default_config(kernel_name, _regime(m, br), _arch(packed.device)).kwargs["BLOCK_K"]
        if bk % 128 == 0:
            return packed, 2
    from qpeft.layout import unrepack_4bit

    packed = unrepack_4bit(packed, n, k, blocksize)
    return packed, _lut(dtype, packed, k, blocksize)


def _lut(dtype: torch.dtype, packed: torch.Tensor, k: int, blocksize: int) -> bool:
    """The register decode (``_dequant_lut``) applies: 16-bit output, rows of whole quant
    blocks, and ``packed`` 16-byte aligned (the kernel tells the compiler so, for 16-byte
    loads; every torch allocation is, a view at another offset is not): else the
    per-byte fp32 path."""
    return dtype in (torch.float16, torch.bfloat16) and k % blocksize == 0 and packed.data_ptr() % 16 == 0


def qlora_forward(
    x,
    packed,
    absmax,
    nested_absmax,
    nested_code,
    offset,
    code,
    blocksize,
    nested_blocksize,
    n,
    k,
    lora_a,
    lora_b,
    scaling,
    bias=None,
    rank_scale=None,
    out_scale=None,
    return_xa=False,
    split=None,
    layout="bnb",
):
    """y [M, N] in x's dtype (and xa = x @ A^T [M, r] in x's dtype when ``return_xa``).

    x: [M, K] fp16/bf16/fp32 (any strides); packed: uint8 [(N*K+1)//2] flat; absmax fp32
    [blocks], or uint8 codes with nested_absmax/nested_code/offset; code: fp32 [16];
    lora_a [r, K], lora_b [N, r], bias/out_scale [N], rank_scale [r]: any float dtype;
    lora_a = lora_b = None: no adapter (HAS_LORA=False: y = out_scale * (x @ W^T + bias)).
    split: the K-split schedule at M <= SPLIT_M (``_split_plan``): None chooses, 0 never
    splits, s >= 1 runs the split kernels with s splits. layout: "bnb" (bitsandbytes' byte
    order) or "fragment" (qpeft/layout.py; see ``_layout``).
    """
    has_lora = lora_a is not None
    m, r = x.shape[0], (lora_a.shape[0] if has_lora else 0)
    return_xa = return_xa and has_lora
    br = block_r(r, m)
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    xa = torch.empty((m, r) if return_xa else (0,), device=x.device, dtype=x.dtype)
    if m == 0:
        return y, xa
    nested = nested_absmax is not None
    dummy = code
    if has_lora:
        _check_offsets(x=x, y=y, lora_a=lora_a, lora_b=lora_b)
    else:  # no adapter: the A/B arguments are never read (HAS_LORA=False)
        _check_offsets(x=x, y=y)
        lora_a = lora_b = dummy.view(1, -1)
    plan = _split_plan("fwd", m, n, k, r, x.device, split)
    packed, lut = _layout("fwd", layout, packed, x.dtype, m, n, k, blocksize, br, plan)
    pre = use_pre_lora(m, has_lora, plan, _arch(x.device))
    pre_xa = lora_down(x, lora_a.t(), br) if pre else dummy  # fp32 x @ A^T
    args = (
        x,
        packed,
        absmax,
        nested_absmax if nested else dummy,
        nested_code if nested else dummy,
        offset if nested else dummy,
        code,
        lora_a,
        lora_b,
        bias if bias is not None else dummy,
        rank_scale if rank_scale is not None else dummy,
        out_scale if out_scale is not None else dummy,
        y,
        xa if return_xa else dummy,
        m,
        n,
        k,
        r,
        _m_bucket(m),
        float(scaling),
        x.stride(0),
        x.stride(1),
        lora_a.stride(0),
        lora_a.stride(1),
        lora_b.stride(0),
        lora_b.stride(1),
        y.stride(0),
        y.stride(1),
        pre_xa,
    )
    kwargs = dict(
        BLOCKSIZE=blocksize,
        NESTED_BLOCKSIZE=nested_blocksize,
        NESTED=nested,
        ALIGNED=k % blocksize == 0,
        LUT=lut,
        HAS_BIAS=bias is not None,
        HAS_RANK_SCALE=rank_scale is not None,
        HAS_OUT_SCALE=out_scale is not None,
        HAS_LORA=has_lora,
        WRITE_XA=return_xa,
        PRE_LORA=pre,
        BLOCK_R=br,
        **_flags(x.dtype),
    )
    if plan is None:
        _launch("fwd", qlora_fwd_kernel, m, lambda meta: triton.cdiv(n, meta["BLOCK_N"]), br, args, kwargs)
        return y, xa
    common = {
        name: kwargs[name]
        for name in ("BLOCKSIZE", "NESTED_BLOCKSIZE", "NESTED", "ALIGNED", "LUT", "HAS_LORA")
    }
    flags = {name: kwargs[name] for name in ("UPCAST", "IEEE", "ASM")}
    split_args = (args[:8], (m, n, k, r, *args[20:24]))
    reduce_args = (
        lora_b,
        *args[9:12],
        y,
        xa if return_xa else dummy,
        float(scaling),
        lora_b.stride(1),
        lora_b.stride(0),
        y.stride(0),
        y.stride(1),
    )
    reduce_kwargs = dict(
        HAS_BIAS=bias is not None,
        HAS_RANK_SCALE=rank_scale is not None,
        HAS_OUT_SCALE=out_scale is not None,
        WRITE_SIDE=return_xa,
    )
    _run_split("fwd", plan, m, n, r, x.device, split_args, reduce_args, reduce_kwargs, flags, common)
    return y, xa


def qlora_dx(
    dy,
    packed,
    absmax,
    nested_absmax,
    nested_code,
    offset,
    code,
    blocksize,
    nested_blocksize,
    n,
    k,
    lora_a,
    lora_b,
    scaling,
    rank_scale=None,
    return_g=False,
    split=None,
    layout="bnb",
):
    """dx [M, K] in dy's dtype (and g = dy @ B [M, r] in fp32 when ``return_g``).

    dy: [M, N], already multiplied by out_scale; other arguments as ``qlora_forward``
    (``split`` splits N here).
    """
    has_lora = lora_a is not None
    m, r = dy.shape[0], (lora_a.shape[0] if has_lora else 0)
    return_g = return_g and has_lora
    br = block_r(r, m)
    dx = torch.empty((m, k), device=dy.device, dtype=dy.dtype)
    g = torch.empty((m, r) if return_g else (0,), device=dy.device, dtype=torch.float32)
    if m == 0:
        return dx, g
    nested = nested_absmax is not None
    dummy = code
    if has_lora:
        _check_offsets(dy=dy, dx=dx, lora_a=lora_a, lora_b=lora_b)
    else:  # no adapter: the A/B arguments are never read (HAS_LORA=False)
        _check_offsets(dy=dy, dx=dx)
        lora_a = lora_b = dummy.view(1, -1)
    plan = _split_plan("dx", m, k, n, r, dy.device, split)
    packed, lut = _layout("dx", layout, packed, dy.dtype, m, n, k, blocksize, br, plan)
    pre = use_pre_lora(m, has_lora, plan, _arch(dy.device))
    pre_g = lora_down(dy, lora_b, br) if pre else dummy  # fp32 dy @ B
    args = (
        dy,
        packed,
        absmax,
        nested_absmax if nested else dummy,
        nested_code if nested else dummy,
        offset if nested else dummy,
        code,
        lora_a,
        lora_b,
        rank_scale if rank_scale is not None else dummy,
        dx,
        g if return_g else dummy,
        m,
        n,
        k,
        r,
        _m_bucket(m),
        float(scaling),
        dy.stride(0),
        dy.stride(1),
        lora_a.stride(0),
        lora_a.stride(1),
        lora_b.stride(0),
        lora_b.stride(1),
        dx.stride(0),
        dx.stride(1),
        pre_g,
    )
    kwargs = dict(
        BLOCKSIZE=blocksize,
        NESTED_BLOCKSIZE=nested_blocksize,
        NESTED=nested,
        ALIGNED=k % blocksize == 0,
        LUT=lut,
        HAS_RANK_SCALE=rank_scale is not None,
        HAS_LORA=has_lora,
        WRITE_G=return_g and not pre,
        PRE_LORA=pre,
        BLOCK_R=br,
        **_flags(dy.dtype),
    )
    if plan is None:
        _launch("dx", qlora_dx_kernel, m, lambda meta: triton.cdiv(k, meta["BLOCK_K"]), br, args, kwargs)
        if pre and return_g:
            g = pre_g  # the fused kernel's g is this fp32 product too
        return dx, g
    common = {
        name: kwargs[name]
        for name in ("BLOCKSIZE", "NESTED_BLOCKSIZE", "NESTED", "ALIGNED", "LUT", "HAS_LORA")
    }
    flags = {name: kwargs[name] for name in ("UPCAST", "IEEE", "ASM")}
    split_args = (
        (*args[:7], lora_b),
        (m, n, k, r, dy.stride(0), dy.stride(1), lora_b.stride(0), lora_b.stride(1)),
    )
    reduce_args = (
        lora_a,
        dummy,
        args[9],
        dummy,
        dx,
        g if return_g else dummy,
        float(scaling),
        lora_a.stride(0),
        lora_a.stride(1),
        dx.stride(0),
        dx.stride(1),
    )
    reduce_kwargs = dict(
        HAS_BIAS=False, HAS_RANK_SCALE=rank_scale is not None, HAS_OUT_SCALE=False, WRITE_SIDE=return_g
    )
    _run_split("dx", plan, m, k, r, dy.device, split_args, reduce_args, reduce_kwargs, flags, common)
    return dx, g


# ---------------------------------------------------------------------------------------
# Ahead-of-time compilation: AOT_CONFIGS in the format of triton_kernels/__init__.py, plus
# "attrs" (ASTSource's fourth argument): the tt.divisibility=16 hints the JIT derives at
# run time for 16-byte aligned torch tensors and N, K, strides divisible by 16. Without
# them the AOT build is not the kernel that runs: no vector loads, per-element masks, and
# even a plain masked 128x128x32 bf16 GEMM takes 240 registers on sm_80 (126 with them).
# ---------------------------------------------------------------------------------------

_FWD_ARGS = [
    ("x_ptr", "*{dt}"),
    ("packed_ptr", "*u8"),
    ("absmax_ptr", "*{am}"),
    ("nested_absmax_ptr", "*fp32"),
    ("nested_code_ptr", "*fp32"),
    ("offset_ptr", "*fp32"),
    ("code_ptr", "*fp32"),
    ("a_ptr", "*{dt}"),
    ("b_ptr", "*{dt}"),
    ("bias_ptr", "*{dt}"),
    ("rank_scale_ptr", "*fp32"),
    ("out_scale_ptr", "*{dt}"),
    ("y_ptr", "*{dt}"),
    ("xa_ptr", "*{dt}"),
]
_DX_ARGS = [
    ("dy_ptr", "*{dt}"),
    ("packed_ptr", "*u8"),
    ("absmax_ptr", "*{am}"),
    ("nested_absmax_ptr", "*fp32"),
    ("nested_code_ptr", "*fp32"),
    ("offset_ptr", "*fp32"),
    ("code_ptr", "*fp32"),
    ("a_ptr", "*{dt}"),
    ("b_ptr", "*{dt}"),
    ("rank_scale_ptr", "*fp32"),
    ("dx_ptr", "*{dt}"),
    ("g_ptr", "*fp32"),
]
_SCALARS = [("M", "i32"), ("N", "i32"), ("K", "i32"), ("R", "i32"), ("M_BUCKET", "i32"), ("scaling", "fp32")]
# Strides of contiguous operands: the JIT specializes an int argument equal to 1 as a
# constant, so the AOT build does the same for the unit strides.
_FWD_STRIDES = [
    ("stride_xm", "i32"),
    ("stride_xk", 1),
    ("stride_ar", "i32"),
    ("stride_ak", 1),
    ("stride_bn", "i32"),
    ("stride_br", 1),
    ("stride_ym", "i32"),
    ("stride_yn", 1),
]
_DX_STRIDES = [
    ("stride_dym", "i32"),
    ("stride_dyn", 1),
    ("stride_ar", "i32"),
    ("stride_ak", 1),
    ("stride_bn", "i32"),
    ("stride_br", 1),
    ("stride_dxm", "i32"),
    ("stride_dxk", 1),
]


def _aot_entry(
    kernel_name: str,
    regime: tuple[str, str],
    r: int,
    dtype: str = "bf16",
    nested: bool = True,
    has_lora: bool = True,
    arch: int | None = None,
    pre: bool = False,
) -> dict:
    """The default config of ``regime`` as an AOT description: bf16, NF4 with double
    quantization, blocksize 64, bias and rank_scale on, out_scale off; ``has_lora=False``:
    the no-adapter variant (LoRA terms compiled out); ``pre``: the PRE_LORA variant (large
    M: the down-projection read from pre_ptr, named ``qlora_<kernel>_prelora_...``, so
    the regime's own name stays the fused variant's). ``arch`` (80, 90): the default on that
    arch (``default_config``), and the entry's "archs" says the report compiles it for that
    arch only; None: the table's first, for every arch without its own default."""
    cfg = default_config(kernel_name, regime, arch or 0)
    ptrs, strides = (_FWD_ARGS, _FWD_STRIDES) if kernel_name == "fwd" else (_DX_ARGS, _DX_STRIDES)
    signature = {name: t.format(dt=dtype, am="u8" if nested else "fp32") for name, t in ptrs}
    signature.update(dict(_SCALARS), pre_ptr="*fp32")
    constexprs = {}
    for name, t in strides:
        signature[name] = "constexpr" if t == 1 else t
        if t == 1:
            constexprs[name] = 1
    constexprs.update(
        BLOCKSIZE=64,
        NESTED_BLOCKSIZE=256,
        NESTED=nested,
        ALIGNED=True,
        LUT=dtype in ("bf16", "fp16"),
        HAS_RANK_SCALE=has_lora,
        HAS_LORA=has_lora,
        UPCAST=False,
        IEEE=dtype == "fp32",
        ASM=True,
        BLOCK_R=block_r(r, 1 if regime[0] == "small" else SMALL_M + 1),
        **cfg.kwargs,
    )
    if kernel_name == "fwd":
        constexprs.update(HAS_BIAS=True, HAS_OUT_SCALE=False, WRITE_XA=has_lora, PRE_LORA=pre)
    else:
        constexprs.update(WRITE_G=has_lora and not pre, PRE_LORA=pre)
    for name in constexprs:
        signature[name] = "constexpr"
    fn = qlora_fwd_kernel if kernel_name == "fwd" else qlora_dx_kernel
    signature = {name: signature[name] for name in fn.arg_names}  # kernel argument order
    # What the JIT infers at run time for torch tensors and LLM shapes: 16-byte aligned
    # pointers and N, K, row strides divisible by 16; R too when the entry's rank is (the
    # JIT marks any int argument divisible by 16: r = 16, 32, 64, 256 get it, and without
    # it the LoRA tiles' r mask is per element, so A and B load one element per
    # instruction). M is not assumed to be.
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if signature[name].startswith("*")
        or (signature[name] == "i32" and name not in ("M", "R", "M_BUCKET"))
        or (name == "R" and r % 16 == 0 and has_lora)
    }
    entry = {
        "name": f"qlora_{kernel_name}_{'prelora_' if pre else ''}{regime[0]}M_"
        f"{f'r{r}' if has_lora else 'nolora'}_{dtype}",
        "fn": fn,
        "signature": signature,
        "constexprs": constexprs,
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
        "attrs": attrs,  # ASTSource(fn, signature, constexprs, attrs)
    }
    if arch is not None:
        entry["archs"] = (arch,)
    return entry


def _aot_entries(
    kernel_name: str,
    regime: tuple[str, str],
    r: int,
    has_lora: bool = True,
    dtype: str = "bf16",
    pre: bool = False,
) -> list[dict]:
    """One entry for every arch, or (where an arch has its own default) one per arch, both
    under one name: the reports key records by (name, arch)."""
    if (kernel_name, regime) not in _PER_ARCH:
        return [_aot_entry(kernel_name, regime, r, dtype, has_lora=has_lora, pre=pre)]
    entries = [
        _aot_entry(kernel_name, regime, r, dtype, has_lora=has_lora, arch=arch, pre=pre) for arch in (80, 90)
    ]
    if pre:  # compiled on both archs as evidence; what a launch runs only on PRE_LORA_ARCHS
        for e in entries:
            e["default"] = e["archs"][0] // 10 in PRE_LORA_ARCHS
    return entries


AOT_CONFIGS = [
    e
    for kernel_name in ("fwd", "dx")
    for regime, r in (
        (("small", "lo"), 16),
        (("large", "lo"), 16),
        (("small", "hi"), 256),
        (("large", "hi"), 256),
    )
    for e in _aot_entries(kernel_name, regime, r)
] + [  # no adapter: the "lo" bucket's config (block_r(0) = 16), LoRA compiled out
    e
    for kernel_name in ("fwd", "dx")
    for regime in (("small", "lo"), ("large", "lo"))
    for e in _aot_entries(kernel_name, regime, 0, has_lora=False)
]

_SPLIT_ARGS = {
    "fwd": [("x_ptr", "*{dt}")] + _FWD_ARGS[1:7] + [("a_ptr", "*{dt}")],
    "dx": [("dy_ptr", "*{dt}")] + _DX_ARGS[1:7] + [("b_ptr", "*{dt}")],
}
_SPLIT_STRIDES = {
    "fwd": _FWD_STRIDES[:4],
    "dx": [_DX_STRIDES[0], _DX_STRIDES[1], _DX_STRIDES[4], _DX_STRIDES[5]],
}


def _aot_split_entry(kernel_name: str, bm: int, r: int, dtype: str = "bf16") -> dict:
    """The split kernel's default config at tile height ``bm`` (16: M <= 16, 32: M = 17..64)
    for rank r, as an AOT description: bf16, NF4 with double quantization, blocksize 64, the
    register decode; hints as ``_aot_entry`` (TILES_PER_SPLIT, like M, not divisible)."""
    br = block_r_split(r, bm)
    table = _FWD_SPLIT_CONFIGS if kernel_name == "fwd" else _DX_SPLIT_CONFIGS
    cfg = table[(bm, "lo" if br <= 64 else "hi")][0]
    fn = qlora_fwd_split_kernel if kernel_name == "fwd" else qlora_dx_split_kernel
    signature = {name: t.format(dt=dtype, am="u8") for name, t in _SPLIT_ARGS[kernel_name]}
    signature.update(
        part_ptr="*fp32", lpart_ptr="*fp32", M="i32", N="i32", K="i32", R="i32", TILES_PER_SPLIT="i32"
    )
    constexprs = {}
    for name, t in _SPLIT_STRIDES[kernel_name]:
        signature[name] = "constexpr" if t == 1 else t
        if t == 1:
            constexprs[name] = 1
    constexprs.update(
        BLOCKSIZE=64,
        NESTED_BLOCKSIZE=256,
        NESTED=True,
        ALIGNED=True,
        LUT=dtype in ("bf16", "fp16"),
        HAS_LORA=True,
        UPCAST=False,
        IEEE=dtype == "fp32",
        ASM=True,
        BLOCK_R=br,
        **{key: cfg.kwargs[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K")},
    )
    for name in constexprs:
        signature[name] = "constexpr"
    signature = {name: signature[name] for name in fn.arg_names}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if signature[name].startswith("*")
        or (signature[name] == "i32" and name not in ("M", "R", "TILES_PER_SPLIT"))
        or (name == "R" and r % 16 == 0)
    }
    return {
        "name": f"qlora_{kernel_name}_split{bm}M_r{r}_{dtype}",
        "fn": fn,
        "signature": signature,
        "constexprs": constexprs,
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
        "attrs": attrs,
    }


AOT_CONFIGS += [  # fp16 activations: the same default tiles (the register decode rounds to fp16)
    e
    for kernel_name in ("fwd", "dx")
    for regime, r in (
        (("small", "lo"), 16),
        (("large", "lo"), 16),
        (("small", "hi"), 256),
        (("large", "hi"), 256),
    )
    for e in _aot_entries(kernel_name, regime, r, dtype="fp16")
]
AOT_CONFIGS += [  # the split schedule (M <= SPLIT_M): both tile heights, both rank buckets
    _aot_split_entry(kernel_name, bm, r)
    for kernel_name in ("fwd", "dx")
    for bm in (16, 32)
    for r in (16, 256)
]
AOT_CONFIGS += [  # the PRE_LORA variant (M >= PRE_LORA_M): large-M tiles, both rank buckets
    e
    for kernel_name in ("fwd", "dx")
    for regime, r in ((("large", "lo"), 16), (("large", "hi"), 256))
    for e in _aot_entries(kernel_name, regime, r, pre=True)
]


def _aot_down_entry(kernel_name: str, r: int, dtype: str = "bf16") -> dict:
    """qlora_lora_down_kernel's config for rank r (``lora_down``) as an AOT description, with
    contiguous activations and the L the launcher passes: the forward's A^T, a transposed view
    of contiguous A (unit stride along C), or dx's B ([C, r] contiguous: unit stride along r).
    The JIT specializes a unit stride as a constant; so does this entry."""
    br = block_r(r, SMALL_M + 1)
    bm, bc, warps, stages = _DOWN_CONFIGS["lo" if br <= 64 else "hi"]
    fn = qlora_lora_down_kernel
    unit = "stride_lc" if kernel_name == "fwd" else "stride_lr"
    signature = {
        "a_ptr": f"*{dtype}",
        "l_ptr": f"*{dtype}",
        "out_ptr": "*fp32",
        "M": "i32",
        "C": "i32",
        "R": "i32",
        "stride_am": "i32",
        "stride_lc": "i32",
        "stride_lr": "i32",
    }
    constexprs = {"stride_ac": 1, unit: 1}
    constexprs.update(UPCAST=False, IEEE=dtype == "fp32", BLOCK_M=bm, BLOCK_C=bc, BLOCK_R=br)
    for name in constexprs:
        signature[name] = "constexpr"
    signature = {name: signature[name] for name in fn.arg_names}
    # the A^T view's row stride is K (divisible by 16); B's is r (divisible when r is)
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if signature[name].startswith("*")
        or (signature[name] == "i32" and name not in ("M", "R"))
        or (name == "R" and r % 16 == 0)
    }
    if kernel_name == "dx" and r % 16:
        attrs.pop((fn.arg_names.index("stride_lc"),), None)
    return {
        "name": f"qlora_lora_down_{kernel_name}_r{r}_{dtype}",
        "fn": fn,
        "signature": signature,
        "constexprs": constexprs,
        "num_warps": warps,
        "num_stages": stages,
        "attrs": attrs,
    }


AOT_CONFIGS += [_aot_down_entry(kernel_name, r) for kernel_name in ("fwd", "dx") for r in (16, 256)]
