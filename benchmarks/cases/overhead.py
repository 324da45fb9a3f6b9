"""Per-call overhead of one small adapted layer: a call of ``qpeft.nn.QLoRALinear``
(NF4 + double quantization, blocksize 64, r = 8, fp32 activations and adapters) on a
64x64 and a 256x256 layer at M = 1 and 16 rows, where the call's Python and dispatch,
not its arithmetic, is the cost (docs/design.md, "Per-call overhead"). Three calls:
forward with autograd on (trainable adapters), forward under ``torch.no_grad``, and
forward + backward (x requires grad too). Times are per call.

Implementations: qpeft's layer; the same layer forced onto its full Python path (``qpeft.use_backend
("cpu")``: the same CPU kernels, but a forced backend is one of the calls qpeft._C_layer hands
back; the context manager adds ~1-2 us), so one run compares the C++ call with the path it
replaces; HF PEFT LoRA over bitsandbytes' ``Linear4bit`` holding the
same packed bytes (fp32 compute); HF PEFT LoRA over a plain ``nn.Linear`` with the
dequantized weight (no 4-bit decode at all: the floor a 4-bit layer is measured against).

Check: every implementation's y (and dx) equals the fp32 product with the dequantized
weight within 1e-4 relative (fp32 sums of at most 256 + 8 terms; 1e-4 is ~100x their
rounding, while a wrong term moves the result by O(1)).
"""

from __future__ import annotations

import logging

import torch

import qpeft

from ..harness import Case, Impl
from .peers import optional

R, ALPHA = 8, 16
REL = 1e-4
FULL_PATH = "qpeft, full Python path"


def _layers(n: int, k: int) -> dict:
    """{name: module} of the three implementations, one weight, one adapter."""
    from qpeft.nn import QLoRALinear

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) / k**0.5)
        lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
    q = QLoRALinear.from_linear(lin, r=R, alpha=ALPHA)
    with torch.no_grad():
        q.lora_B.copy_(torch.randn(n, R, generator=g) * 0.1)  # nonzero: the LoRA terms count
    out = {"qpeft QLoRALinear": q}
    bnb, peft = optional("bitsandbytes"), optional("peft")
    if peft is None:
        return out
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

    class Wrap(torch.nn.Module):
        def __init__(self, proj) -> None:
            super().__init__()
            self.proj = proj

        def forward(self, x):
            return self.proj(x)

    def peft_layer(base):
        config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"], lora_dropout=0.0)
        layer = peft.get_peft_model(Wrap(base), config).base_model.model.proj
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(q.lora_A)
            layer.lora_B["default"].weight.copy_(q.lora_B)
        return layer

    if bnb is not None:
        b4 = bnb.nn.Linear4bit(k, n, compute_dtype=torch.float32, quant_type="nf4", device="meta")
        st = bnb.functional.QuantState.from_dict(q.base_layer.quant_state.as_dict(packed=True), device="cpu")
        b4.weight = bnb.nn.Params4bit(
            q.base_layer.weight.packed, requires_grad=False, quant_state=st, bnb_quantized=True, module=b4
        )
        b4.quant_state = st
        b4.bias = torch.nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        out["peft+bnb fp32"] = peft_layer(b4)
    dense = torch.nn.Linear(k, n)
    with torch.no_grad():
        dense.weight.copy_(q.base_layer.dequantize(torch.float32))
        dense.bias.copy_(lin.bias)
    out["peft+nn.Linear fp32"] = peft_layer(dense)
    return out


def _reference(q, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = q.base_layer.dequantize(torch.float32).double()
    x64 = x.double().requires_grad_()
    y = x64 @ w.T + q.base_layer.bias.double() + q.scaling * (x64 @ q.lora_A.double().T) @ q.lora_B.double().T
    y.backward(dy.double())
    return y.detach(), x64.grad


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def cases(device: str, quick: bool) -> list[Case]:
    if device != "cpu":
        return []  # the question is the CPU layer's Python path; a GPU adds launch latency
    sizes = [(64, 1)] if quick else [(64, 1), (64, 16), (256, 1), (256, 16)]
    out = []
    for n, m in sizes:
        layers = _layers(n, n)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(m, n, generator=g)
        dy = torch.randn(m, n, generator=g)
        y_ref, dx_ref = _reference(layers["qpeft QLoRALinear"], x, dy)
        xg = x.clone().requires_grad_()

        def check(result, y_ref=y_ref, dx_ref=dx_ref):
            y, dx = result
            assert _rel(y, y_ref) < REL, f"y: relative error {_rel(y, y_ref):.2e}"
            if dx is not None:
                assert _rel(dx, dx_ref) < REL, f"dx: relative error {_rel(dx, dx_ref):.2e}"

        for mode in ("forward", "forward no_grad", "forward+backward"):
            impls = []
            for name, mod in layers.items():
                if mode == "forward":

                    def run(mod=mod, x=x):
                        return mod(x), None

                elif mode == "forward no_grad":

                    def run(mod=mod, x=x):
                        with torch.no_grad():
                            return mod(x), None

                else:

                    def run(mod=mod, xg=xg, dy=dy):
                        xg.grad = None
                        y = mod(xg)
                        y.backward(dy)
                        return y.detach(), xg.grad

                impls.append(Impl(name, run, check))
                if name == "qpeft QLoRALinear":

                    def full(run=run):
                        with qpeft.use_backend("cpu"):
                            return run()

                    impls.append(Impl(FULL_PATH, full, check))
            out.append(
                Case(
                    f"per-call overhead: {mode}",
                    f"{n}x{n} r={R} M={m} fp32",
                    impls,
                    # many short calls: the median of 200 holds on a shared machine
                    runs={}
                    if quick
                    else {name: {"min_runs": 200, "min_seconds": 0.5} for name in [*layers, FULL_PATH]},
                )
            )
    return out
