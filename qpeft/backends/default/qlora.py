"""Pure-torch reference of the fused QLoRA linear (``qpeft::qlora_linear`` and its backward).

W is dequantized to fp32 with ``torch.ops.qpeft.dequantize_4bit(_nested)`` (exact: the
decoded values are fp32 products), every matmul runs in fp32, and the results are cast
to the dtypes of x / A / B at the end. float64 x/A/B compute in float64, so
``torch.autograd.gradcheck`` can run through this path. Without an adapter (lora_A and
lora_B None) the LoRA terms are skipped: y = out_scale * (x @ W^T + bias).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dequantize_weight(
    packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, n, k
) -> torch.Tensor:
    """W as fp32 [n, k] through the registered dequantize ops."""
    if nested_absmax is None:
        return torch.ops.qpeft.dequantize_4bit(packed, absmax, blocksize, quant_type, [n, k], torch.float32)
    return torch.ops.qpeft.dequantize_4bit_nested(
        packed,
        absmax,
        nested_absmax,
        nested_code,
        offset,
        blocksize,
        nested_blocksize,
        quant_type,
        [n, k],
        torch.float32,
    )


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _opt(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def qlora_linear(
    x,
    packed,
    absmax,
    nested_absmax,
    nested_code,
    offset,
    blocksize,
    nested_blocksize,
    quant_type,
    n,
    k,
    lora_a,
    lora_b,
    scaling,
    bias,
    rank_scale,
    out_scale,
    return_xa,
):
    cdt = _compute_dtype(x)
    w = dequantize_weight(
        packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, n, k
    ).to(cdt)
    xc = x.to(cdt)
    y = F.linear(xc, w)
    xa = None
    if lora_a is not None:
        xa = F.linear(xc, lora_a.to(cdt))
        t = xa * scaling
        if rank_scale is not None:
            t = t * rank_scale.to(cdt)
        y = y + F.linear(t, lora_b.to(cdt))
    if bias is not None:
        y = y + bias.to(cdt)
    if out_scale is not None:
        y = y * out_scale.to(cdt)
    return y.to(x.dtype), (xa.to(x.dtype) if return_xa and xa is not None else x.new_empty((0,)))


def qlora_linear_backward(
    grad_y,
    x,
    packed,
    absmax,
    nested_absmax,
    nested_code,
    offset,
    blocksize,
    nested_blocksize,
    quant_type,
    n,
    k,
    lora_a,
    lora_b,
    xa,
    scaling,
    rank_scale,
    out_scale,
    need_dx,
    need_da,
    need_db,
    need_dbias,
):

    def add_dy_w(dy, acc):  # acc += dy @ W with all of W decoded
        w = dequantize_weight(
            packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, n, k
        ).to(acc.dtype)
        acc.addmm_(dy, w)

    return backward_from(
        add_dy_w,
        grad_y,
        x,
        lora_a,
        lora_b,
        xa,
        scaling,
        rank_scale,
        out_scale,
        need_dx,
        need_da,
        need_db,
        need_dbias,
    )


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # what ``t.to(dtype)`` returns, without its ~3 us when t already has the dtype (the CPU
    # backend's backward runs through here, on every small layer)
    return t if t.dtype == dtype else t.to(dtype)


def backward_from(
    add_dy_w,
    grad_y,
    x,
    lora_a,
    lora_b,
    xa,
    scaling,
    rank_scale,
    out_scale,
    need_dx,
    need_da,
    need_db,
    need_dbias,
):
    """(dx, dA, dB, dbias) of qlora_linear given the backend's ``add_dy_w(dy, acc)``, which
    adds dy @ W to acc in place: the one term that touches the 4-bit weight. The LoRA
    terms are plain matmuls in the compute dtype (fp32, or fp64 for fp64 inputs), shared
    by every torch-level backend. Without an adapter (lora_A None) dx = dy @ W alone and
    dA/dB are never asked for."""
    cdt = _compute_dtype(x)
    dy = _cast(grad_y, cdt)
    if out_scale is not None:
        dy = dy * _cast(out_scale, cdt)
    dx = da = db = dbias = None  # the ones not computed become empty tensors at the end
    if lora_a is None:
        need_da = need_db = False
        if need_dx:
            # from dy, not x (a stand-in without an adapter): under torch.func.vmap dy is
            # batched, and the in-place add into an unbatched tensor could not be
            dx = dy.new_zeros((x.shape[0], x.shape[1]))
            add_dy_w(dy, dx)
            dx = _cast(dx, x.dtype)
    rs = _opt(rank_scale, cdt)
    if lora_a is not None and (need_dx or need_da):
        a, b = _cast(lora_a, cdt), _cast(lora_b, cdt)
        g = dy @ b  # [M, r]
        gs = g * scaling if rs is None else g * scaling * rs
        if need_dx:
            dx = gs @ a  # [M, K], then + dy @ W in place
            add_dy_w(dy, dx)
            dx = _cast(dx, x.dtype)
        if need_da:
            da = _cast(gs.T @ _cast(x, cdt), lora_a.dtype)
    if need_db:
        xs = _cast(xa, cdt) * scaling if rs is None else _cast(xa, cdt) * scaling * rs
        db = _cast(dy.T @ xs, lora_b.dtype)
    if need_dbias:
        dbias = _cast(dy.sum(0), grad_y.dtype)
    # distinct empty tensors (outputs must not alias), made only for what was not computed
    return tuple(x.new_empty((0,)) if t is None else t for t in (dx, da, db, dbias))
