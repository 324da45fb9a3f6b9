"""Pure-torch reference of the fused QLoRA linear (``qpeft::qlora_linear`` and its backward).

W is dequantized to fp32 with ``torch.ops.qpeft.dequantize_4bit(_nested)`` (exact: the
decoded values are fp32 products), every matmul runs in fp32, and the results are cast
to the dtypes of x / A / B at the end. float64 x/A/B compute in float64, so
``torch.autograd.gradcheck`` can run through this path. The argument checks here are
shared with the Triton kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import _validate
from ..._registry import register_kernel

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _shape(t: torch.Tensor, name: str, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def validate(
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
    bias,
    rank_scale,
    out_scale,
) -> None:
    """Checks shared by every kernel of qlora_linear / qlora_linear_backward (x: [M, K])."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, in_features], got shape {tuple(x.shape)}")
    _float(x, "x")
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} features but the weight has in_features={k}")
    nested = (nested_absmax, nested_code, offset)
    if any(t is None for t in nested) and not all(t is None for t in nested):
        raise ValueError("double quantization needs nested_absmax, nested_code and offset together")
    if nested_absmax is None:
        _validate.dequantize_4bit(packed, absmax, blocksize, quant_type, [n, k], torch.float32)
    else:
        _validate.dequantize_4bit_nested(
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
    if lora_a.dim() != 2 or lora_a.shape[1] != k or lora_a.shape[0] < 1:
        raise ValueError(f"lora_A must be [r, in_features={k}] with r >= 1, got {tuple(lora_a.shape)}")
    r = lora_a.shape[0]
    if lora_b.dim() != 2 or tuple(lora_b.shape) != (n, r):
        raise ValueError(
            f"lora_B must be [out_features={n}, r={r}] (r from lora_A), got {tuple(lora_b.shape)}"
        )
    _float(lora_a, "lora_A")
    _float(lora_b, "lora_B")
    named = [("x", x), ("packed", packed), ("absmax", absmax), ("lora_A", lora_a), ("lora_B", lora_b)]
    for name, t, shape in (
        ("bias", bias, (n,)),
        ("rank_scale", rank_scale, (r,)),
        ("out_scale", out_scale, (n,)),
    ):
        if t is not None:
            _float(t, name)
            _shape(t, name, shape)
            named.append((name, t))
    _validate.same_device(*named)


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


@register_kernel("qlora_linear", "default")
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
    validate(
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
        bias,
        rank_scale,
        out_scale,
    )
    cdt = _compute_dtype(x)
    w = dequantize_weight(
        packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, n, k
    ).to(cdt)
    xc = x.to(cdt)
    xa = F.linear(xc, lora_a.to(cdt))
    t = xa * scaling
    if rank_scale is not None:
        t = t * rank_scale.to(cdt)
    y = F.linear(xc, w) + F.linear(t, lora_b.to(cdt))
    if bias is not None:
        y = y + bias.to(cdt)
    if out_scale is not None:
        y = y * out_scale.to(cdt)
    return y.to(x.dtype), (xa.to(x.dtype) if return_xa else x.new_empty((0,)))


@register_kernel("qlora_linear_backward", "default")
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
    validate(
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
        None,
        rank_scale,
        out_scale,
    )
    check_backward(grad_y, x, xa, lora_a, n, need_db)

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
    by every torch-level backend."""
    cdt = _compute_dtype(x)
    dy = grad_y.to(cdt)
    if out_scale is not None:
        dy = dy * out_scale.to(cdt)
    rs = _opt(rank_scale, cdt)
    a, b = lora_a.to(cdt), lora_b.to(cdt)
    dx, da, db, dbias = (x.new_empty((0,)) for _ in range(4))  # distinct: outputs must not alias
    if need_dx or need_da:
        g = dy @ b  # [M, r]
        gs = g * scaling if rs is None else g * scaling * rs
        if need_dx:
            dx = gs @ a  # [M, K], then + dy @ W in place
            add_dy_w(dy, dx)
            dx = dx.to(x.dtype)
        if need_da:
            da = (gs.T @ x.to(cdt)).to(lora_a.dtype)
    if need_db:
        xs = xa.to(cdt) * scaling if rs is None else xa.to(cdt) * scaling * rs
        db = (dy.T @ xs).to(lora_b.dtype)
    if need_dbias:
        dbias = dy.sum(0).to(grad_y.dtype)
    return dx, da, db, dbias


def check_backward(grad_y, x, xa, lora_a, n: int, need_db: bool) -> None:
    """Checks of the backward's extra inputs (grad_y [M, N], xa [M, r] when dB is needed)."""
    _float(grad_y, "grad_y")
    _shape(grad_y, "grad_y", (x.shape[0], n))
    _validate.same_device(("x", x), ("grad_y", grad_y), ("xa", xa))
    if need_db:
        _shape(xa, "xa (x @ lora_A^T saved by the forward)", (x.shape[0], lora_a.shape[0]))
