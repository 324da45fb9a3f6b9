"""Optimizers, modules and a converted tiny model on CPU and CUDA tensors (the ``device``
fixture: "cuda" cases are skipped without a GPU), against the same code on CPU with the
reference backend. Shapes are tiny: on CPU these repeat test_optim / test_nn coverage."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import qpeft
from qpeft import optim
from qpeft.nn import Linear4bit, QLoRALinear
from qpeft.testing import OPTIM_CLASS_ATOL, OPTIM_CLASS_RTOL, backend_oracle, cpu_computes_bf16

from ._helpers import assert_within, within_reference
from .conftest import NO_CUDA

OPTIMIZERS = {
    "AdamW": (optim.AdamW, {}),
    "AdamW8bit": (optim.AdamW8bit, {"min_8bit_size": 1}),
    "PagedAdamW": (optim.PagedAdamW, {"page_min_numel": 0}),
    "PagedAdamW8bit": (optim.PagedAdamW8bit, {"min_8bit_size": 1, "page_min_numel": 0}),
    "Lion": (optim.Lion, {}),
    "Lion8bit": (optim.Lion8bit, {"min_8bit_size": 1}),
    "PagedLion": (optim.PagedLion, {"page_min_numel": 0}),
    "PagedLion8bit": (optim.PagedLion8bit, {"min_8bit_size": 1, "page_min_numel": 0}),
}
# The default path of each device, and on CUDA each step backend forced.
OPTIM_BACKENDS = [
    pytest.param("cpu", None, id="cpu-dispatch"),
    pytest.param("cuda", None, id="cuda-dispatch", marks=NO_CUDA),
    pytest.param("cuda", "cuda", id="cuda-cuda", marks=NO_CUDA),
    pytest.param("cuda", "default", id="cuda-default", marks=NO_CUDA),
]


def _run_steps(name, device, backend, steps=3):
    cls, kwargs = OPTIMIZERS[name]
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=g).to(device).requires_grad_() for n in (5000, 300, 17)]
    grads = [[torch.randn(p.shape, generator=g).to(device) for p in params] for _ in range(steps)]
    opt = cls(params, lr=1e-2, **kwargs)
    with qpeft.use_backend(backend) if backend else contextlib.nullcontext():
        for step_grads in grads:
            for p, gr in zip(params, step_grads):
                p.grad = gr
            opt.step()
    return [p.detach().cpu() for p in params]


@pytest.mark.parametrize("device,backend", OPTIM_BACKENDS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_steps(name, device, backend):
    with qpeft.use_backend("default"):
        want = _run_steps(name, "cpu", None)
    got = _run_steps(name, device, backend)
    # Bounds (derivation in qpeft/testing.py, shared with `python -m qpeft selftest`).
    atol = OPTIM_CLASS_ATOL["8bit" if "8bit" in name else "32bit"]
    for p, w in zip(got, want):
        torch.testing.assert_close(p, w, rtol=OPTIM_CLASS_RTOL, atol=atol)


def _linear(k=130, n=70, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 37])
def test_linear4bit(device, dtype, m):
    lin = _linear()
    ref = Linear4bit.from_linear(lin)
    ours = Linear4bit.from_linear(_linear().to(device))
    x = torch.randn(m, 130, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad(), qpeft.use_backend("default"):
        y_ref = ref(x)
    with torch.no_grad():
        y = ours(x.to(device))
    assert y.device.type == device.type and y.dtype == dtype
    w = ref.dequantize(torch.float32).double()
    within_reference(y, y_ref, x.double() @ w.T + lin.bias.double(), "Linear4bit")


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlora_linear_module(device, use_dora, dtype):
    def build(dev):
        mod = QLoRALinear.from_linear(_linear().to(dev), r=8, use_dora=use_dora)
        torch.manual_seed(2)
        for p in mod.parameters():
            if p.requires_grad:  # B starts at zero: make the adapter contribute
                nn.init.normal_(p, std=0.1)
                p.data = p.data.to(dtype).to(p.dtype)  # x's dtype holds them exactly
        return mod

    ref, ours = build("cpu"), build(device)
    x = torch.randn(5, 130, generator=torch.Generator().manual_seed(3)).to(dtype)
    dy = torch.randn(5, 70, generator=torch.Generator().manual_seed(4)).to(dtype)
    with qpeft.use_backend("default"):
        y_ref = ref(x)
        y_ref.backward(dy)
    y = ours(x.to(device))
    y.backward(dy.to(device))
    assert y.device.type == device.type
    grads = [
        (n, p.grad, q.grad) for (n, p), q in zip(ref.named_parameters(), ours.parameters()) if p.requires_grad
    ]
    for _, _, g in grads:
        assert g.device.type == device.type
    if not use_dora and cpu_computes_bf16("auto", x.to(device)):
        # The CPU backend's bf16 mode rounds W, x, the adapter and the intermediate products
        # to bf16: elementwise it may be further than a few ulps from the fp32 reference
        # where terms cancel. Hold both to the fp64 value within its derived bound instead.
        ad = ref.adapters["default"]
        problem = {
            "state": ref.base_layer.quant_state,
            "w": ref.base_layer.dequantize().double(),
            "x": x,
            "a": ad.lora_A.detach().to(dtype),
            "b": ad.lora_B.detach().to(dtype),
            "bias": ref.base_layer.bias.detach().to(dtype),
            "rank_scale": None,
            "out_scale": None,
            "dy": dy,
            "scaling": ad.scaling,
        }
        bounds = backend_oracle(problem, "cpu")
        got = {"y": y, **{("dA" if n.endswith("lora_A") else "dB"): g for n, _, g in grads}}
        assert len(got) == 3
        for key, value in got.items():
            exact, tol = bounds[key]
            assert_within(value.detach().float().cpu(), exact, tol, key)
        return
    torch.testing.assert_close(y.float().cpu(), y_ref.float(), **_tol(dtype))
    for name, want, g in grads:
        torch.testing.assert_close(g.float().cpu(), want.float(), **_tol(dtype), msg=name)


def _tol(dtype):
    # fp32: one summation order against another over k=130 products; bf16: a few bf16 ulps
    # (outputs and gradients are rounded to bf16 once or twice along the way).
    return {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}


def test_converted_tiny_llama_trains(device):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(4))

    def train(dev, backend):
        torch.manual_seed(0)
        model = qpeft.convert(transformers.LlamaForCausalLM(cfg).to(dev), r=8, verbose=False)
        for m in model.modules():
            if isinstance(m, QLoRALinear):
                for p in m.parameters():
                    if p.requires_grad:
                        nn.init.normal_(p, std=0.02)
        opt = optim.PagedAdamW8bit(
            [p for p in model.parameters() if p.requires_grad], lr=1e-3, min_8bit_size=1, page_min_numel=0
        )
        losses = []
        with qpeft.use_backend(backend) if backend else contextlib.nullcontext():
            for _ in range(2):
                loss = model(input_ids=ids.to(dev), labels=ids.to(dev)).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(float(loss.detach()))
        return losses

    want = train("cpu", "default")
    got = train(device, None)
    assert all(torch.isfinite(torch.tensor(got)))
    # fp32 model: the losses agree to fp32 summation-order error (a few ulps of log(128) ~ 4.9)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-4)
