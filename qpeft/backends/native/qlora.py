"""The fused QLoRA GEMM (``qpeft::qlora_linear`` and ``qpeft::qlora_linear_backward``) of the
CUDA modules: ``qpeft._C_cuda`` on CUDA tensors and ``qpeft._C_cuda_emu`` (the same kernels,
emulated) on CPU tensors (ABI: csrc/cuda/ops.h).

What runs where, as the Triton backend splits it (qpeft/backends/triton/qlora.py):

* the kernels: the forward (y, and xa when asked for) and dx of the backward (which also
  returns g = dy' @ B when dA is needed). Two of them, and W is decoded tile by tile inside
  either, never written out (docs/design.md, "CUDA C++ QLoRA GEMM"):
  - the tensor-core kernel (csrc/cuda/qlora_gemm.cu; qlora_forward / qlora_dx): fp16 and
    bf16 activations on sm_80+ (mma.m16n8k16, cp.async), LoRA ranks up to
    ``qlora_max_rank`` (4096; ranks above 64 run as chunks of 64, one more pass over the
    activations per chunk);
  - the SIMT kernel (csrc/cuda/qlora_simt.cu; qlora_simt_forward / qlora_simt_dx) for the
    rest: fp32 activations (IEEE fp32 FMAs, fp32 accumulation), fp64 (fp64 FMAs: the
    gradcheck path), fp16/bf16 on GPUs below sm_80 (widened to fp32; the tensor-core
    kernel is compiled there as a trap only) and ranks above ``qlora_max_rank``
    (``FORCE_SIMT`` sends fp16/bf16 there too, for tests);
* torch: dy' = dy * out_scale (in the compute dtype, rounded to x's dtype: the kernel's
  operand), dA = (s * g * rank_scale)^T @ x, dB = dy'^T @ (s * xa * rank_scale), dbias =
  sum(dy'), rank-r products torch's matmul does well (on a GPU in the activation dtype with
  fp32 accumulation for fp16/bf16, else in the compute dtype: fp32, or fp64 for fp64);
* the reference (qpeft/backends/default/qlora.py) only for an empty W (N or K = 0: nothing
  to decode, so the reference materialises nothing).

lora_A/lora_B are cast to x's dtype (the Triton kernel casts its tiles the same way);
bias, rank_scale and out_scale travel in the compute dtype (fp32; fp64 for fp64 x). The
tensor-core kernel's split schedule for small M is chosen here (``plan_split``: the
kernel's host side may not query the device).

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
from ..._formats import QUANT_TYPE_IDS
from ..default import qlora as reference

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)  # the tensor-core kernel's
# The SIMT kernel's dtype codes: csrc/include/qpeft/format.h's DType, and kQloraF64 (csrc/cuda/ops.h).
SIMT_DTYPE_IDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
FORCE_SIMT = False  # tests: fp16/bf16 through the SIMT kernel, as on a GPU below sm_80
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


def _compute_dtype(dt: torch.dtype) -> torch.dtype:
    return torch.float64 if dt == torch.float64 else torch.float32


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype).contiguous()


def kernels(module: Callable[[], ModuleType], extra_args: Callable[[torch.device], tuple]) -> KernelTable:
    kernel = KernelTable()

    def route(x: torch.Tensor, lora_a: torch.Tensor | None, n: int, k: int) -> str:
        """ "mma" (csrc/cuda/qlora_gemm.cu), "simt" (csrc/cuda/qlora_simt.cu) or "reference"."""
        if n == 0 or k == 0:
            return "reference"
        r = 0 if lora_a is None else lora_a.shape[0]
        if (
            not FORCE_SIMT
            and x.dtype in _KERNEL_DTYPES
            and r <= module().qlora_max_rank
            and _has_mma(x.device)
        ):
            return "mma"
        return "simt" if x.dtype in SIMT_DTYPE_IDS else "reference"

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
        path = route(x, lora_a, n, k)
        if path == "reference":
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
        dt = x.dtype
        cdt = _compute_dtype(dt)
        a, b, r = lora(lora_a, lora_b, dt)
        rs, bias_c, os_c = _cast(rank_scale if r else None, cdt), _cast(bias, cdt), _cast(out_scale, cdt)
        y = torch.empty((m, n), dtype=dt, device=x.device)
        xa = torch.empty((m, r) if return_xa and r else (0,), dtype=dt, device=x.device)
        qargs, qrest, _keep = _quant_args(
            packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type
        )
        head = (x.data_ptr(), SIMT_DTYPE_IDS[dt], x.numel(), m, k, *qargs, n, *qrest, *_ptr(a), *_ptr(b), r)
        tail = (float(scaling), *_ptr(rs), *_ptr(bias_c), *_ptr(os_c), y.data_ptr(), y.numel())
        if path == "simt":
            # L = x @ A^T goes to xa's buffer when x's dtype is the compute dtype, else to its own
            lbuf = xa if xa.numel() and dt == cdt else torch.empty((m, r), dtype=cdt, device=x.device)
            side = (0, 0) if lbuf is xa or not xa.numel() else _ptr(xa)
            with on_device(x.device):
                module().qlora_simt_forward(*head, *tail, *side, *_ptr(lbuf), *extra_args(x.device))
            return y, xa
        split = plan_split(m, n, k, x.device)
        ws = workspace(m, n, r, split, x.device)
        with on_device(x.device):
            module().qlora_forward(
                *head,
                *tail,
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
        path = route(x, lora_a, n, k)
        if path == "reference":
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
        cdt = _compute_dtype(dt)
        m = x.shape[0]
        dy = grad_y.to(dt)
        if out_scale is not None:
            dy = (dy.to(cdt) * out_scale.to(cdt)).to(dt)  # dy' in the kernel's operand dtype
        dy = dy.contiguous()
        dx, da, db, dbias = (x.new_empty((0,)) for _ in range(4))  # distinct: outputs must not alias
        a, b, r = lora(lora_a, lora_b, dt)
        rs = _cast(rank_scale if r else None, cdt)
        g = None
        if need_dx:
            dx = torch.empty((m, k), dtype=dt, device=x.device)
            qargs, qrest, _keep = _quant_args(
                packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type
            )
            head = (
                dy.data_ptr(),
                SIMT_DTYPE_IDS[dt],
                dy.numel(),
                m,
                k,
                *qargs,
                n,
                *qrest,
                *_ptr(a),
                *_ptr(b),
                r,
            )
            if path == "simt":  # g = dy' @ B (in cdt) is the kernel's own buffer: always there
                g = torch.empty((m, r), dtype=cdt, device=x.device) if r else None
                with on_device(x.device):
                    module().qlora_simt_dx(
                        *head,
                        float(scaling),
                        *_ptr(rs),
                        dx.data_ptr(),
                        dx.numel(),
                        *_ptr(g),
                        *extra_args(x.device),
                    )
            else:
                g = torch.empty((m, r), dtype=torch.float32, device=x.device) if need_da and r else None
                split = plan_split(m, k, n, x.device)
                ws = workspace(m, k, r, split, x.device)
                with on_device(x.device):
                    module().qlora_dx(
                        *head,
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
                g = _matmul(dy, b, dt, cdt)
            gs = g * scaling if rs is None else g * scaling * rs
            da = _matmul(gs.T, x, dt, lora_a.dtype)
        if need_db:
            xs = xa.to(cdt) * scaling if rs is None else xa.to(cdt) * scaling * rs
            db = _matmul(dy.T, xs, dt, lora_b.dtype)
        if need_dbias:
            dbias = dy.sum(0, dtype=cdt).to(grad_y.dtype)
        return dx, da, db, dbias

    return kernel


def _matmul(a: torch.Tensor, b: torch.Tensor, act_dtype: torch.dtype, out_dtype: torch.dtype) -> torch.Tensor:
    # fp16/bf16 on CUDA: in the activation dtype with fp32 accumulation (cuBLAS); otherwise in
    # the compute dtype (fp32, or fp64 for fp64 activations), as the CPU reference computes.
    cdt = act_dtype if a.is_cuda and act_dtype in _KERNEL_DTYPES else _compute_dtype(act_dtype)
    return (a.to(cdt) @ b.to(cdt)).to(out_dtype)
