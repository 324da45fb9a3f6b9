"""The optimizer step kernels of every native module of the shared ABI (see the package
docstring). Each checks its tensors (qpeft._checks: the step ops are the optimizers'
boundary), computes the step's fp32 scalars once (qpeft._optim_math) and passes
pointers, element counts and the scalars. The gradient may be non-contiguous (it is
only read): it is made contiguous first."""

from __future__ import annotations

from array import array
from collections.abc import Callable
from types import ModuleType

import torch

from ... import _checks
from ..._dispatch import KernelTable, on_device
from ..._formats import DTYPE_IDS
from ..._optim_math import adam_scalars, lion_scalars, state_blocks

CPU = torch.device("cpu")
F32, U8 = torch.float32, torch.uint8


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def kernels(
    module: Callable[[], ModuleType], extra_args: Callable[[torch.device], tuple], *, cpu_lists: bool = False
) -> KernelTable:
    """``cpu_lists``: the multi-tensor ops pass whole lists to the CPU module's list
    entry points (one parallel region per list) instead of one call per tensor."""
    kernel = KernelTable()

    @kernel("adamw32_step_")
    def adamw32_step_(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step):
        _checks.adamw32(param, grad, exp_avg, exp_avg_sq)
        s = adam_scalars(lr, beta1, beta2, eps, weight_decay, step)
        grad = grad.contiguous()
        with on_device(param.device):
            module().adamw32_step(
                _ptr(param),
                _ptr(grad),
                DTYPE_IDS[param.dtype],
                param.numel(),
                _ptr(exp_avg),
                exp_avg.numel(),
                _ptr(exp_avg_sq),
                exp_avg_sq.numel(),
                s,
                *extra_args(param.device),
            )

    @kernel("adamw8bit_step_")
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
            param,
            grad,
            exp_avg_q,
            exp_avg_absmax,
            exp_avg_sq_q,
            exp_avg_sq_absmax,
            qmap_signed,
            qmap_unsigned,
        )
        s = adam_scalars(lr, beta1, beta2, eps, weight_decay, step)
        grad = grad.contiguous()
        qmap_signed, qmap_unsigned = qmap_signed.contiguous(), qmap_unsigned.contiguous()
        with on_device(param.device):
            module().adamw8bit_step(
                _ptr(param),
                _ptr(grad),
                DTYPE_IDS[param.dtype],
                param.numel(),
                _ptr(exp_avg_q),
                exp_avg_q.numel(),
                _ptr(exp_avg_absmax),
                exp_avg_absmax.numel(),
                _ptr(exp_avg_sq_q),
                exp_avg_sq_q.numel(),
                _ptr(exp_avg_sq_absmax),
                exp_avg_sq_absmax.numel(),
                _ptr(qmap_signed),
                _ptr(qmap_unsigned),
                s,
                *extra_args(param.device),
            )

    @kernel("lion32_step_")
    def lion32_step_(param, grad, exp_avg, lr, beta1, beta2, weight_decay):
        _checks.lion32(param, grad, exp_avg)
        s = lion_scalars(lr, beta1, beta2, weight_decay)
        grad = grad.contiguous()
        with on_device(param.device):
            module().lion32_step(
                _ptr(param),
                _ptr(grad),
                DTYPE_IDS[param.dtype],
                param.numel(),
                _ptr(exp_avg),
                exp_avg.numel(),
                s,
                *extra_args(param.device),
            )

    @kernel("lion8bit_step_")
    def lion8bit_step_(param, grad, exp_avg_q, exp_avg_absmax, qmap_signed, lr, beta1, beta2, weight_decay):
        _checks.lion8bit(param, grad, exp_avg_q, exp_avg_absmax, qmap_signed)
        s = lion_scalars(lr, beta1, beta2, weight_decay)
        grad = grad.contiguous()
        qmap_signed = qmap_signed.contiguous()
        with on_device(param.device):
            module().lion8bit_step(
                _ptr(param),
                _ptr(grad),
                DTYPE_IDS[param.dtype],
                param.numel(),
                _ptr(exp_avg_q),
                exp_avg_q.numel(),
                _ptr(exp_avg_absmax),
                exp_avg_absmax.numel(),
                _ptr(qmap_signed),
                s,
                *extra_args(param.device),
            )

    # --- multi-tensor ops ------------------------------------------------------------
    # CPU: one native call (one parallel region) per list. CUDA: one launch per tensor
    # (a list-walking CUDA kernel would save launches; not written yet).
    if not cpu_lists:

        @kernel("adamw32_multi_step_")
        def adamw32_multi_step_(
            params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, steps
        ):
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

        @kernel("adamw8bit_multi_step_")
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
            _checks.one_device(
                params, grads, exp_avg_qs, exp_avg_absmaxes, exp_avg_sq_qs, exp_avg_sq_absmaxes
            )
            lists = zip(
                params, grads, exp_avg_qs, exp_avg_absmaxes, exp_avg_sq_qs, exp_avg_sq_absmaxes, steps
            )
            for p, g, q1, a1, q2, a2, step in lists:
                adamw8bit_step_(
                    p,
                    g,
                    q1,
                    a1,
                    q2,
                    a2,
                    qmap_signed,
                    qmap_unsigned,
                    lr,
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                    step,
                )

        @kernel("lion32_multi_step_")
        def lion32_multi_step_(params, grads, exp_avgs, lr, beta1, beta2, weight_decay):
            _checks.lists(("params", params), ("grads", grads), ("exp_avgs", exp_avgs))
            _checks.one_device(params, grads, exp_avgs)
            for p, g, m in zip(params, grads, exp_avgs):
                lion32_step_(p, g, m, lr, beta1, beta2, weight_decay)

        @kernel("lion8bit_multi_step_")
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

        return kernel

    # On CPU the per-tensor Python work is what a step over many small tensors costs
    # (128 LoRA-sized tensors: the update itself takes ~10 ms, and torch's fused
    # AdamW spends ~0.5 ms in Python), so each tensor gets one fast predicate
    # (qpeft._checks.cpu_step_ok) and only a tensor failing it goes through
    # the full checks, which raise the precise error. The rows go to C++ as one
    # int64 buffer, with one scalar set per distinct step count.

    @kernel("adamw32_multi_step_")
    def adamw32_multi_step_(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, steps):
        _checks.lists(
            ("params", params),
            ("grads", grads),
            ("exp_avgs", exp_avgs),
            ("exp_avg_sqs", exp_avg_sqs),
            ("steps", steps),
        )
        ok = _checks.cpu_step_ok
        rows, keep, sets = (
            [],
            [],
            _ScalarSets(lambda step: adam_scalars(lr, beta1, beta2, eps, weight_decay, step)),
        )
        for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
            n = p.numel()
            if not ok(p, g, n, m, F32, n, v, F32, n):
                _checks.adamw32(p, g, m, v)
                _checks.one_device(params, grads, exp_avgs, exp_avg_sqs)
            if not g.is_contiguous():
                g = g.contiguous()
                keep.append(g)
            rows += (
                p.data_ptr(),
                g.data_ptr(),
                DTYPE_IDS[p.dtype],
                n,
                m.data_ptr(),
                n,
                v.data_ptr(),
                n,
                sets[step],
            )
        module().adamw32_multi_step(array("q", rows), sets.values, *extra_args(CPU))

    @kernel("adamw8bit_multi_step_")
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
        if params:
            _checks.adamw8bit_maps(qmap_signed, qmap_unsigned, CPU)
        ok = _checks.cpu_step_ok
        rows, keep, sets = (
            [],
            [],
            _ScalarSets(lambda step: adam_scalars(lr, beta1, beta2, eps, weight_decay, step)),
        )
        for p, g, q1, a1, q2, a2, step in zip(
            params, grads, exp_avg_qs, exp_avg_absmaxes, exp_avg_sq_qs, exp_avg_sq_absmaxes, steps
        ):
            n = p.numel()
            blocks = state_blocks(n)
            if not (ok(p, g, n, q1, U8, n, a1, F32, blocks) and ok(p, g, n, q2, U8, n, a2, F32, blocks)):
                _checks.adamw8bit(p, g, q1, a1, q2, a2, qmap_signed, qmap_unsigned)
                _checks.one_device(
                    params, grads, exp_avg_qs, exp_avg_absmaxes, exp_avg_sq_qs, exp_avg_sq_absmaxes
                )
            if not g.is_contiguous():
                g = g.contiguous()
                keep.append(g)
            rows += (
                p.data_ptr(),
                g.data_ptr(),
                DTYPE_IDS[p.dtype],
                n,
                q1.data_ptr(),
                n,
                a1.data_ptr(),
                blocks,
                q2.data_ptr(),
                n,
                a2.data_ptr(),
                blocks,
                sets[step],
            )
        qs, qu = qmap_signed.contiguous(), qmap_unsigned.contiguous()
        module().adamw8bit_multi_step(array("q", rows), _ptr(qs), _ptr(qu), sets.values, *extra_args(CPU))

    @kernel("lion32_multi_step_")
    def lion32_multi_step_(params, grads, exp_avgs, lr, beta1, beta2, weight_decay):
        _checks.lists(("params", params), ("grads", grads), ("exp_avgs", exp_avgs))
        ok = _checks.cpu_step_ok
        rows, keep = [], []
        for p, g, m in zip(params, grads, exp_avgs):
            n = p.numel()
            if not ok(p, g, n, m, F32, n, m, F32, n):
                _checks.lion32(p, g, m)
                _checks.one_device(params, grads, exp_avgs)
            if not g.is_contiguous():
                g = g.contiguous()
                keep.append(g)
            rows += (p.data_ptr(), g.data_ptr(), DTYPE_IDS[p.dtype], n, m.data_ptr(), n, 0)
        s = lion_scalars(lr, beta1, beta2, weight_decay)
        module().lion32_multi_step(array("q", rows), [s], *extra_args(CPU))

    @kernel("lion8bit_multi_step_")
    def lion8bit_multi_step_(
        params, grads, exp_avg_qs, exp_avg_absmaxes, qmap_signed, lr, beta1, beta2, weight_decay
    ):
        _checks.lists(
            ("params", params),
            ("grads", grads),
            ("exp_avg_qs", exp_avg_qs),
            ("exp_avg_absmaxes", exp_avg_absmaxes),
        )
        if params:
            _checks.lion8bit_map(qmap_signed, CPU)
        ok = _checks.cpu_step_ok
        rows, keep = [], []
        for p, g, q1, a1 in zip(params, grads, exp_avg_qs, exp_avg_absmaxes):
            n = p.numel()
            blocks = state_blocks(n)
            if not ok(p, g, n, q1, U8, n, a1, F32, blocks):
                _checks.lion8bit(p, g, q1, a1, qmap_signed)
                _checks.one_device(params, grads, exp_avg_qs, exp_avg_absmaxes)
            if not g.is_contiguous():
                g = g.contiguous()
                keep.append(g)
            rows += (
                p.data_ptr(),
                g.data_ptr(),
                DTYPE_IDS[p.dtype],
                n,
                q1.data_ptr(),
                n,
                a1.data_ptr(),
                blocks,
                0,
            )
        s = lion_scalars(lr, beta1, beta2, weight_decay)
        qs = qmap_signed.contiguous()
        module().lion8bit_multi_step(array("q", rows), _ptr(qs), [s], *extra_args(CPU))

    return kernel


class _ScalarSets:
    """The distinct scalar sets of one multi-tensor call: ``sets[step]`` is the index
    of step's set in ``values`` (made on first use)."""

    def __init__(self, make: Callable[[int], tuple]) -> None:
        self.make = make
        self.values: list[tuple] = []
        self.index: dict[int, int] = {}

    def __getitem__(self, step: int) -> int:
        i = self.index.get(step)
        if i is None:
            i = self.index[step] = len(self.values)
            self.values.append(self.make(step))
        return i
