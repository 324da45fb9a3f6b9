"""Host-side scalars of the optimizer steps, computed once per step.

Every backend's step kernel takes the raw hyperparameters and turns them into
these fp32 scalars here, so the reference and the native kernels multiply by the
very same numbers (csrc/include/qpeft/optim.h: AdamScalars / LionScalars). The
arithmetic is torch.optim.AdamW's: Python floats (double), ``beta ** step`` by
the C library's pow, rounded to fp32 only at the end (as ATen casts a Python
scalar for an fp32 op).
"""

from __future__ import annotations

import functools
import math
import struct
from typing import NamedTuple

STATE_BLOCK = 256  # elements per absmax block of 8-bit state (optim.h: kStateBlock)
MIN_8BIT_NUMEL = 4096  # smaller tensors keep fp32 state (docs/design.md, "Formats")


def f32(x: float) -> float:
    """x rounded to the nearest fp32 (as a Python float)."""
    return struct.unpack("f", struct.pack("f", x))[0]


class AdamScalars(NamedTuple):
    decay: float
    lerp_c: float
    lerp_from_grad: int
    beta2: float
    omb2: float
    bc2_sqrt: float
    eps: float
    neg_step: float


class LionScalars(NamedTuple):
    decay: float
    beta1: float
    omb1: float
    beta2: float
    omb2: float
    neg_lr: float


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


def _check_common(lr: float, betas: tuple[float, ...], weight_decay: float, where: str) -> None:
    # The wording starts as torch.optim.AdamW's ("Invalid learning rate: ...") and then
    # says what is allowed; the "not (x >= 0)" forms are False for NaN. Unlike torch,
    # infinities are refused too: an infinite lr or weight decay only makes NaNs.
    if not (lr >= 0.0 and math.isfinite(lr)):
        raise ValueError(f"Invalid learning rate: {lr} ({_prefix(where)}lr must be a finite number >= 0)")
    for i, b in enumerate(betas):
        if not 0.0 <= b < 1.0:
            raise ValueError(
                f"Invalid beta parameter at index {i}: {b} ({_prefix(where)}beta{i + 1} must be in [0, 1))"
            )
    if not (weight_decay >= 0.0 and math.isfinite(weight_decay)):
        raise ValueError(
            f"Invalid weight_decay value: {weight_decay} "
            f"({_prefix(where)}weight_decay must be a finite number >= 0)"
        )


def check_adam_hparams(
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int, where: str = ""
) -> None:
    """Raise ValueError for hyperparameters the AdamW step cannot use; ``where`` (e.g.
    "param group 1") goes into the message."""
    _check_common(lr, (beta1, beta2), weight_decay, where)
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"Invalid epsilon value: {eps} ({_prefix(where)}eps must be a finite number >= 0)")
    if step < 1:
        raise ValueError(f"step must be >= 1 (the count after this update), got {step}")


@functools.lru_cache(maxsize=256)  # an optimizer step asks once per parameter with the same values
def adam_scalars(
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int
) -> AdamScalars:
    check_adam_hparams(lr, beta1, beta2, eps, weight_decay, step)
    w1 = f32(1.0 - beta1)  # ATen casts lerp's scalar weight to fp32, then compares |w| < 0.5
    from_grad = 0 if abs(w1) < 0.5 else 1
    lerp_c = f32(1.0 - w1) if from_grad else w1  # ATen: opmath_t(1) - weight, in fp32
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    step_size = lr / bias_correction1
    return AdamScalars(
        decay=f32(1.0 - lr * weight_decay),
        lerp_c=lerp_c,
        lerp_from_grad=from_grad,
        beta2=f32(beta2),
        omb2=f32(1.0 - beta2),
        bc2_sqrt=f32(bias_correction2**0.5),
        eps=f32(eps),
        neg_step=f32(-step_size),
    )


def check_lion_hparams(lr: float, beta1: float, beta2: float, weight_decay: float, where: str = "") -> None:
    """Raise ValueError for hyperparameters the Lion step cannot use (see check_adam_hparams)."""
    _check_common(lr, (beta1, beta2), weight_decay, where)


@functools.lru_cache(maxsize=256)
def lion_scalars(lr: float, beta1: float, beta2: float, weight_decay: float) -> LionScalars:
    check_lion_hparams(lr, beta1, beta2, weight_decay)
    return LionScalars(
        decay=f32(1.0 - lr * weight_decay),
        beta1=f32(beta1),
        omb1=f32(1.0 - beta1),
        beta2=f32(beta2),
        omb2=f32(1.0 - beta2),
        neg_lr=f32(-lr),
    )


def state_blocks(numel: int) -> int:
    """Number of absmax blocks of an 8-bit state of ``numel`` elements."""
    return -(numel // -STATE_BLOCK)
