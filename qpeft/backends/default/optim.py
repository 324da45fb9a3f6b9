"""The pure-torch reference of the optimizer step ops: the oracle of every test.

One torch op per fp32 rounding step, in the order of csrc/include/qpeft/optim.h
(which the CPU and CUDA kernels share), so the native kernels equal this bit for
bit. Only single binary/unary elementwise ops are used: lerp/addcmul/addcdiv
would let ATen's vectorised kernels fuse a multiply-add. Scalars are fp32
tensors on the data's device (a Python scalar could be turned into a reciprocal
multiply by some backends).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import _checks
from ..._optim_math import STATE_BLOCK, AdamScalars, LionScalars, adam_scalars, lion_scalars

STEP_OPS = (
    "adamw32_step_",
    "adamw8bit_step_",
    "lion32_step_",
    "lion8bit_step_",
    "adamw32_multi_step_",
    "adamw8bit_multi_step_",
    "lion32_multi_step_",
    "lion8bit_multi_step_",
)


def _scalar(x: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32, device=like.device)


def sqrt_rn(v: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 sqrt (IEEE sqrtf, what the kernels compute).

    torch.sqrt on CPU is not: torch 2.13 here differs from sqrtf in ~0.7% of random
    inputs, by one ulp. So: the fp64 root rounded to fp32, then moved by one ulp if
    v lies outside the square of the interval that rounds to it. The midpoints of
    adjacent fp32 values have 25 significant bits, so their squares (50 bits) are
    exact in fp64, and v (24 bits) never equals one: the test decides exactly.
    """
    r = torch.sqrt(v.double()).float()
    vd = v.double()
    pos = (r > 0) & torch.isfinite(r)
    up = torch.nextafter(r, torch.full_like(r, float("inf")))
    down = torch.nextafter(r, torch.zeros_like(r))
    mid_up = (r.double() + up.double()) / 2
    mid_down = (r.double() + down.double()) / 2
    r = torch.where(pos & (vd > mid_up * mid_up), up, r)
    return torch.where(pos & (vd < mid_down * mid_down), down, r)


def adam_math(p, g, m, v, s: AdamScalars):
    """One AdamW update of fp32 tensors (optim.h: adam_update); returns new (p, m, v)."""
    c = lambda x: _scalar(x, p)
    p = p * c(s.decay)
    d = g - m
    m = g - d * c(s.lerp_c) if s.lerp_from_grad else m + c(s.lerp_c) * d
    v = v * c(s.beta2) + (c(s.omb2) * g) * g
    denom = sqrt_rn(v) / c(s.bc2_sqrt) + c(s.eps)
    p = p + (c(s.neg_step) * m) / denom
    return p, m, v


def lion_math(p, g, m, s: LionScalars):
    """One Lion update of fp32 tensors (optim.h: lion_update); returns new (p, m)."""
    c = lambda x: _scalar(x, p)
    p = p * c(s.decay)
    u = m * c(s.beta1) + g * c(s.omb1)
    sign = torch.where(u > 0, c(1.0), torch.where(u < 0, c(-1.0), u))  # keeps NaN and signed zeros
    p = p + c(s.neg_lr) * sign
    m = m * c(s.beta2) + g * c(s.omb2)
    return p, m


# --- 8-bit state -----------------------------------------------------------------------


def _blockify(flat: torch.Tensor) -> torch.Tensor:
    return F.pad(flat, (0, -flat.numel() % STATE_BLOCK)).view(-1, STATE_BLOCK)


def dequantize_state(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """code[q] * absmax[block] in fp32, flat."""
    n = q.numel()
    values = _blockify(code[q.reshape(-1).long()])
    return (values * absmax[:, None]).reshape(-1)[:n]


def quantize_state(x: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-code 8-bit blockwise quantization of flat fp32 ``x`` (optim.h: state_encode):
    with a map of no negative code (the second moment's), a positive value never takes the
    zero code (the midpoint above 0 is 0; optim.h, state_zero_mid, says why)."""
    n = x.numel()
    blocks = _blockify(x)
    absmax = blocks.abs().amax(dim=1)  # NaN propagates; the zero padding never raises it
    absmax = torch.where(torch.isnan(absmax), float("nan"), absmax)  # the canonical NaN 0x7fc00000
    inv = torch.where(absmax > 0, torch.div(torch.ones_like(absmax), absmax), torch.zeros_like(absmax))
    v = (blocks * inv[:, None]).clamp(-1.0, 1.0).reshape(-1)[:n]
    mid = (code[:-1] + code[1:]) / 2
    if code[0] >= 0:
        mid = torch.where((code[:-1] == 0) & (code[1:] > 0), 0.0, mid)
    q = torch.searchsorted(mid, v.contiguous(), side="left")  # #{k : mid[k] < v}
    q = torch.where(torch.isnan(v), 0, q)
    return q.to(torch.uint8), absmax


# --- registered kernels -------------------------------------------------------------------


def _load(param: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return param.reshape(-1).float(), grad.reshape(-1).float()


def adamw32_step_(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step):
    _checks.adamw32(param, grad, exp_avg, exp_avg_sq)
    s = adam_scalars(lr, beta1, beta2, eps, weight_decay, step)
    p, g = _load(param, grad)
    p, m, v = adam_math(p, g, exp_avg.reshape(-1), exp_avg_sq.reshape(-1), s)
    param.copy_(p.view(param.shape))
    exp_avg.copy_(m.view(exp_avg.shape))
    exp_avg_sq.copy_(v.view(exp_avg_sq.shape))


def adamw8bit_step_(
    param,
    grad,
    exp_avg_q,
    exp_avg_absmax,
    exp_avg_sq_q,
    exp_avg_sq_absmax,
    qmap_signed,
    qmap_unsigned,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    step,
):
    _checks.adamw8bit(
        param, grad, exp_avg_q, exp_avg_absmax, exp_avg_sq_q, exp_avg_sq_absmax, qmap_signed, qmap_unsigned
    )
    _checks.qmap_sorted(qmap_signed, "qmap_signed")
    _checks.qmap_sorted(qmap_unsigned, "qmap_unsigned")
    s = adam_scalars(lr, beta1, beta2, eps, weight_decay, step)
    p, g = _load(param, grad)
    m = dequantize_state(exp_avg_q, exp_avg_absmax, qmap_signed)
    v = dequantize_state(exp_avg_sq_q, exp_avg_sq_absmax, qmap_unsigned)
    p, m, v = adam_math(p, g, m, v, s)
    param.copy_(p.view(param.shape))
    for q_out, absmax_out, x, code in (
        (exp_avg_q, exp_avg_absmax, m, qmap_signed),
        (exp_avg_sq_q, exp_avg_sq_absmax, v, qmap_unsigned),
    ):
        q, absmax = quantize_state(x, code)
        q_out.copy_(q.view(q_out.shape))
        absmax_out.copy_(absmax.view(absmax_out.shape))


def lion32_step_(param, grad, exp_avg, lr, beta1, beta2, weight_decay):
    _checks.lion32(param, grad, exp_avg)
    s = lion_scalars(lr, beta1, beta2, weight_decay)
    p, g = _load(param, grad)
    p, m = lion_math(p, g, exp_avg.reshape(-1), s)
    param.copy_(p.view(param.shape))
    exp_avg.copy_(m.view(exp_avg.shape))


def lion8bit_step_(param, grad, exp_avg_q, exp_avg_absmax, qmap_signed, lr, beta1, beta2, weight_decay):
    _checks.lion8bit(param, grad, exp_avg_q, exp_avg_absmax, qmap_signed)
    _checks.qmap_sorted(qmap_signed, "qmap_signed")
    s = lion_scalars(lr, beta1, beta2, weight_decay)
    p, g = _load(param, grad)
    m = dequantize_state(exp_avg_q, exp_avg_absmax, qmap_signed)
    p, m = lion_math(p, g, m, s)
    param.copy_(p.view(param.shape))
    q, absmax = quantize_state(m, qmap_signed)
    exp_avg_q.copy_(q.view(exp_avg_q.shape))
    exp_avg_absmax.copy_(absmax.view(exp_avg_absmax.shape))


# --- multi-tensor ops: the single-tensor reference on each --------------------------------


def adamw32_multi_step_(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, steps):
    _checks.lists(
        ("params", params),
        ("grads", grads),
        ("exp_avgs", exp_avgs),
        ("exp_avg_sqs", exp_avg_sqs),
        ("steps", steps),
    )
    _checks.one_device(params, grads, exp_avgs, exp_avg_sqs)
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        adamw32_step_(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step)


def adamw8bit_multi_step_(
    params,
    grads,
    exp_avg_qs,
    exp_avg_absmaxes,
    exp_avg_sq_qs,
    exp_avg_sq_absmaxes,
    qmap_signed,
    qmap_unsigned,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    steps,
):
    _checks.lists(
        ("params", params),
        ("grads", grads),
        ("exp_avg_qs", exp_avg_qs),
        ("exp_avg_absmaxes", exp_avg_absmaxes),
        ("exp_avg_sq_qs", exp_avg_sq_qs),
        ("exp_avg_sq_absmaxes", exp_avg_sq_absmaxes),
        ("steps", steps),
    )
    _checks.one_device(params, grads, exp_avg_qs, exp_avg_absmaxes, exp_avg_sq_qs, exp_avg_sq_absmaxes)
    for p, g, q1, a1, q2, a2, step in zip(
        params, grads, exp_avg_qs, exp_avg_absmaxes, exp_avg_sq_qs, exp_avg_sq_absmaxes, steps
    ):
        adamw8bit_step_(
            p, g, q1, a1, q2, a2, qmap_signed, qmap_unsigned, lr, beta1, beta2, eps, weight_decay, step
        )


def lion32_multi_step_(params, grads, exp_avgs, lr, beta1, beta2, weight_decay):
    _checks.lists(("params", params), ("grads", grads), ("exp_avgs", exp_avgs))
    _checks.one_device(params, grads, exp_avgs)
    for p, g, m in zip(params, grads, exp_avgs):
        lion32_step_(p, g, m, lr, beta1, beta2, weight_decay)


def lion8bit_multi_step_(
    params, grads, exp_avg_qs, exp_avg_absmaxes, qmap_signed, lr, beta1, beta2, weight_decay
):
    _checks.lists(
        ("params", params),
        ("grads", grads),
        ("exp_avg_qs", exp_avg_qs),
        ("exp_avg_absmaxes", exp_avg_absmaxes),
    )
    _checks.one_device(params, grads, exp_avg_qs, exp_avg_absmaxes)
    for p, g, q1, a1 in zip(params, grads, exp_avg_qs, exp_avg_absmaxes):
        lion8bit_step_(p, g, q1, a1, qmap_signed, lr, beta1, beta2, weight_decay)
