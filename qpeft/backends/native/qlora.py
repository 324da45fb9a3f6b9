"""The fused QLoRA GEMM (``qpeft::qlora_linear`` and ``qpeft::qlora_linear_backward``) of the
CUDA modules: ``qpeft._C_cuda`` on CUDA tensors and ``qpeft._C_cuda_emu`` (the same kernel,
emulated) on CPU tensors (csrc/cuda/qlora_gemm.cu; ABI: csrc/cuda/ops.h, qlora_forward and
qlora_dx).

What runs where, as the Triton backend splits it (qpeft/backends/triton/qlora.py):

* the kernels: the forward (y, and xa when asked for) and dx of the backward (which also
  returns g = dy' @ B in fp32 when dA is needed);
* torch: dy' = dy * out_scale (rounded to x's dtype: the kernel's operand), dA = (s * g *
  rank_scale)^T @ x, dB = dy'^T @ (s * xa * rank_scale), dbias = sum(dy'), rank-r products
  torch's matmul does well (on a GPU in the activation dtype with fp32 accumulation, on the
  CPU in fp32);
* the reference (qpeft/backends/default/qlora.py) for what the kernel does not take: fp32 or
  fp64 activations (the kernel runs fp16/bf16 tensor-core MMAs only; fp32 would need TF32 or
  a different kernel, and the reference is what the CPU backends use for it too), LoRA ranks
  above ``qlora_max_rank`` (4096; ranks above 64 run in the kernel as chunks of 64, one
  more pass over the activations per chunk: docs/design.md, "CUDA C++ QLoRA GEMM"), an
  empty W (N or K = 0: nothing to decode, so the reference materialises nothing), and GPUs
  below sm_80 (no bf16 mma.m16n8k16, no cp.async: the kernel is compiled there as a trap
  only).

lora_A/lora_B are cast to x's dtype (the Triton kernel casts its tiles the same way);
bias, rank_scale and out_scale travel as fp32. The split schedule for small M is chosen
here (``plan_split``: the kernel's host side may not query the device).

M <= 8 does not use the decode GEMV (``gemv_4bit``): the GEMV has no LoRA terms, so it
would need two more launches (x @ A^T and its up-projection) and an add, where the GEMM's
split schedule does all of it in one launch plus the reduce.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType

import torch

from ..._dispatch import KernelTable, on_device
from ..._formats import DTYPE_IDS, QUANT_TYPE_IDS
from ..default import qlora as reference

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
BM, BO, BK = 64, 128, 32  # the kernel's tile: rows, output columns, reduction chunk
SPLIT_MAX_M = BM  # the split schedule serves one row tile
EMULATED_SMS = 4  # the emulated "GPU": few SMs, so that small test shapes take the split path


def _cdiv(a: int, b: int) -> int:
    return -(a // -b)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return EMULATED_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _has_mma(device: torch.device) -> bool:
    """sm_80+ (mma.m16n8k16 in bf16, cp.async); the emulator (CPU tensors) has both."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)


def plan_split(m: int, ocols: int, red: int, device: torch.device) -> int:
    """Splits of the reduction (K, dx: N) for an [m, ocols] output: 1 unless m fits one row
    tile and the output tiles leave SMs idle; then enough for >= 2 blocks per SM, at most
    one split per 4 chunks of 32 and at most red / (16 m) splits (so the fp32 partials,
    split * m * ocols * 8 bytes written and read, stay below the packed W's red * ocols / 2
    bytes), rounded so that no split is empty."""
    if m > SPLIT_MAX_M or m == 0:
        return 1
    tiles = _cdiv(ocols, BO)
    sms = _sm_count(device)
    if tiles >= sms:
        return 1
    chunks = _cdiv(red, BK)
    want = min(_cdiv(2 * sms, tiles), max(1, chunks // 4), max(1, red // (16 * m)), 256)
    return _cdiv(chunks, _cdiv(chunks, want))


def _ptr(t: torch.Tensor | None) -> tuple[int, int]:
    return (0, 0) if t is None else (t.data_ptr(), t.numel())


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


def _quant_args(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type):
    packed = packed.contiguous()
    absmax = absmax.contiguous()
    if nested_absmax is None:
        nested = (0, 0, 0, 0, nested_blocksize)
        keep = (packed, absmax)
    else:
        nested_absmax, nested_code, offset = (t.contiguous() for t in (nested_absmax, nested_code, offset))
        nested = (
            nested_absmax.data_ptr(),
            nested_absmax.numel(),
            nested_code.data_ptr(),
            offset.data_ptr(),
            nested_blocksize,
        )
        keep = (packed, absmax, nested_absmax, nested_code, offset)
    args = (packed.data_ptr(), packed.numel(), absmax.data_ptr(), absmax.numel())
    return args, (blocksize, QUANT_TYPE_IDS[quant_type], *nested), keep


def kernels(module: Callable[[], ModuleType], extra_args: Callable[[torch.device], tuple]) -> KernelTable:
    kernel = KernelTable()

    def takes(x: torch.Tensor, lora_a: torch.Tensor | None, n: int, k: int) -> bool:
        r = 0 if lora_a is None else lora_a.shape[0]
        return (
            x.dtype in _KERNEL_DTYPES
            and r <= module().qlora_max_rank
            and n > 0
            and k > 0
            and _has_mma(x.device)
        )

    def lora(lora_a, lora_b, dt):
        if lora_a is None:
            return None, None, 0
        return lora_a.to(dt).contiguous(), lora_b.to(dt).contiguous(), lora_a.shape[0]

    def workspace(m, ocols, r, split, device):
        if split == 1:
            return None
        return torch.empty(
            module().qlora_workspace_len(m, ocols, r, split), dtype=torch.float32, device=device
        )

    @kernel("qlora_linear")
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
        if not takes(x, lora_a, n, k):
            return reference.qlora_linear(
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
            )
        x = x.contiguous()
        m = x.shape[0]
        a, b, r = lora(lora_a, lora_b, x.dtype)
        rs, bias32, os32 = _f32(rank_scale if r else None), _f32(bias), _f32(out_scale)
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        xa = torch.empty((m, r) if return_xa and r else (0,), dtype=x.dtype, device=x.device)
        qargs, qrest, _keep = _quant_args(
            packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type
        )
        split = plan_split(m, n, k, x.device)
        ws = workspace(m, n, r, split, x.device)
        with on_device(x.device):
            module().qlora_forward(
                x.data_ptr(),
                DTYPE_IDS[x.dtype],
                x.numel(),
                m,
                k,
                *qargs,
                n,
                *qrest,
                *_ptr(a),
                *_ptr(b),
                r,
                float(scaling),
                *_ptr(rs),
                *_ptr(bias32),
                *_ptr(os32),
                y.data_ptr(),
                y.numel(),
                *(_ptr(xa) if xa.numel() else (0, 0)),
                split,
                *_ptr(ws),
                *extra_args(x.device),
            )
        return y, xa

    @kernel("qlora_linear_backward")
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
        if not takes(x, lora_a, n, k):
            return reference.qlora_linear_backward(
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
            )
        if lora_a is None:  # no adapter: no dA/dB (the op's contract); dx is dy' @ W alone
            need_da = need_db = False
        dt = x.dtype
        m = x.shape[0]
        dy = grad_y.to(dt)
        if out_scale is not None:
            dy = (dy.float() * out_scale.float()).to(dt)  # dy' in the kernel's operand dtype
        dy = dy.contiguous()
        dx, da, db, dbias = (x.new_empty((0,)) for _ in range(4))  # distinct: outputs must not alias
        a, b, r = lora(lora_a, lora_b, dt)
        rs = _f32(rank_scale if r else None)
        g = None
        if need_dx:
            dx = torch.empty((m, k), dtype=dt, device=x.device)
            g = torch.empty((m, r), dtype=torch.float32, device=x.device) if need_da and r else None
            qargs, qrest, _keep = _quant_args(
                packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type
            )
            split = plan_split(m, k, n, x.device)
            ws = workspace(m, k, r, split, x.device)
            with on_device(x.device):
                module().qlora_dx(
                    dy.data_ptr(),
                    DTYPE_IDS[dt],
                    dy.numel(),
                    m,
                    k,
                    *qargs,
                    n,
                    *qrest,
                    *_ptr(a),
                    *_ptr(b),
                    r,
                    float(scaling),
                    *_ptr(rs),
                    dx.data_ptr(),
                    dx.numel(),
                    *_ptr(g),
                    split,
                    *_ptr(ws),
                    *extra_args(x.device),
                )
        if need_da:
            if g is None:
                g = _matmul(dy, b, dt, torch.float32)
            gs = g * scaling if rs is None else g * scaling * rs
            da = _matmul(gs.T, x, dt, lora_a.dtype)
        if need_db:
            xs = xa.float() * scaling if rs is None else xa.float() * scaling * rs
            db = _matmul(dy.T, xs, dt, lora_b.dtype)
        if need_dbias:
            dbias = dy.sum(0, dtype=torch.float32).to(grad_y.dtype)
        return dx, da, db, dbias

    return kernel


def _matmul(a: torch.Tensor, b: torch.Tensor, act_dtype: torch.dtype, out_dtype: torch.dtype) -> torch.Tensor:
    # On CUDA in the activation dtype with fp32 accumulation (cuBLAS); on the CPU (the
    # emulated backend) in fp32, as the CPU reference computes.
    cdt = act_dtype if a.is_cuda else torch.float32
    return (a.to(cdt) @ b.to(cdt)).to(out_dtype)
