"""Error bounds shared by the tests and ``python -m qpeft selftest`` (qpeft/selftest.py).

Every bound here is derived, not tuned: each function's comment gives the derivation (the
summation depth of the kernel, the roundings of its operands). The tests assert them and the
selftest reports each result's worst error against them, so a GPU run is held to exactly the
bounds CI holds the CPU and emulated kernels to. Where a kernel's result must equal the
reference bit for bit (quantization, dequantization, the optimizer step ops), the bound is 0.
Nothing here imports pytest.
"""

from __future__ import annotations

import torch

from .functional import dequantize_4bit, quantize_4bit
from .quant_state import QuantState

U32 = 2.0**-24  # unit roundoff of fp32
ETA32 = 2.0**-150  # absolute error bound of one fp32 rounding in the subnormal range

# --- error bounds: the 4-bit GEMV -----------------------------------------------------------


def _gamma(k: int) -> float:
    return k * U32 / (1 - k * U32)


def _ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` at magnitude |v| (float64)."""
    fi = torch.finfo(dtype)
    mag = v.abs().clamp(min=fi.tiny)
    return fi.eps * torch.exp2(torch.floor(torch.log2(mag)))


def gemv_bound(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype, k_roundings: int) -> torch.Tensor:
    """How far an fp32 evaluation of y = x @ w^T may be from the exact value, per element.

    The inputs are exact fp32 numbers (x converted from its dtype exactly, w the fp32
    dequantized weight, which the kernel forms with the same single product as the
    reference), so only the summation rounds. Whatever the order (a tree, blocks,
    fma chains), each product x_k w_k reaches the result through at most h
    roundings when every one of the K terms is at most h levels deep, and then
    |fl(s) - s| <= gamma_h * sum_k |x_k w_k|, gamma_h = h u / (1 - h u), u = 2^-24
    (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., 3.1; an fma
    rounds once where a multiply-add rounds twice, which only helps), plus 2^-150 for
    each of at most 2K roundings that may land in the subnormal range (gamma assumes
    none). A 16-bit output is then rounded once more: half an ulp of the output dtype
    at the result's magnitude.
    """
    x64, w64 = x.double(), w.double()
    a = x64.abs() @ w64.abs().T  # sum_k |x_k w_k|
    k = x.shape[1]
    bound = _gamma(k_roundings) * a + 2 * k * ETA32
    if out_dtype != torch.float32:
        exact = x64 @ w64.T
        bound = bound + 0.5 * _ulp(exact.abs() + bound, out_dtype)
    return bound


def cuda_gemv_roundings(k: int) -> int:
    """Most roundings between any product and the CUDA kernel's result (csrc/cuda/gemv_4bit.cu).

    A lane chains fmaf over its share of the row: on the 16-byte path, 32 per chunk
    for chunks lane, lane + 32, ... of the K/32 chunks (at most 32 * ceil(K/1024));
    on the per-element path, elements lane, lane + 32, ... (at most ceil(K/32) <=
    32 * ceil(K/1024)). The 5-step butterfly then adds 5 more.
    """
    return 32 * -(-k // 1024) + 5


def cpu_gemv_roundings(k: int, blocksize: int) -> int:
    """Most roundings between any product and the C++ CPU kernel's result (csrc/cpu/gemv*.cpp).

    The scalar and AVX2 kernels factor each block's absmax out of its sum: they compute
    sum_b s_b * sum_{k in b} x_k t_k (t the code's table value) where the reference sums
    x_k * fl(t_k s_b). Exactly, the two differ by sum_k x_k (t_k s_b - fl(t_k s_b)), at most
    u * sum|x_k w_k| (u = 2^-24; one rounding per decoded weight: cpu_gemv_bound adds it).
    Each product then reaches the result through at most h roundings: the scalar kernel's
    chain within a block (2 per term: multiply, add), the block's scaling and its add into
    the row total (2 per block), and, in the AVX2 kernel, a shorter lane chain (a lane's
    products of a block split over CH in {1, 2, 4} accumulators: blocksize / (8 CH) FMAs,
    then at most 2 pairwise adds), the block's FMA into the row total and a 3-level
    horizontal sum; h = 2 * (blocksize + K / blocksize) + 8 covers both.
    The AVX-512 kernel decodes fl(t_k s_b) itself (the block's table scaled by one vmulps:
    the reference's weights, so the factoring term is 0 there) and chains each lane's FMAs
    over segments of up to 16 blocks in CH >= 2 accumulators, adds those pairwise into
    the row total per segment and ends with a 16-lane sum: at most 16 * (blocksize / 16) / CH
    + 2 + ceil(K / (16 blocksize)) + 4 <= blocksize + K / blocksize + 7 <= h.
    """
    return 2 * (blocksize + -(-k // blocksize)) + 8


def cpu_gemv_bound(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype, blocksize: int) -> torch.Tensor:
    """gemv_bound at the CPU kernel's depth plus its one rounding per decoded weight."""
    k = x.shape[1]
    return gemv_bound(x, w, out_dtype, cpu_gemv_roundings(k, blocksize)) + U32 * (
        x.double().abs() @ w.double().abs().T
    )


# --- error bounds: qlora_linear against an fp64 oracle --------------------------------------
# Tolerances are worst-case bounds, derived per output element (u32 = 2^-24):
# - an fp32 dot over n terms: n * u32 * sum|a_i b_i| (one rounding per product and per add);
# - operands the kernel rounds to the activation dtype (dequantized W, t = s * xa * rank_scale,
#   g, dy' = dy * out_scale, xa): u_op * (sum of |contributions|), u_op = 2^-11 (fp16, RNE)
#   or 2^-7 (bf16: the interpreter truncates fp32->bf16; covers RNE's 2^-8 on a GPU);
#   for fp16 the oracle rounds W exactly as the kernel does, so that term vanishes;
# - the final cast: u_out * |y|, u_out = 2^-24 (fp32), 2^-11 (fp16), 2^-7 (bf16, truncating).

U_OP = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-7}
U_OUT = {torch.float32: U32, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-7}

# (dtype, M, N, K, r, quant_type, double_quant, blocksize, bias, rank_scale, out_scale)
CASES = [
    (torch.float32, 37, 45, 83, 8, "nf4", True, 64, True, True, True),
    (torch.float32, 1, 45, 83, 1, "fp4", False, 64, False, False, False),
    (torch.float32, 20, 17, 150, 64, "fp4", True, 32, False, True, True),
    (torch.float32, 1, 3, 5, 1, "nf4", False, 32, True, False, False),  # odd numel: padding nibble
    (torch.float16, 37, 45, 83, 64, "nf4", False, 32, True, False, True),
    (torch.float16, 1, 33, 100, 8, "fp4", True, 64, False, True, False),
    (torch.float16, 20, 50, 47, 1, "nf4", True, 256, True, True, True),  # a quant block spans 5+ rows
    (torch.float16, 5, 45, 200, 8, "nf4", True, 32, False, False, True),  # 282 blocks: nested blocks straddle
    (torch.bfloat16, 37, 45, 83, 8, "fp4", True, 128, True, True, False),
    (torch.bfloat16, 1, 45, 83, 64, "nf4", False, 64, False, False, True),
    (torch.bfloat16, 17, 16, 64, 1, "nf4", True, 64, True, False, False),
    # K % blocksize == 0: the kernels' ALIGNED path (whole quant blocks per row, vector byte loads)
    (torch.float32, 37, 45, 96, 8, "nf4", True, 32, True, True, True),  # two blocks per 64-wide K tile
    (torch.float16, 20, 50, 192, 1, "fp4", False, 64, False, True, False),
    (torch.float16, 5, 72, 256, 8, "nf4", True, 32, True, False, True),  # 576 blocks: nested blocks straddle
    (torch.bfloat16, 1, 45, 256, 64, "nf4", False, 128, False, False, True),  # a block spans two K tiles
]


def case_id(case):
    dt, m, n, k, r, qt, dq, bs, bias, rs, os_ = case
    flags = "".join(f for f, on in (("b", bias), ("R", rs), ("O", os_)) if on) or "-"
    return f"{str(dt)[6:]}-{m}x{n}x{k}-r{r}-{qt}{'-dq' if dq else ''}-bs{bs}-{flags}"


def make_problem(case, seed=0, device="cpu"):
    dt, m, n, k, r, qt, dq, bs, has_bias, has_rs, has_os = case
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    packed, state = quantize_4bit(w, bs, qt, double_quant=dq)
    p = {
        "packed": packed,
        "state": state,
        "w": dequantize_4bit(packed, state, torch.float32).double(),  # exact
        "x": torch.randn(m, k, generator=g).to(dt),
        "a": (torch.randn(r, k, generator=g) / k**0.5).to(dt),
        "b": torch.randn(n, r, generator=g).to(dt),
        "bias": torch.randn(n, generator=g).to(dt) if has_bias else None,
        "rank_scale": (torch.rand(r, generator=g) + 0.5) if has_rs else None,
        "out_scale": (torch.rand(n, generator=g) + 0.5).to(dt) if has_os else None,
        "dy": torch.randn(m, n, generator=g).to(dt),
        "scaling": 0.75,
    }
    if device != "cpu":  # drawn on CPU (the seed gives the same problem on any machine), then moved
        p = {key: v.to(device) if isinstance(v, (torch.Tensor, QuantState)) else v for key, v in p.items()}
    return p


def _d(t):
    return None if t is None else t.double()


def oracle(p, dt, rounds_operands=True):
    """fp64 values and worst-case error bounds of y, dx, dA, dB, dbias (see the comment above U_OP).

    ``rounds_operands``: the kernel rounds W, t, dy' to ``dt`` before its dots (Triton);
    the reference ("default") does not: it computes in fp32 from the exact operands.
    """
    u_op, u_out = (U_OP[dt] if rounds_operands else 0.0), U_OUT[dt]
    x, a, b, dy, s = _d(p["x"]), _d(p["a"]), _d(p["b"]), _d(p["dy"]), p["scaling"]
    w = p["w"]
    mimic = rounds_operands and dt == torch.float16
    w_op = p["w"].to(dt).double() if mimic else w  # the fp16 kernel multiplies fp16(W)
    u_w = u_op if dt == torch.bfloat16 else 0.0
    m, k = x.shape
    n, r = b.shape
    f64 = dict(dtype=torch.float64, device=x.device)
    rs = _d(p["rank_scale"]) if p["rank_scale"] is not None else torch.ones(r, **f64)
    os_ = _d(p["out_scale"]) if p["out_scale"] is not None else torch.ones(n, **f64)
    bias = _d(p["bias"]) if p["bias"] is not None else torch.zeros(n, **f64)
    ax, aa, ab, aw = x.abs(), a.abs(), b.abs(), w.abs()

    # forward
    xa = x @ a.T
    t = s * xa * rs
    pre = x @ w_op.T + t @ b.T + bias
    y = os_ * pre
    s_base = ax @ aw.T  # sum_k |x||w|
    s_t = s * (ax @ aa.T) * rs.abs()  # bound of |t| including its accumulation
    s_lora = s_t @ ab.T
    err_pre = (
        (k + 2) * U32 * s_base
        + u_w * s_base
        + s_lora * (u_op + (k + r + 4) * U32)
        + U32 * (pre.abs() + bias.abs())
    )
    tol_y = os_.abs() * err_pre * (1 + U32) + u_out * y.abs() + U32 * y.abs()
    tol_xa = k * U32 * (ax @ aa.T) + u_out * xa.abs()

    # backward: dy' = dy * out_scale, rounded to the operand dtype when out_scale is set
    dyp = dy * os_
    u_dy = u_op if p["out_scale"] is not None else 0.0
    ady = dyp.abs()
    g = dyp @ b
    s_g = ady @ ab  # sum_n |dy'||b|
    dx = dyp @ w_op + (s * g * rs) @ a
    s_dxb = ady @ aw
    s_dxl = (s * s_g * rs.abs()) @ aa
    tol_dx = (
        (n + 2) * U32 * s_dxb
        + (u_w + u_dy) * s_dxb
        + s_dxl * (u_op + u_dy + (n + r + 4) * U32)
        + u_out * dx.abs()
        + U32 * dx.abs()
    )
    da = (s * g * rs).T @ x
    s_da = (s * s_g * rs.abs()).T @ ax
    tol_da = s_da * (u_dy + (n + m + 4) * U32) + u_out * da.abs()
    db = dyp.T @ (s * xa * rs)
    s_db = ady.T @ (s * (ax @ aa.T) * rs.abs())
    tol_db = s_db * (u_dy + u_out + (k + m + 4) * U32) + u_out * db.abs()  # xa was stored in dt
    dbias = dyp.sum(0)
    tol_dbias = ady.sum(0) * (u_dy + (m + 1) * U32) + u_out * dbias.abs()
    return {
        "y": (y, tol_y),
        "xa": (xa, tol_xa),
        "dx": (dx, tol_dx),
        "dA": (da, tol_da),
        "dB": (db, tol_db),
        "dbias": (dbias, tol_dbias),
    }


# --- error bounds: the CPU QLoRA layer's bf16 compute mode ------------------------------------
# Error bounds of the CPU QLoRA layer's bf16 compute mode against the fp64 oracle.
#
# The bf16 mode (qpeft/backends/cpu/qlora.py, ``_forward_bf16`` / ``_backward_bf16``;
# docs/design.md "CPU compute dtype") multiplies bf16 operands in torch's oneDNN GEMM with
# fp32 accumulation and rounds each GEMM's result to bf16 once. The oracle
# (``_helpers.oracle``) gives the exact fp64 value from the exactly decoded fp32 W; this
# module replaces its tolerances.
#
# Derivation. u = 2^-8 is bf16's unit roundoff (8 significant bits, round to nearest even:
# torch's casts, the C++ decode to bf16, oneDNN's bf16 outputs all round that way), and
# gamma_n = n 2^-24 / (1 - n 2^-24) bounds n fp32 roundings on a path (Higham, Accuracy and
# Stability of Numerical Algorithms, 3.1). A product of two bf16 numbers is exact in fp32
# (8 + 8 bits < 24), so each term x_k w_k of a dot reaches the result multiplied by
# (1 + d) with |d| <= rho(j, n) = (1 + u)^j (1 + gamma_n) - 1, where j counts the bf16
# roundings on its path and n the fp32 ones; summed over the terms, the error of a value is
# at most rho(j, n) * S, S the same sum over |terms| (the bound holds for any summation
# order, so for oneDNN's blocking and for the panel split).
#
# forward y (M > 8: bf16 panels): base term x_k w_nk -- x rounded (1), W decoded to bf16
#   (1), fp32 accumulation over K, the GEMM's bf16 output (1): j = 3, n = K. LoRA term
#   x_k a_lk s rs_l b_nl -- x (1), A (1), xa's bf16 output (1), then t = xa s rs and t @ B^T
#   and the adds of base, bias and out_scale in fp32 (r + 5): j = 3, n = K + r + 5.
#   M <= 8 computes base with the fp32 GEMV instead (its depth h, cpu_gemv_roundings + 1,
#   and no bf16 rounding), so n = K + h + r + 5 covers both. Then y is rounded to x's dtype:
#   + u_out (|y| + err).
# dx = dy' W + (s g rs) A, dy' = dy * out_scale: base term -- dy' (1, after one fp32
#   product), W (1), fp32 over a panel's rows, the panel product's bf16 output (1), the
#   fp32 sum of the panels and the LoRA term (<= N + 1): j = 3. LoRA term -- dy' (1), B (1),
#   g's output (1), gs = g s rs rounded (1, after 2 fp32), A (1), gs @ A's output (1): j = 6.
#   So j = 6, n = 2N + r + 4 for both, then the cast to x's dtype: + u_out (|dx| + err).
# dA = gs^T x: gs's chain (4, N + 2), x (1), fp32 over M, the output (1): j = 6, n = N + M + 3.
# dB = dy'^T xs, xs = xa s rs rounded: xa's forward chain (3, K), xs (1, 2), dy' (1),
#   fp32 over M, the output (1): j = 6, n = K + M + 4.
# dbias = sum_m dy': fp32 throughout, n = M + 1.
# A cast of a bf16 result to fp32 is exact; to fp16 it is another rounding (u_out).

#
# AMX. On a CPU at the amx level the products x @ W^T and dy @ W run on qpeft's AMX kernel
# (csrc/cpu/qgemm_amx.cpp; fp32 results, no bf16 rounding of them: one rounding fewer than
# counted above, so j = 3 and 6 still bound them), and oneDNN's bf16 GEMMs (the LoRA
# products) run on the same tiles. The LoRA up-projections there are fp32 sums in the AMX
# kernel's epilogue (the r + 5 fp32 roundings counted above), and dA, dB fp32 sums of
# exact products (``amx.lora_grad``: no bf16 output rounding, no flushes), inside the
# same bounds. TDPBF16PS reads bf16 subnormal inputs as zero and
# flushes subnormal fp32 results to zero, an absolute error the relative bounds do not
# cover. For one dot product sum_k a_k b_k of n terms: a subnormal a_k dropped loses
# |a_k b_k| < 2^-126 |b_k| (a subnormal b_k: < 2^-126 |a_k|), a product below 2^-126
# flushed loses < 2^-126, and each of the n fp32 partial sums flushed loses < 2^-126, so
#     |error| <= F = 2^-126 (sum_k |a_k| + sum_k |b_k| + 2 n)        (``flush_bound``)
# on top of the relative bound. A later product carries F times the magnitudes it
# multiplies by (xa's F reaches y through s rs |B|, g's through s rs |A|), and the later
# roundings scale it by at most 1 + rho. F is below 1e-33 for unit-sized operands and
# n <= 10^4: it matters only for values near fp32's smallest normal number (2^-126), which
# tests/test_cpu_amx.py feeds on purpose.

U_BF16 = 2.0**-8
TINY32 = 2.0**-126  # fp32's (and bf16's) smallest normal number


def flush_bound(sum_a: torch.Tensor, sum_b: torch.Tensor, n: int) -> torch.Tensor:
    """F = 2^-126 (sum|a| + sum|b| + 2n) for dot products of n terms: the subnormal inputs
    and results AMX flushes to zero (derivation above). ``sum_a`` [M, 1] and ``sum_b``
    [1, N] are the |operand| sums of each output's two vectors."""
    return TINY32 * (sum_a + sum_b + 2 * n)


def amx_gemm_bound(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Bound on |qgemm - a @ b| for the AMX kernel alone (a [M, n] and b [n, N] in fp64,
    holding bf16 values exactly): bf16 x bf16 products are exact in fp32, then n fp32
    accumulations (gamma_n), the flushes (``flush_bound``), and, for a bf16 out, the final
    rounding u (|y| + err)."""
    n = a.shape[1]
    err = gamma(n) * (a.abs() @ b.abs()) + flush_bound(
        a.abs().sum(1, keepdim=True), b.abs().sum(0, keepdim=True), n
    )
    if out_dtype == torch.bfloat16:
        err = err * (1 + U_BF16) + U_BF16 * (a @ b).abs()
    return err


# unit roundoff of the final cast to the activation dtype (round to nearest)
U_CAST = {torch.float32: U32, torch.float16: 2.0**-11, torch.bfloat16: U_BF16}


def gamma(n: int) -> float:
    return _gamma(n)


def rho(j: int, n: int) -> float:
    """Relative error bound of a term through j bf16 and n fp32 roundings."""
    return (1 + U_BF16) ** j * (1 + gamma(n)) - 1


def bf16_oracle(p: dict) -> dict:
    """{name: (fp64 value, tolerance)} for the CPU bf16 mode, same keys as ``oracle``."""
    ref = oracle(p, p["x"].dtype, rounds_operands=False)
    dt = p["x"].dtype
    u_out = U_CAST[dt]
    x, a, b, dy, s = _d(p["x"]), _d(p["a"]), _d(p["b"]), _d(p["dy"]), p["scaling"]
    w = p["w"]
    m, k = x.shape
    n, r = b.shape
    f64 = dict(dtype=torch.float64, device=x.device)
    rs = _d(p["rank_scale"]).abs() if p["rank_scale"] is not None else torch.ones(r, **f64)
    os_ = _d(p["out_scale"]).abs() if p["out_scale"] is not None else torch.ones(n, **f64)
    bias = _d(p["bias"]).abs() if p["bias"] is not None else torch.zeros(n, **f64)
    ax, aa, ab, aw, ady = x.abs(), a.abs(), b.abs(), w.abs(), dy.abs() * os_

    def out(value, err):
        return value, err * (1 + u_out) + u_out * value.abs()

    h = cpu_gemv_roundings(k, p["state"].blocksize) + 1
    s_y = ax @ aw.T + (s * (ax @ aa.T) * rs) @ ab.T
    # AMX's flushes (F above): x @ W^T, x @ A^T (reaching y through s rs |B|), dy' @ W,
    # g = dy' @ B (reaching dx and dA through s rs), gs @ A, gs^T x, dy'^T xs
    sx, sgs = ax.sum(1, keepdim=True), s * (ady @ ab) * rs
    f_xa = flush_bound(sx, aa.sum(1)[None, :], k)
    f_g = flush_bound(ady.sum(1, keepdim=True), ab.sum(0)[None, :], n)
    f_y = flush_bound(sx, aw.sum(1)[None, :], k) + (s * f_xa * rs) @ ab.T
    f_dx = (
        flush_bound(ady.sum(1, keepdim=True), aw.sum(0)[None, :], n)
        + flush_bound(sgs.sum(1, keepdim=True), aa.sum(0)[None, :], r)
        + (s * f_g * rs) @ aa
    )
    xs = s * (ax @ aa.T) * rs
    f_da = flush_bound(sgs.sum(0)[:, None], ax.sum(0)[None, :], m) + (s * f_g * rs).T @ ax
    f_db = flush_bound(ady.sum(0)[:, None], xs.sum(0)[None, :], m) + ady.T @ (s * f_xa * rs)
    err_y = os_ * ((1 + rho(3, k + h + r + 5)) * f_y + rho(3, k + h + r + 5) * s_y + gamma(3) * bias)
    err_xa = rho(3, k) * (ax @ aa.T) + (1 + rho(3, k)) * f_xa
    s_g = ady @ ab
    s_dx = ady @ aw + (s * s_g * rs) @ aa
    err_dx = rho(6, 2 * n + r + 4) * s_dx + (1 + rho(6, 2 * n + r + 4)) * f_dx
    err_da = rho(6, n + m + 3) * ((s * s_g * rs).T @ ax) + (1 + rho(6, n + m + 3)) * f_da
    err_db = rho(6, k + m + 4) * (ady.T @ xs) + (1 + rho(6, k + m + 4)) * f_db
    err_dbias = gamma(m + 1) * ady.sum(0)
    return {
        "y": out(ref["y"][0], err_y),
        "xa": out(ref["xa"][0], err_xa),
        "dx": out(ref["dx"][0], err_dx),
        "dA": out(ref["dA"][0], err_da),
        "dB": out(ref["dB"][0], err_db),
        "dbias": out(ref["dbias"][0], err_dbias),
    }


def cpu_computes_bf16(backend: str, x: torch.Tensor, n: int = 0) -> bool:
    """Whether qlora_linear on ``backend`` ("auto": the default for x's device) runs the CPU
    backend's bf16 mode for this x (qpeft/backends/cpu/capability.py) on a layer of ``n``
    outputs (fp32 x takes it only for some shapes, and only where torch's fp32 matmul
    setting allows bf16; n = 0: not known, taken as a shape that stays fp32)."""
    if not (backend == "cpu" or (backend == "auto" and x.device.type == "cpu")):
        return False
    from .backends.cpu import qlora

    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    return qlora._compute_dtype(x2, n, x.shape[-1]) == torch.bfloat16


def backend_oracle(p: dict, backend: str) -> dict:
    """``oracle`` with the bounds of what ``backend`` computes: operands rounded (Triton, CUDA C++),
    the CPU backend's bf16 mode (``bf16_oracle``, needs p["state"]), else fp32."""
    if cpu_computes_bf16(backend, p["x"], p["w"].shape[0]):
        return bf16_oracle(p)
    # Triton and the CUDA C++ GEMM (csrc/cuda/qlora_gemm.cu) round W, t and dy' to x's dtype
    return oracle(p, p["x"].dtype, rounds_operands=backend in ("triton", "cuda", "cuda_emulated"))


def gemv_tolerance(backend: str, x: torch.Tensor, w_deq: torch.Tensor, dtype: torch.dtype, blocksize: int):
    """Each backend's bound of ``gemv_4bit`` against the exact product x @ w_deq^T."""
    k = x.shape[1]
    if backend == "cpu":
        return cpu_gemv_bound(x, w_deq, dtype, blocksize)
    if backend in ("cuda", "cuda_emulated"):  # csrc/cuda/gemv_4bit.cu, on a GPU or emulated
        return gemv_bound(x, w_deq, dtype, cuda_gemv_roundings(k))
    return gemv_bound(x, w_deq, dtype, k)  # torch's matmul: summation order unknown, depth <= K


GEMV_MAX_ROWS = 8  # qpeft.functional.gemv_4bit takes 1 to 8 rows of x


def qlora_linear_results(p: dict, backend: str) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """qlora_linear forward and every gradient, run on ``backend``: ``[(name, got, want, tol)]``
    for y, dx, dA, dB (and dbias), ``want``/``tol`` the fp64 oracle's values and bounds.

    Triton rounds its operands to the activation dtype before its dots (``rounds_operands``);
    the reference and the CPU backend compute in fp32 from the exactly decoded W. The CPU
    backend may run x @ W^T through its C++ GEMV for 1 to 8 rows: summation depth
    cpu_gemv_roundings(K, blocksize) and one more rounding from factoring each block's absmax
    out (see cpu_gemv_roundings), added to the bound of y. Where the CPU backend computes in
    bf16 (CPUs with bf16 dot products), its own bounds apply (``bf16_oracle``).
    """
    from . import use_backend
    from .functional import qlora_linear

    dt = p["x"].dtype
    x = p["x"].clone().requires_grad_()
    a = p["a"].clone().requires_grad_()
    b = p["b"].clone().requires_grad_()
    bias = p["bias"].clone().requires_grad_() if p["bias"] is not None else None
    with use_backend(backend):
        y = qlora_linear(
            x,
            p["packed"],
            p["state"],
            a,
            b,
            p["scaling"],
            bias,
            rank_scale=p["rank_scale"],
            out_scale=p["out_scale"],
        )
        y.backward(p["dy"])
    cpu_bf16 = cpu_computes_bf16(backend, p["x"], p["w"].shape[0])
    ref = backend_oracle(p, backend)
    y_want, tol_y = ref["y"]
    m, k = p["x"].shape
    if backend == "cpu" and m <= GEMV_MAX_ROWS and not cpu_bf16:
        depth = cpu_gemv_roundings(k, p["state"].blocksize) + 1
        s_base = p["x"].double().abs() @ p["w"].abs().T
        os_ = p["out_scale"].double().abs() if p["out_scale"] is not None else 1.0
        tol_y = tol_y + os_ * depth * U32 * s_base * 1.01  # 1.01: gamma_h vs h*u at these h
    if y.dtype != dt:
        raise AssertionError(f"{backend} y: dtype {y.dtype}, expected {dt}")
    out = [
        ("y", y.detach(), y_want, tol_y),
        ("dx", x.grad, *ref["dx"]),
        ("dA", a.grad, *ref["dA"]),
        ("dB", b.grad, *ref["dB"]),
    ]
    if bias is not None:
        out.append(("dbias", bias.grad, *ref["dbias"]))
    return out


# --- optimizer steps ------------------------------------------------------------------------
# The step ops (adamw32_step_, adamw8bit_step_, lion32_step_, lion8bit_step_) of every backend
# compute the per-element math of csrc/include/qpeft/optim.h, which the reference mirrors in
# fp32 with the same operation order (qpeft/backends/default/optim.py), and the CUDA build uses
# --fmad=false: bound 0, bit for bit (tests/test_optim.py).
OPTIM_STEP_ATOL = 0.0
# The optimizer classes over several steps on another device against the reference on CPU
# (tests/test_device_training.py): 32-bit state is the same fp32 update, fma contraction in
# torch's own elementwise kernels apart (rtol 1e-5 covers a few ulps per step); an 8-bit state's
# requantized moment may land one code apart (a tie decided by the last fp32 bit), moving an
# element by a fraction of lr=1e-2 over three steps (atol 2e-3).
OPTIM_CLASS_RTOL = 1e-5
OPTIM_CLASS_ATOL = {"32bit": 1e-5, "8bit": 2e-3}
