"""The optimizer step ops on the native modules (``qpeft._C``: trailing thread count;
``qpeft._C_cuda``: trailing stream), over the raw-pointer ABI of csrc/README.md.

Each wrapper validates (qpeft._validate_optim), computes the step's fp32 scalars
once (qpeft._optim_math) and passes pointers, element counts and the scalars. The
gradient may be non-contiguous (it is only read): it is made contiguous first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from types import ModuleType

import torch

from .. import _native, _validate_optim
from .._formats import DTYPE_IDS
from .._optim_math import adam_scalars, lion_scalars
from .._registry import register_kernel


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def register_native_optim(
    backend: str, module: Callable[[], ModuleType], extra_args: Callable[[torch.device], tuple]
) -> None:
    def guard(device: torch.device):
        return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()

    @register_kernel("adamw32_step_", backend)
    def adamw32_step_(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step):
        _validate_optim.adamw32(param, grad, exp_avg, exp_avg_sq)
        s = adam_scalars(lr, beta1, beta2, eps, weight_decay, step)
        grad = grad.contiguous()
        with guard(param.device):
            module().adamw32_step(
                _ptr(param), _ptr(grad), DTYPE_IDS[param.dtype], param.numel(),
                _ptr(exp_avg), exp_avg.numel(), _ptr(exp_avg_sq), exp_avg_sq.numel(), s, *extra_args(param.device),
            )  # fmt: skip

    @register_kernel("adamw8bit_step_", backend)
    def adamw8bit_step_(
        param, grad, exp_avg_q, exp_avg_absmax, exp_avg_sq_q, exp_avg_sq_absmax, qmap_signed, qmap_unsigned,
        lr, beta1, beta2, eps, weight_decay, step,
    ):  # fmt: skip
        _validate_optim.adamw8bit(
            param, grad, exp_avg_q, exp_avg_absmax, exp_avg_sq_q, exp_avg_sq_absmax, qmap_signed, qmap_unsigned
        )
        s = adam_scalars(lr, beta1, beta2, eps, weight_decay, step)
        grad = grad.contiguous()
        qmap_signed, qmap_unsigned = qmap_signed.contiguous(), qmap_unsigned.contiguous()
        with guard(param.device):
            module().adamw8bit_step(
                _ptr(param), _ptr(grad), DTYPE_IDS[param.dtype], param.numel(),
                _ptr(exp_avg_q), exp_avg_q.numel(), _ptr(exp_avg_absmax), exp_avg_absmax.numel(),
                _ptr(exp_avg_sq_q), exp_avg_sq_q.numel(), _ptr(exp_avg_sq_absmax), exp_avg_sq_absmax.numel(),
                _ptr(qmap_signed), _ptr(qmap_unsigned), s, *extra_args(param.device),
            )  # fmt: skip

    @register_kernel("lion32_step_", backend)
    def lion32_step_(param, grad, exp_avg, lr, beta1, beta2, weight_decay):
        _validate_optim.lion32(param, grad, exp_avg)
        s = lion_scalars(lr, beta1, beta2, weight_decay)
        grad = grad.contiguous()
        with guard(param.device):
            module().lion32_step(
                _ptr(param), _ptr(grad), DTYPE_IDS[param.dtype], param.numel(),
                _ptr(exp_avg), exp_avg.numel(), s, *extra_args(param.device),
            )  # fmt: skip

    @register_kernel("lion8bit_step_", backend)
    def lion8bit_step_(param, grad, exp_avg_q, exp_avg_absmax, qmap_signed, lr, beta1, beta2, weight_decay):
        _validate_optim.lion8bit(param, grad, exp_avg_q, exp_avg_absmax, qmap_signed)
        s = lion_scalars(lr, beta1, beta2, weight_decay)
        grad = grad.contiguous()
        qmap_signed = qmap_signed.contiguous()
        with guard(param.device):
            module().lion8bit_step(
                _ptr(param), _ptr(grad), DTYPE_IDS[param.dtype], param.numel(),
                _ptr(exp_avg_q), exp_avg_q.numel(), _ptr(exp_avg_absmax), exp_avg_absmax.numel(),
                _ptr(qmap_signed), s, *extra_args(param.device),
            )  # fmt: skip


    # --- multi-tensor ops ------------------------------------------------------------
    # CPU: one native call (one parallel region) per list. CUDA: one launch per tensor
    # (a list-walking CUDA kernel would save launches; not written yet).
    native_multi = backend == "cpu"

    @register_kernel("adamw32_multi_step_", backend)
    def adamw32_multi_step_(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, steps):
        _validate_optim.lists(("params", params), ("grads", grads), ("exp_avgs", exp_avgs),
                              ("exp_avg_sqs", exp_avg_sqs), ("steps", steps))  # fmt: skip
        if not native_multi:
            for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
                adamw32_step_(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step)
            return
        rows, scalars, keep = [], [], []
        for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
            _validate_optim.adamw32(p, g, m, v)
            g = g.contiguous()
            keep.append(g)
            n = p.numel()
            rows.append((_ptr(p), _ptr(g), DTYPE_IDS[p.dtype], n, _ptr(m), m.numel(), _ptr(v), v.numel()))
            scalars.append(adam_scalars(lr, beta1, beta2, eps, weight_decay, step))
        module().adamw32_multi_step(rows, scalars, *extra_args(params[0].device))

    @register_kernel("adamw8bit_multi_step_", backend)
    def adamw8bit_multi_step_(
        params, grads, exp_avg_qs, exp_avg_absmaxes, exp_avg_sq_qs, exp_avg_sq_absmaxes, qmap_signed, qmap_unsigned,
        lr, beta1, beta2, eps, weight_decay, steps,
    ):  # fmt: skip
        _validate_optim.lists(("params", params), ("grads", grads), ("exp_avg_qs", exp_avg_qs),
                              ("exp_avg_absmaxes", exp_avg_absmaxes), ("exp_avg_sq_qs", exp_avg_sq_qs),
                              ("exp_avg_sq_absmaxes", exp_avg_sq_absmaxes), ("steps", steps))  # fmt: skip
        lists = zip(params, grads, exp_avg_qs, exp_avg_absmaxes, exp_avg_sq_qs, exp_avg_sq_absmaxes, steps)
        if not native_multi:
            for p, g, q1, a1, q2, a2, step in lists:
                adamw8bit_step_(p, g, q1, a1, q2, a2, qmap_signed, qmap_unsigned, lr, beta1, beta2, eps,
                                weight_decay, step)  # fmt: skip
            return
        rows, scalars, keep = [], [], []
        for p, g, q1, a1, q2, a2, step in lists:
            _validate_optim.adamw8bit(p, g, q1, a1, q2, a2, qmap_signed, qmap_unsigned)
            g = g.contiguous()
            keep.append(g)
            rows.append((
                _ptr(p), _ptr(g), DTYPE_IDS[p.dtype], p.numel(), _ptr(q1), q1.numel(), _ptr(a1), a1.numel(),
                _ptr(q2), q2.numel(), _ptr(a2), a2.numel(),
            ))  # fmt: skip
            scalars.append(adam_scalars(lr, beta1, beta2, eps, weight_decay, step))
        qs, qu = qmap_signed.contiguous(), qmap_unsigned.contiguous()
        module().adamw8bit_multi_step(rows, _ptr(qs), _ptr(qu), scalars, *extra_args(params[0].device))

    @register_kernel("lion32_multi_step_", backend)
    def lion32_multi_step_(params, grads, exp_avgs, lr, beta1, beta2, weight_decay):
        _validate_optim.lists(("params", params), ("grads", grads), ("exp_avgs", exp_avgs))
        if not native_multi:
            for p, g, m in zip(params, grads, exp_avgs):
                lion32_step_(p, g, m, lr, beta1, beta2, weight_decay)
            return
        rows, keep = [], []
        for p, g, m in zip(params, grads, exp_avgs):
            _validate_optim.lion32(p, g, m)
            g = g.contiguous()
            keep.append(g)
            rows.append((_ptr(p), _ptr(g), DTYPE_IDS[p.dtype], p.numel(), _ptr(m), m.numel()))
        s = lion_scalars(lr, beta1, beta2, weight_decay)
        module().lion32_multi_step(rows, [s] * len(rows), *extra_args(params[0].device))

    @register_kernel("lion8bit_multi_step_", backend)
    def lion8bit_multi_step_(params, grads, exp_avg_qs, exp_avg_absmaxes, qmap_signed, lr, beta1, beta2, weight_decay):
        _validate_optim.lists(("params", params), ("grads", grads), ("exp_avg_qs", exp_avg_qs),
                              ("exp_avg_absmaxes", exp_avg_absmaxes))  # fmt: skip
        if not native_multi:
            for p, g, q1, a1 in zip(params, grads, exp_avg_qs, exp_avg_absmaxes):
                lion8bit_step_(p, g, q1, a1, qmap_signed, lr, beta1, beta2, weight_decay)
            return
        rows, keep = [], []
        for p, g, q1, a1 in zip(params, grads, exp_avg_qs, exp_avg_absmaxes):
            _validate_optim.lion8bit(p, g, q1, a1, qmap_signed)
            g = g.contiguous()
            keep.append(g)
            rows.append((_ptr(p), _ptr(g), DTYPE_IDS[p.dtype], p.numel(), _ptr(q1), q1.numel(), _ptr(a1), a1.numel()))
        s = lion_scalars(lr, beta1, beta2, weight_decay)
        qs = qmap_signed.contiguous()
        module().lion8bit_multi_step(rows, _ptr(qs), [s] * len(rows), *extra_args(params[0].device))


# Thread count from torch (never oversubscribing its pool); CUDA kernels on torch's current stream.
register_native_optim("cpu", _native.cpu_module, lambda device: (torch.get_num_threads(),))
register_native_optim(
    "cuda", _native.cuda_module, lambda device: (torch.cuda.current_stream(device).cuda_stream,)
)
