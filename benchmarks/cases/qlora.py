"""One QLoRA linear layer: y = x @ W^T + s * (x @ A^T) @ B^T with W NF4 + double quant
(blocksize 64), bf16 activations, r = 16, s = 2: forward over a range of M (decode to
training), backward and forward+backward at training M, on 7B/8B-class layer shapes.

Implementations: each qpeft backend on the device; the pure-torch reference; HF PEFT
LoRA over a bitsandbytes ``Linear4bit`` holding the very same packed weight (compute
dtype bf16, and fp32 as a CPU user would pick); torchtune's recipe, torchao's
``linear_nf4`` plus the LoRA matmuls in torch (its own NF4 variant of the weight); the
unquantized bf16 layer in torch (cuBLAS on a GPU) as the 16-bit baseline.

Checks, before timing, against y and dx of the fp32 reference on the same packed W:
implementations on the same packed weight must agree within ||err|| / ||ref|| < 2^-6
(bf16 operands and outputs round at 2^-9 relative each; 2^-6 leaves 8x for fp32
accumulation over K = 4096 and the dequantized weight's rounding to bf16); torchao
quantizes W itself, so it is held to the NF4 quantization noise instead: < 0.15 of the
unquantized layer's output (NF4 + DQ keeps an SQNR of 20.7 dB on Gaussian weights,
a relative RMS error of 0.092).
"""

from __future__ import annotations

import torch

import qpeft
import qpeft.functional as qf

from ..harness import Case, Impl
from .peers import optional, qpeft_backends, torchao_nf4

R, SCALING = 16, 2.0
SAME_FORMAT_REL = 2.0**-6
OTHER_FORMAT_REL = 0.15


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


class Layer:
    """One layer's tensors and its implementations as callables returning (y, dx or None)."""

    def __init__(self, m: int, n: int, k: int, device: str, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w = (torch.randn(n, k, generator=g) * 0.02).to(device=device, dtype=torch.bfloat16)
        self.x = torch.randn(m, k, generator=g).to(device=device, dtype=torch.bfloat16)
        self.dy = torch.randn(m, n, generator=g).to(device=device, dtype=torch.bfloat16)
        self.a = (torch.randn(R, k, generator=g) / k**0.5).to(device)
        self.b = (torch.randn(n, R, generator=g) * 0.01).to(device)  # nonzero: the LoRA path is exercised
        self.packed, self.state = qf.quantize_4bit(self.w, 64, "nf4", True)
        with qpeft.use_backend("default"):
            w32 = qf.dequantize_4bit(self.packed, self.state, torch.float32)
        x32 = self.x.float().requires_grad_()
        y = x32 @ w32.T + SCALING * (x32 @ self.a.T) @ self.b.T
        y.backward(self.dy.float())
        self.y_ref, self.dx_ref = y.detach(), x32.grad
        x32 = self.x.float().requires_grad_()
        y = x32 @ self.w.float().T + SCALING * (x32 @ self.a.T) @ self.b.T  # the unquantized layer
        y.backward(self.dy.float())
        self.y_full, self.dx_full = y.detach(), x32.grad

    def check(self, same_format: bool):
        y_want, dx_want = (self.y_ref, self.dx_ref) if same_format else (self.y_full, self.dx_full)
        bound = SAME_FORMAT_REL if same_format else OTHER_FORMAT_REL

        def check(result):
            y, dx = result
            assert _rel(y, y_want) < bound, f"y: relative error {_rel(y, y_want):.2e} >= {bound:.2e}"
            if dx is not None:
                assert _rel(dx, dx_want) < bound, f"dx: relative error {_rel(dx, dx_want):.2e} >= {bound:.2e}"

        return check

    # --- the implementations: each returns a forward closure over trainable A, B ----------

    def qpeft(self, backend: str):
        a, b = self.a.clone().requires_grad_(), self.b.clone().requires_grad_()

        def fwd(x):
            with qpeft.use_backend(backend):
                return qf.qlora_linear(x, self.packed, self.state, a, b, SCALING)

        return fwd, backend

    def peft_bnb(self, compute_dtype: torch.dtype):
        bnb, peft = optional("bitsandbytes"), optional("peft")
        if bnb is None or peft is None:
            return None
        n, k = self.w.shape
        lin = bnb.nn.Linear4bit(
            k,
            n,
            bias=False,
            compute_dtype=compute_dtype,
            quant_type="nf4",
            compress_statistics=True,
            device="meta",
        )
        lin.weight = bnb.nn.Params4bit(
            self.packed, requires_grad=False, quant_state=self._bnb_state(), bnb_quantized=True, module=lin
        )
        lin.quant_state = lin.weight.quant_state

        class Wrap(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.proj = lin

            def forward(self, x):
                return self.proj(x)

        config = peft.LoraConfig(r=R, lora_alpha=R * SCALING, target_modules=["proj"], lora_dropout=0.0)
        model = peft.get_peft_model(Wrap(), config)
        layer = model.base_model.model.proj
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(self.a)
            layer.lora_B["default"].weight.copy_(self.b)
        return model, None

    def _bnb_state(self):
        bnbF = optional("bitsandbytes.functional")
        return bnbF.QuantState.from_dict(self.state.as_dict(packed=True), device=self.packed.device)

    def torch_bf16(self):
        """The unquantized layer in bf16 (cuBLAS on CUDA): the 16-bit baseline the fused
        4-bit kernels are compared against (it reads 4x the weight bytes)."""
        w = self.w.to(self.x.dtype)
        a, b = self.a.clone().requires_grad_(), self.b.clone().requires_grad_()

        def fwd(x):
            return torch.nn.functional.linear(x, w) + SCALING * (x @ a.to(x.dtype).T) @ b.to(x.dtype).T

        return fwd, None

    def torchao(self):
        ao = torchao_nf4()
        if ao is None:
            return None
        to_nf4, linear_nf4 = ao
        w_nf4 = to_nf4(self.w, 64, 256)
        a, b = self.a.clone().requires_grad_(), self.b.clone().requires_grad_()

        def fwd(x):
            return linear_nf4(x, w_nf4) + SCALING * (x @ a.to(x.dtype).T) @ b.to(x.dtype).T

        return fwd, None


def _impls(layer: Layer, device: str, mode: str) -> list[Impl]:
    """mode: "forward" (no grad), "backward" (a kept graph, backward only), "fwdbwd"."""
    makers = [(f"qpeft {bk}", lambda bk=bk: layer.qpeft(bk), True) for bk in qpeft_backends(device)]
    makers += [
        ("reference", lambda: layer.qpeft("default"), True),
        ("peft+bnb bf16", lambda: layer.peft_bnb(torch.bfloat16), True),
        ("peft+bnb fp32", lambda: layer.peft_bnb(torch.float32), True),
        ("torchao nf4+lora", layer.torchao, False),
    ]
    if device != "cpu":  # the GPU's 16-bit baseline (cuBLAS)
        makers.append(("torch bf16 unquantized+lora", layer.torch_bf16, False))
    impls = []
    for name, make, same_format in makers:
        made = make()
        if made is None:
            continue
        fwd = made[0]
        if mode == "forward":

            def run(fwd=fwd):
                with torch.no_grad():
                    return fwd(layer.x), None

        elif mode == "fwdbwd":

            def run(fwd=fwd):
                x = layer.x.clone().requires_grad_()
                y = fwd(x)
                y.backward(layer.dy)
                return y.detach(), x.grad

        else:  # backward only: one forward, then the timed backward reuses its graph
            holder = {}

            def run(fwd=fwd, holder=holder):
                if "y" not in holder:
                    holder["x"] = layer.x.clone().requires_grad_()
                    holder["y"] = fwd(holder["x"])
                holder["x"].grad = None
                holder["y"].backward(layer.dy, retain_graph=True)
                return holder["y"].detach(), holder["x"].grad

        impls.append(Impl(name, run, layer.check(same_format)))
    return impls


def _flops(m: int, n: int, k: int, mode: str) -> int:
    fwd = 2 * m * n * k + 2 * m * k * R + 2 * m * R * n
    bwd = 2 * m * n * k + 2 * m * n * R + 2 * m * R * k + 2 * R * m * k + 2 * n * m * R  # dx, g, dA, dB
    return {"forward": fwd, "backward": bwd, "fwdbwd": fwd + bwd}[mode]


def cases(device: str, quick: bool) -> list[Case]:
    if quick:
        forward_ms, train = [1, 16], [(16, 256, 256)]
    else:
        forward_ms, train = [1, 16, 64, 512, 2048], [(512, 4096, 4096), (512, 11008, 4096)]
    slow = {
        "reference": {"min_runs": 1, "min_seconds": 0.0},
        "peft+bnb bf16": {"min_runs": 3, "min_seconds": 0.0},
    }
    out = []
    n = k = 256 if quick else 4096
    for m in forward_ms:
        layer = Layer(m, n, k, device)
        out.append(
            Case(
                "qlora forward",
                f"M={m} {n}x{k} r={R}",
                _impls(layer, device, "forward"),
                x=m,
                x_name="M",
                bound="compute",
                flops=_flops(m, n, k, "forward"),
                runs=slow,
            )
        )
    for m, n2, k2 in train:
        layer = Layer(m, n2, k2, device)
        for mode, group in (("backward", "qlora backward"), ("fwdbwd", "qlora forward+backward")):
            out.append(
                Case(
                    group,
                    f"M={m} {n2}x{k2} r={R}",
                    _impls(layer, device, mode),
                    bound="compute",
                    flops=_flops(m, n2, k2, mode),
                    runs=slow,
                )
            )
    return out
