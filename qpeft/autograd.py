"""autograd Functions over the registered ops (they call only ``torch.ops.qpeft.*``)."""

from __future__ import annotations

import torch

from . import _ops  # noqa: F401  (defines torch.ops.qpeft.*)

__all__ = ["QLoRAFunction"]


class QLoRAFunction(torch.autograd.Function):
    """y = out_scale * (x @ dequant(W)^T + bias + (scaling * (x @ A^T) * rank_scale) @ B^T).

    ``forward(x, lora_A, lora_B, bias, packed, absmax, nested_absmax, nested_code, offset,
    quant, scaling, rank_scale, out_scale)`` with ``quant = (blocksize, nested_blocksize,
    quant_type, out_features, in_features)``; x has any leading batch dims. Gradients
    flow to x, lora_A, lora_B and bias. Saved for the backward: x, A, B, the packed
    weight and its quantization state (never a dequantized W) and xa = x @ A^T (only
    when B needs a gradient). rank_scale and out_scale are constants here.

    Autocast: inside an autocast region x is cast to the region's dtype, as autocast
    casts the input of ``F.linear``, so y comes out in that dtype; the ops themselves
    then run with autocast off, forward and backward. Their kernels choose their
    own compute precision (fp32 accumulation; on CPU fp32 throughout, since the
    reference's fp32 ``F.linear`` would otherwise be autocast to bf16, which CPUs
    without bf16 dot products run about 5x slower than fp32). Gradients flow back
    through the cast, so x.grad has x's original dtype.
    """

    @staticmethod
    def forward(
        ctx,
        x,
        lora_a,
        lora_b,
        bias,
        packed,
        absmax,
        nested_absmax,
        nested_code,
        offset,
        quant,
        scaling,
        rank_scale,
        out_scale,
    ):
        blocksize, nested_blocksize, quant_type, n, k = quant
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            x = x.to(torch.get_autocast_dtype(dev))
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k)
        need_db = ctx.needs_input_grad[2]
        with torch.autocast(dev, enabled=False):
            y, xa = torch.ops.qpeft.qlora_linear(
                x2,
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
                need_db,
            )
        ctx.save_for_backward(
            x2, lora_a, lora_b, packed, absmax, nested_absmax, nested_code, offset, xa, rank_scale, out_scale
        )
        ctx.quant = quant
        ctx.scaling = scaling
        ctx.x_shape = x.shape
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.reshape(*lead, n)

    @staticmethod
    def backward(ctx, grad_y):
        x2, lora_a, lora_b, packed, absmax, nested_absmax, nested_code, offset, xa, rank_scale, out_scale = (
            ctx.saved_tensors
        )
        blocksize, nested_blocksize, quant_type, n, k = ctx.quant
        need_dx, need_da, need_db, need_dbias = ctx.needs_input_grad[:4]
        with torch.autocast(x2.device.type, enabled=False):  # CPU backward runs on the caller's thread
            dx, da, db, dbias = torch.ops.qpeft.qlora_linear_backward(
                grad_y.reshape(-1, n),
                x2,
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
                ctx.scaling,
                rank_scale,
                out_scale,
                need_dx,
                need_da,
                need_db,
                need_dbias,
            )
        return (
            dx.reshape(ctx.x_shape) if need_dx else None,
            da if need_da else None,
            db if need_db else None,
            dbias.to(ctx.bias_dtype) if need_dbias else None,
            *([None] * 9),
        )
