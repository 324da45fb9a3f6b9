"""AdamW with fp32 or blockwise 8-bit state, paged or not.

Semantics of ``torch.optim.AdamW`` (decoupled weight decay, bias correction, eps
outside the square root; no amsgrad/maximize): ``PagedAdamW`` matches
``torch.optim.AdamW(foreach=False)`` to ~1e-8 relative after 100 steps (the
difference is torch's CPU sqrt, which is off by an ulp at times; ours is IEEE).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .._optim_math import MIN_8BIT_NUMEL, check_adam_hparams
from .optimizer import QpeftOptimizer, beta_pair, group_hparams, real_hparam
from .paging import PAGE_MIN_NUMEL


class _AdamWBase(QpeftOptimizer):
    algorithm = "adamw"
    _STATE_32 = ("exp_avg", "exp_avg_sq")
    _STATE_8 = (("exp_avg", True), ("exp_avg_sq", False))  # signed map for m, unsigned for v
    _BITS = 32
    _PAGED = False

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        page_out: bool = False,
        min_8bit_size: int = MIN_8BIT_NUMEL,
        page_min_numel: int = PAGE_MIN_NUMEL,
        state_memory=None,
        state_dict_layout: str = "auto",
    ) -> None:
        super().__init__(
            params,
            dict(
                lr=lr,
                betas=tuple(betas) if isinstance(betas, list) else betas,
                eps=eps,
                weight_decay=weight_decay,
            ),
            optim_bits=self._BITS,
            paged=self._PAGED,
            page_out=page_out,
            min_8bit_size=min_8bit_size,
            page_min_numel=page_min_numel,
            state_memory=state_memory,
            state_dict_layout=state_dict_layout,
        )

    def _hparams(self, group, where):
        lr, betas, eps, wd = group_hparams(group, ("lr", "betas", "eps", "weight_decay"), where)
        beta1, beta2 = beta_pair(betas, where)
        hp = (real_hparam(lr, "lr", where), beta1, beta2, real_hparam(eps, "eps", where))
        hp += (real_hparam(wd, "weight_decay", where),)
        check_adam_hparams(*hp, 1, where)
        return hp

    def _update(self, items, hp, eight_bit) -> None:
        params, grads, states = (list(x) for x in zip(*items))
        steps = [st["step"] + 1 for st in states]
        if eight_bit:
            signed, unsigned = self._qmaps(params[0].device)
            torch.ops.qpeft.adamw8bit_multi_step_(
                params,
                grads,
                [st["exp_avg_q"] for st in states],
                [st["exp_avg_absmax"] for st in states],
                [st["exp_avg_sq_q"] for st in states],
                [st["exp_avg_sq_absmax"] for st in states],
                signed,
                unsigned,
                *hp,
                steps,
            )
        else:
            torch.ops.qpeft.adamw32_multi_step_(
                params,
                grads,
                [st["exp_avg"] for st in states],
                [st["exp_avg_sq"] for st in states],
                *hp,
                steps,
            )


class AdamW(_AdamWBase):
    """AdamW with fp32 state (the C++/CUDA fused step; torch.optim.AdamW semantics)."""


class AdamW8bit(_AdamWBase):
    """AdamW with blockwise 8-bit state: about 2.03 bytes per parameter instead of 8.

    First moment on the signed dynamic map, second on the unsigned one, blocks of 256
    elements with an fp32 absmax each; tensors under ``min_8bit_size`` (4096)
    elements keep fp32 state."""

    _BITS = 8


class PagedAdamW(_AdamWBase):
    """AdamW with fp32 state paged in CUDA unified memory (parameters >= 100k elements)."""

    _PAGED = True


class PagedAdamW8bit(_AdamWBase):
    """AdamW8bit with its state paged in CUDA unified memory (parameters >= 100k elements)."""

    _BITS = 8
    _PAGED = True
