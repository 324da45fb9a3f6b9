"""Error bounds of the CPU QLoRA layer's bf16 compute mode against the fp64 oracle.

The bf16 mode (qpeft/backends/cpu/qlora.py, ``_forward_bf16`` / ``_backward_bf16``;
docs/design.md "CPU compute dtype") multiplies bf16 operands in torch's oneDNN GEMM with
fp32 accumulation and rounds each GEMM's result to bf16 once. The oracle
(``_helpers.oracle``) gives the exact fp64 value from the exactly decoded fp32 W; this
module replaces its tolerances.

Derivation. u = 2^-8 is bf16's unit roundoff (8 significant bits, round to nearest even:
torch's casts, the C++ decode to bf16, oneDNN's bf16 outputs all round that way), and
gamma_n = n 2^-24 / (1 - n 2^-24) bounds n fp32 roundings on a path (Higham, Accuracy and
Stability of Numerical Algorithms, 3.1). A product of two bf16 numbers is exact in fp32
(8 + 8 bits < 24), so each term x_k w_k of a dot reaches the result multiplied by
(1 + d) with |d| <= rho(j, n) = (1 + u)^j (1 + gamma_n) - 1, where j counts the bf16
roundings on its path and n the fp32 ones; summed over the terms, the error of a value is
at most rho(j, n) * S, S the same sum over |terms| (the bound holds for any summation
order, so for oneDNN's blocking and for the panel split).

forward y (M > 8: bf16 panels): base term x_k w_nk -- x rounded (1), W decoded to bf16
  (1), fp32 accumulation over K, the GEMM's bf16 output (1): j = 3, n = K. LoRA term
  x_k a_lk s rs_l b_nl -- x (1), A (1), xa's bf16 output (1), then t = xa s rs and t @ B^T
  and the adds of base, bias and out_scale in fp32 (r + 5): j = 3, n = K + r + 5.
  M <= 8 computes base with the fp32 GEMV instead (its depth h, cpu_gemv_roundings + 1,
  and no bf16 rounding), so n = K + h + r + 5 covers both. Then y is rounded to x's dtype:
  + u_out (|y| + err).
dx = dy' W + (s g rs) A, dy' = dy * out_scale: base term -- dy' (1, after one fp32
  product), W (1), fp32 over a panel's rows, the panel product's bf16 output (1), the
  fp32 sum of the panels and the LoRA term (<= N + 1): j = 3. LoRA term -- dy' (1), B (1),
  g's output (1), gs = g s rs rounded (1, after 2 fp32), A (1), gs @ A's output (1): j = 6.
  So j = 6, n = 2N + r + 4 for both, then the cast to x's dtype: + u_out (|dx| + err).
dA = gs^T x: gs's chain (4, N + 2), x (1), fp32 over M, the output (1): j = 6, n = N + M + 3.
dB = dy'^T xs, xs = xa s rs rounded: xa's forward chain (3, K), xs (1, 2), dy' (1),
  fp32 over M, the output (1): j = 6, n = K + M + 4.
dbias = sum_m dy': fp32 throughout, n = M + 1.
A cast of a bf16 result to fp32 is exact; to fp16 it is another rounding (u_out).
"""

from __future__ import annotations

import torch

from ._helpers import U32, cpu_gemv_roundings, oracle

U_BF16 = 2.0**-8
# unit roundoff of the final cast to the activation dtype (round to nearest)
U_CAST = {torch.float32: U32, torch.float16: 2.0**-11, torch.bfloat16: U_BF16}


def gamma(n: int) -> float:
    return n * U32 / (1 - n * U32)


def rho(j: int, n: int) -> float:
    """Relative error bound of a term through j bf16 and n fp32 roundings."""
    return (1 + U_BF16) ** j * (1 + gamma(n)) - 1


def _d(t):
    return None if t is None else t.double()


def bf16_oracle(p: dict) -> dict:
    """{name: (fp64 value, tolerance)} for the CPU bf16 mode, same keys as ``oracle``."""
    ref = oracle(p, p["x"].dtype, rounds_operands=False)
    dt = p["x"].dtype
    u_out = U_CAST[dt]
    x, a, b, dy, s = _d(p["x"]), _d(p["a"]), _d(p["b"]), _d(p["dy"]), p["scaling"]
    w = p["w"]
    m, k = x.shape
    n, r = b.shape
    rs = _d(p["rank_scale"]).abs() if p["rank_scale"] is not None else torch.ones(r, dtype=torch.float64)
    os_ = _d(p["out_scale"]).abs() if p["out_scale"] is not None else torch.ones(n, dtype=torch.float64)
    bias = _d(p["bias"]).abs() if p["bias"] is not None else torch.zeros(n, dtype=torch.float64)
    ax, aa, ab, aw, ady = x.abs(), a.abs(), b.abs(), w.abs(), dy.abs() * os_

    def out(value, err):
        return value, err * (1 + u_out) + u_out * value.abs()

    h = cpu_gemv_roundings(k, p["state"].blocksize) + 1
    s_y = ax @ aw.T + (s * (ax @ aa.T) * rs) @ ab.T
    err_y = os_ * (rho(3, k + h + r + 5) * s_y + gamma(3) * bias)
    err_xa = rho(3, k) * (ax @ aa.T)
    s_g = ady @ ab
    s_dx = ady @ aw + (s * s_g * rs) @ aa
    err_dx = rho(6, 2 * n + r + 4) * s_dx
    err_da = rho(6, n + m + 3) * ((s * s_g * rs).T @ ax)
    err_db = rho(6, k + m + 4) * (ady.T @ (s * (ax @ aa.T) * rs))
    err_dbias = gamma(m + 1) * ady.sum(0)
    return {
        "y": out(ref["y"][0], err_y),
        "xa": out(ref["xa"][0], err_xa),
        "dx": out(ref["dx"][0], err_dx),
        "dA": out(ref["dA"][0], err_da),
        "dB": out(ref["dB"][0], err_db),
        "dbias": out(ref["dbias"][0], err_dbias),
    }
