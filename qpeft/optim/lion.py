"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") with fp32
or blockwise 8-bit state, paged or not. One moment: 4 bytes per parameter in fp32,
1 + 4/256 in 8-bit (signed dynamic map)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .._optim_math import MIN_8BIT_NUMEL, check_lion_hparams
from .optimizer import QpeftOptimizer, beta_pair, group_hparams, real_hparam
from .paging import PAGE_MIN_NUMEL


class _LionBase(QpeftOptimizer):
    algorithm = "lion"
    _STATE_32 = ("exp_avg",)
    _STATE_8 = (("exp_avg", True),)
    _BITS = 32
    _PAGED = False

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        page_out: bool = False,
        min_8bit_size: int = MIN_8BIT_NUMEL,
        page_min_numel: int = PAGE_MIN_NUMEL,
        state_memory=None,
        state_dict_layout: str = "auto",
    ) -> None:
        super().__init__(
            params,
            dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, weight_decay=weight_decay),
            optim_bits=self._BITS,
            paged=self._PAGED,
            page_out=page_out,
            min_8bit_size=min_8bit_size,
            page_min_numel=page_min_numel,
            state_memory=state_memory,
            state_dict_layout=state_dict_layout,
        )

    def _hparams(self, group, where):
        lr, betas, wd = group_hparams(group, ("lr", "betas", "weight_decay"), where)
        beta1, beta2 = beta_pair(betas, where)
        hp = (real_hparam(lr, "lr", where), beta1, beta2, real_hparam(wd, "weight_decay", where))
        check_lion_hparams(*hp, where)
        return hp

    def _update(self, items, hp, eight_bit) -> None:
        params, grads, states = (list(x) for x in zip(*items))
        if eight_bit:
            signed, _ = self._qmaps(params[0].device)
            torch.ops.qpeft.lion8bit_multi_step_(
                params,
                grads,
                [st["exp_avg_q"] for st in states],
                [st["exp_avg_absmax"] for st in states],
                signed,
                *hp,
            )
        else:
            torch.ops.qpeft.lion32_multi_step_(params, grads, [st["exp_avg"] for st in states], *hp)


class Lion(_LionBase):
    """Lion with fp32 state."""


class Lion8bit(_LionBase):
    """Lion with blockwise 8-bit state (tensors under 4096 elements keep fp32 state)."""

    _BITS = 8


class PagedLion(_LionBase):
    """Lion with fp32 state paged in CUDA unified memory (parameters >= 100k elements)."""

    _PAGED = True


class PagedLion8bit(_LionBase):
    """Lion8bit with its state paged in CUDA unified memory (parameters >= 100k elements)."""

    _BITS = 8
    _PAGED = True
