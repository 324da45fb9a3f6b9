"""Builders shared by the module, interop, MiniLM and device tests."""

from __future__ import annotations

import copy
import itertools
import os

import pytest
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


# --- device tests: which backends serve which device ------------------------------------
# On CUDA every backend that can run there; on CPU the native one and the reference, plus
# (forced) the CUDA kernels in the emulation harness and, only without a GPU, Triton under
# its interpreter (conftest sets TRITON_INTERPRET=1 only then: on a GPU machine the Triton
# kernels run compiled, on CUDA tensors).
CUDA_BACKENDS = ("triton", "cuda", "default")
CPU_BACKENDS = ("cpu", "default", "cuda_emulated") + (
    ("triton",) if os.environ.get("TRITON_INTERPRET") == "1" else ()
)


def backends_for(op: str, device: str) -> list[str]:
    """The backends of ``device`` that registered a kernel for ``qpeft::op``."""
    from qpeft._dispatch import kernels_of

    return [b for b in (CUDA_BACKENDS if device == "cuda" else CPU_BACKENDS) if op in kernels_of(b)]


def device_cases(op: str, *axes: list, cpu: int = 1) -> list:
    """pytest params ``(device, backend, *combo)`` over the product of ``axes``: every combo
    on every CUDA backend of ``op`` (skipped without a GPU), and only the first ``cpu``
    combos on CPU, where the op's own test files already cover the grid."""
    from .conftest import NO_CUDA

    combos = list(itertools.product(*axes))
    out = []
    for device in ("cuda", "cpu"):
        for backend in backends_for(op, device):
            for combo in combos if device == "cuda" else combos[:cpu]:
                ident = "-".join([device, backend, *(str(c).replace("torch.", "") for c in combo)])
                marks = [NO_CUDA] if device == "cuda" else []
                out.append(pytest.param(device, backend, *combo, id=ident, marks=marks))
    return out


def within_reference(ours: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor, what: str) -> None:
    """``ours`` and ``ref`` (the reference backend) evaluate one function in one dtype with
    different summation orders; ``exact`` is its fp64 value. ours may deviate from exact by
    at most twice what the reference deviates, plus one ulp of ours' dtype (so that a lucky
    exact reference does not demand an exact ours) -- the rule of assert_close_to_hf."""
    ulp = torch.finfo(ours.dtype).eps
    ours, ref, exact = (t.detach().cpu().double() for t in (ours, ref, exact))
    e_ours, e_ref = rms(ours - exact), rms(ref - exact)
    bound = 2 * e_ref + ulp * rms(exact)
    assert e_ours <= bound, f"{what}: rms error vs fp64 {e_ours:.3e} > 2 x the reference's {e_ref:.3e} + ulp"


class _FactoriesOnDevice(torch.overrides.TorchFunctionMode):
    """Tensors made without a device land on ``device``; one drawn from a CPU generator is
    drawn on CPU and moved (the seed keeps its values on any machine)."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = device
        from torch.utils._device import _device_constructors

        self.factories = _device_constructors()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.factories and kwargs.get("device") is None:
            gen = kwargs.get("generator")
            if gen is not None and gen.device.type == "cpu":
                return func(*args, **kwargs).to(self.device)
            kwargs["device"] = self.device
        return func(*args, **kwargs)


def triton_test_device():
    """The Triton tests' tensors: on a GPU machine CUDA tensors (the kernels compiled, as
    they run in training); without one CPU tensors (conftest set TRITON_INTERPRET=1)."""
    import contextlib

    return _FactoriesOnDevice("cuda") if torch.cuda.is_available() else contextlib.nullcontext()
