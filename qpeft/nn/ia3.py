"""IA3Linear: a frozen (4-bit or 16-bit) linear layer whose output is scaled by a learned vector.

IA3 (Liu et al. 2022) learns l [out_features], initialised to ones, with
``y = l * (x W^T + bias)``: the output-side form, which PEFT's IA3 uses for attention
projections (for feed-forward layers PEFT scales the *input* instead, ``(l * x) W^T``;
only the output side is offered here, because that is what the fused kernel's epilogue
supports: ``out_scale`` of ``qpeft::qlora_linear``).

The op's ``out_scale`` is a constant (it has no gradient), so when l needs a gradient the
layer computes z = x W^T + bias with the op and multiplies by l in torch (dl = sum dy*z,
one extra [M, N] product); otherwise (inference, frozen l) l rides in the fused epilogue.
"""

from __future__ import annotations

import torch
from torch import nn

from .linear4bit import Linear4bit, refuse_jit_script, result_dtype
from .lora import check_dense_input, dense_linear, set_base_attr

__all__ = ["IA3Linear"]


class IA3Linear(nn.Module):
    """y = ia3_l * base(x), with ``ia3_l`` [out_features] trainable (fp32, ones at start)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, Linear4bit)):
            raise TypeError(
                f"IA3Linear wraps nn.Linear or qpeft.nn.Linear4bit, got {type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.ia3_l = nn.Parameter(torch.ones(self.out_features, device=base_layer.weight.device))
        self.adapters_enabled = True

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quantize: bool = True,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        *,
        compute_dtype: torch.dtype | None = None,
    ) -> IA3Linear:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"IA3Linear.from_linear needs a torch.nn.Linear, got {type(linear).__name__}")
        base = (
            Linear4bit.from_linear(linear, quant_type, blocksize, double_quant, compute_dtype)
            if quantize
            else linear
        )
        return cls(base)

    @property
    def quantized(self) -> bool:
        return isinstance(self.base_layer, Linear4bit)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    __prepare_scriptable__ = refuse_jit_script

    def __setattr__(self, name, value):
        if not set_base_attr(self, name, value):
            super().__setattr__(name, value)

    def disable_adapters(self) -> None:
        self.adapters_enabled = False

    def enable_adapters(self) -> None:
        self.adapters_enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if isinstance(base, Linear4bit):
            base.check_input(x)
            if not self.adapters_enabled:
                return base(x)
            if self.ia3_l.requires_grad and torch.is_grad_enabled():
                return (base(x) * self.ia3_l).to(result_dtype(x))
            return base.qlora(x, out_scale=self.ia3_l.detach())
        check_dense_input(self, x)
        if not self.adapters_enabled:
            return base(x)
        return (dense_linear(base, x) * self.ia3_l).to(result_dtype(x))
