"""Builders shared by the module, interop and MiniLM tests."""

from __future__ import annotations

import copy

import torch
from torch import nn

from qpeft.nn import Linear4bit, QLoRALinear

U32 = 2.0**-24


def bnb_linear(
    lin: nn.Linear, quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64
) -> nn.Module:
    """bitsandbytes' Linear4bit holding ``lin``'s weight, quantized on CPU (fp32 compute)."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        lin.in_features,
        lin.out_features,
        bias=lin.bias is not None,
        compute_dtype=torch.float32,
        compress_statistics=double_quant,
        quant_type=quant_type,
    )
    layer.weight = bnb.nn.Params4bit(
        lin.weight.data.clone(),
        requires_grad=False,
        compress_statistics=double_quant,
        quant_type=quant_type,
        blocksize=blocksize,
    )
    if lin.bias is not None:
        layer.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")  # bitsandbytes quantizes on the move to a device


def replace_linears(model: nn.Module, names: list[str], make) -> nn.Module:
    for name in names:
        parent, _, attr = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, attr, make(getattr(holder, attr)))
    return model


def linear_names(model: nn.Module, exclude: tuple[str, ...] = ("lm_head",)) -> list[str]:
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] not in exclude
    ]


def dequantized_copy(base: nn.Module, converted: nn.Module, dtype=torch.float32) -> nn.Module:
    """``base`` with each converted layer's weight replaced by its dequantized 4-bit weight."""
    out = copy.deepcopy(base).to(dtype)
    for name, m in converted.named_modules():
        if name.endswith(".base_layer"):  # reached through its wrapper already
            continue
        layer = m.base_layer if isinstance(m, QLoRALinear) else m
        if isinstance(layer, Linear4bit):
            with torch.no_grad():
                out.get_submodule(name).weight.copy_(layer.dequantize(torch.float32))
    return out


def rms(t: torch.Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt())


def assert_close_to_hf(ours: torch.Tensor, hf: torch.Tensor, ref64: torch.Tensor, what: str) -> None:
    """FlashAttention's rule: both are fp32 evaluations of one model; ours may deviate from the
    fp64 evaluation of that model by at most twice what the HF implementation deviates (a
    different summation order of the same fp32 operations), plus one fp32 ulp of the values
    so that a lucky exact HF result does not demand an exact ours."""
    e_ours, e_hf = rms(ours - ref64), rms(hf - ref64)
    bound = 2 * e_hf + U32 * rms(ref64)
    assert e_ours <= bound, f"{what}: rms error vs fp64 {e_ours:.3e} > 2 x HF's {e_hf:.3e} + ulp"
