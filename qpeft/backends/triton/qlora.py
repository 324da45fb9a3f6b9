"""Triton kernels of ``qpeft::qlora_linear`` and ``qpeft::qlora_linear_backward``.

The fused dequant + LoRA GEMMs are in ``qpeft.triton_kernels.qlora``: the forward, and
dx of the backward (which also returns g = dy' @ B). dA and dB are rank-r products
that torch's matmul does well: dA = s * (g * rank_scale)^T @ x, dB = s * dy'^T @ (xa *
rank_scale), dbias = sum(dy'), with dy' = dy * out_scale computed once here because dx,
dB and dbias all use it. Without an adapter (lora_A/lora_B None) the kernels are
launched with HAS_LORA=False, which compiles every LoRA load and dot out. Triton is
imported on the first call, never at registration.
"""

from __future__ import annotations

import functools

import torch

from ..._dispatch import current_backend, kernel_after, on_device
from ..._formats import code4

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernels():
    from ...triton_kernels import qlora  # installed as qpeft.triton_kernels (setup.py package_dir)

    return qlora


def _kernel_dtype(t: torch.Tensor, name: str) -> None:
    if t.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"the Triton kernel takes {name} in fp16, bf16 or fp32, got {t.dtype}")


def _falls_through(op: str, x_at: int, lora_a_at: int):
    """Decorates a kernel entry so that, when the Triton kernels do not take its
    activations (fp64: gradcheck) and the Triton backend was not forced, the call goes to
    the next default backend of the device's order (on CUDA the CUDA C++ module's SIMT
    kernel, which decodes W tile by tile too) with the same arguments. Forced
    (use_backend), the entry's dtype check raises instead. x and lora_A are found at the
    op schema's positions ``x_at`` and ``lora_a_at``."""

    def wrap(fn):
        @functools.wraps(fn)
        def entry(*args):
            x, lora_a = args[x_at], args[lora_a_at]
            if current_backend() is None and (
                x.dtype not in _KERNEL_DTYPES or (lora_a is not None and lora_a.dtype not in _KERNEL_DTYPES)
            ):
                return kernel_after(op, x.device, "triton")(*args)
            return fn(*args)

        return entry

    return wrap


def _dense(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` as the kernels read it: contiguous (they index the weight's codes and
    statistics, bias, rank_scale and out_scale as flat arrays; only x, the LoRA matrices and
    the outputs are read through strides). A copy only for a strided view."""
    return None if t is None else t.contiguous()


def _matmul(a: torch.Tensor, b: torch.Tensor, act_dtype: torch.dtype, out_dtype: torch.dtype) -> torch.Tensor:
    # On CUDA in the activation dtype with fp32 accumulation (cuBLAS); on the CPU (only
    # under the interpreter) in fp32, as the CPU reference computes.
    cdt = act_dtype if a.is_cuda and act_dtype in (torch.float16, torch.bfloat16) else torch.float32
    return (a.to(cdt) @ b.to(cdt)).to(out_dtype)


@_falls_through("qlora_linear", x_at=0, lora_a_at=11)
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
    for name, t in (("x", x), ("lora_A", lora_a), ("lora_B", lora_b)):
        if t is not None:  # no adapter (both None): the kernel compiles the LoRA terms out
            _kernel_dtype(t, name)
    with on_device(x.device):
        return _kernels().qlora_forward(
            x,
            _dense(packed).reshape(-1),
            _dense(absmax),
            _dense(nested_absmax),
            _dense(nested_code),
            _dense(offset),
            code4(quant_type, x.device),
            blocksize,
            nested_blocksize,
            n,
            k,
            lora_a,
            lora_b,
            scaling,
            _dense(bias),
            _dense(rank_scale),
            _dense(out_scale),
            return_xa,
        )


@_falls_through("qlora_linear_backward", x_at=1, lora_a_at=12)
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
    for name, t in (("x", x), ("grad_y", grad_y), ("lora_A", lora_a), ("lora_B", lora_b)):
        if t is not None:
            _kernel_dtype(t, name)
    if lora_a is None:  # no adapter: no dA/dB (the op's contract); dx is dy' @ W alone
        need_da = need_db = False
    dy = grad_y.to(x.dtype)
    if out_scale is not None:
        dy = (dy.float() * out_scale.float()).to(x.dtype)  # dy' in the kernel's operand dtype
    dx, da, db, dbias = (x.new_empty((0,)) for _ in range(4))  # distinct: outputs must not alias
    g = None
    if need_dx:
        with on_device(x.device):
            dx, g = _kernels().qlora_dx(
                dy,
                _dense(packed).reshape(-1),
                _dense(absmax),
                _dense(nested_absmax),
                _dense(nested_code),
                _dense(offset),
                code4(quant_type, x.device),
                blocksize,
                nested_blocksize,
                n,
                k,
                lora_a,
                lora_b,
                scaling,
                _dense(rank_scale),
                return_g=need_da,
            )
    if need_da:
        if g is None:
            g = _matmul(dy, lora_b, x.dtype, torch.float32)
        gs = g * scaling if rank_scale is None else g * scaling * rank_scale.float()
        da = _matmul(gs.T, x, x.dtype, lora_a.dtype)
    if need_db:
        xs = xa.float() * scaling if rank_scale is None else xa.float() * scaling * rank_scale.float()
        db = _matmul(dy.T, xs, x.dtype, lora_b.dtype)
    if need_dbias:
        dbias = dy.sum(0, dtype=torch.float32).to(grad_y.dtype)
    return dx, da, db, dbias
