"""Argument checks of the optimizer step ops (every backend runs them first).

The step ops update ``param`` and the state tensors in place, so those must be
contiguous and of the exact dtype and size the kernels write; the gradient is only
read (any layout; backends make it contiguous). Native code re-checks the sizes.
"""

from __future__ import annotations

import torch

from ._formats import FLOAT_DTYPES
from ._optim_math import state_blocks

_FLOAT_IDS = frozenset(FLOAT_DTYPES)


def _param_and_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    if param.is_complex() or grad.is_complex():
        raise TypeError(
            "qpeft optimizers do not support complex parameters or gradients "
            f"(got param {param.dtype}, grad {grad.dtype}); use torch.view_as_real to optimize the real view"
        )
    if param.dtype not in FLOAT_DTYPES:
        raise TypeError(f"param must be float32, float16 or bfloat16, got {param.dtype}")
    if grad.layout != torch.strided:
        raise TypeError(
            f"grad must be a dense tensor, got layout {grad.layout} (sparse gradients are not supported)"
        )
    if grad.dtype != param.dtype:
        raise TypeError(f"grad dtype {grad.dtype} differs from param dtype {param.dtype}")
    if grad.shape != param.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} differs from param shape {tuple(param.shape)}")
    if grad.device != param.device:
        raise ValueError(f"grad is on {grad.device} but param is on {param.device}")
    if not param.is_contiguous():
        raise ValueError("param must be contiguous: the step updates it in place")


def _state(t: torch.Tensor, name: str, dtype: torch.dtype, numel: int, device: torch.device) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if t.numel() != numel:
        raise ValueError(f"{name} has {t.numel()} elements but {numel} are needed (state and param disagree)")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but param is on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous: the step updates it in place")


def _qmap(code: torch.Tensor, name: str, device: torch.device) -> None:
    if code.dtype != torch.float32 or code.numel() != 256:
        raise ValueError(
            f"{name} must be a float32 tensor of 256 values, got {code.dtype} with {code.numel()}"
        )
    if code.device != device:
        raise ValueError(f"{name} is on {code.device} but param is on {device}")
    # Sortedness is checked where it is cheap: by the reference (qmap_sorted) and by
    # the CPU kernels when they build their cached encoder table (not per step here).


def qmap_sorted(code: torch.Tensor, name: str) -> None:
    flat = code.reshape(-1)
    if not bool(torch.isfinite(flat).all()) or not bool((flat[1:] >= flat[:-1]).all()):
        raise ValueError(f"{name} must be finite and sorted ascending (the encoder searches its midpoints)")


def adamw32(param, grad, exp_avg, exp_avg_sq) -> None:
    _param_and_grad(param, grad)
    n = param.numel()
    _state(exp_avg, "exp_avg", torch.float32, n, param.device)
    _state(exp_avg_sq, "exp_avg_sq", torch.float32, n, param.device)


def adamw8bit(
    param, grad, exp_avg_q, exp_avg_absmax, exp_avg_sq_q, exp_avg_sq_absmax, qmap_signed, qmap_unsigned
):
    _param_and_grad(param, grad)
    n = param.numel()
    _state(exp_avg_q, "exp_avg_q", torch.uint8, n, param.device)
    _state(exp_avg_absmax, "exp_avg_absmax", torch.float32, state_blocks(n), param.device)
    _state(exp_avg_sq_q, "exp_avg_sq_q", torch.uint8, n, param.device)
    _state(exp_avg_sq_absmax, "exp_avg_sq_absmax", torch.float32, state_blocks(n), param.device)
    _qmap(qmap_signed, "qmap_signed", param.device)
    _qmap(qmap_unsigned, "qmap_unsigned", param.device)


def lion32(param, grad, exp_avg) -> None:
    _param_and_grad(param, grad)
    _state(exp_avg, "exp_avg", torch.float32, param.numel(), param.device)


def lion8bit(param, grad, exp_avg_q, exp_avg_absmax, qmap_signed) -> None:
    _param_and_grad(param, grad)
    n = param.numel()
    _state(exp_avg_q, "exp_avg_q", torch.uint8, n, param.device)
    _state(exp_avg_absmax, "exp_avg_absmax", torch.float32, state_blocks(n), param.device)
    _qmap(qmap_signed, "qmap_signed", param.device)


def adamw8bit_maps(qmap_signed, qmap_unsigned, device: torch.device) -> None:
    _qmap(qmap_signed, "qmap_signed", device)
    _qmap(qmap_unsigned, "qmap_unsigned", device)


def lion8bit_map(qmap_signed, device: torch.device) -> None:
    _qmap(qmap_signed, "qmap_signed", device)


def lists(*named: tuple[str, list]) -> None:
    """The lists of a multi-tensor op have equal lengths."""
    n = len(named[0][1])
    for name, lst in named:
        if len(lst) != n:
            raise ValueError(f"{name} holds {len(lst)} tensors but {named[0][0]} holds {n}")


def one_device(*lists: list[torch.Tensor]) -> None:
    """Every tensor of a multi-tensor op is on one device."""
    devices = {t.device for lst in lists for t in lst}
    if len(devices) > 1:
        raise ValueError(
            f"a multi-tensor step needs all tensors on one device, got {sorted(map(str, devices))}"
        )


_STRIDED = torch.strided


def cpu_step_ok(param, grad, n, s1, dtype1, n1, s2, dtype2, n2) -> bool:
    """The fast check of one tensor of a CPU multi-tensor step: what the full checks
    (adamw32 / adamw8bit / lion32 / lion8bit above) ask, for two state tensors of
    the given dtypes and sizes, plus all on the CPU. False means: run the full
    checks, which name the problem."""
    dt = param.dtype
    return (
        dt in _FLOAT_IDS
        and grad.dtype is dt
        and s1.dtype is dtype1
        and s2.dtype is dtype2
        and grad.shape == param.shape
        and s1.numel() == n1
        and s2.numel() == n2
        and grad.layout is _STRIDED
        and param.is_cpu
        and grad.is_cpu
        and s1.is_cpu
        and s2.is_cpu
        and param.is_contiguous()
        and s1.is_contiguous()
        and s2.is_contiguous()
    )
