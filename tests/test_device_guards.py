"""Every launch runs on its tensors' device and that device's current stream.

No GPU here: ``tests/_fake_cuda.py`` fakes two CUDA devices (device 0 current, tensors on
cuda:1) and records the current device and stream at each native call and Triton launch.
``test_removed_guard_is_caught`` proves the record fails when one guard is taken away.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import qpeft
import qpeft.functional as qf
from qpeft import optim

from ._fake_cuda import FakeCudaTensor, fake_cuda

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's numpy


def _host(t: torch.Tensor) -> torch.Tensor:
    with torch._C.DisableTorchFunctionSubclass():
        return t.as_subclass(torch.Tensor).clone()


def _quant_round_trip(x):
    """The quantization ops, double-quantized and not, plus 8-bit; returns the decoded results."""
    outs = []
    for double_quant in (False, True):
        packed, state = qf.quantize_4bit(x, 64, "nf4", double_quant)
        outs.append(qf.dequantize_4bit(packed, state, torch.float16))
    q, s8 = qf.quantize_blockwise(x)
    outs.append(qf.dequantize_blockwise(q, s8, torch.float32))
    return outs


def _reference(fn, *args):
    with qpeft.use_backend("default"):
        return fn(*args)


@pytest.fixture
def x_host():
    return torch.randn(6, 70, generator=torch.Generator().manual_seed(0))


def test_native_quant_and_gemv_on_tensor_device(monkeypatch, x_host):
    want = _reference(_quant_round_trip, x_host)
    packed_h, state_h = _reference(qf.quantize_4bit, x_host[:, :64].t().contiguous(), 64, "fp4", True)
    want_gemv = _reference(qf.gemv_4bit, x_host[:3, :6], packed_h, state_h)
    with fake_cuda(monkeypatch) as fake, qpeft.use_backend("cuda"):
        x = x_host.to("cuda:1")
        assert isinstance(x, FakeCudaTensor) and x.device == torch.device("cuda:1")
        got = _quant_round_trip(x)
        packed, state = qf.quantize_4bit(x[:, :64].t().contiguous(), 64, "fp4", True)
        y = qf.gemv_4bit(x[:3, :6], packed, state)
        fake.assert_all_on(1, {"native"})
        names = {name for _, name, *_ in fake.launches}
    assert {
        "quantize_4bit",
        "dequantize_4bit",
        "quantize_blockwise",
        "dequantize_blockwise",
        "gemv_4bit",
    } <= names
    # The fakes change nothing but the device: the emulated CUDA kernels still match the reference.
    for g, w in zip(got, want):
        torch.testing.assert_close(_host(g), w, rtol=0, atol=0)
    torch.testing.assert_close(_host(y), want_gemv, rtol=1e-5, atol=1e-5)


OPTIMIZERS = [
    (optim.AdamW, {}),
    (optim.AdamW8bit, {"min_8bit_size": 1}),
    (optim.PagedAdamW, {"page_min_numel": 0, "page_out": True}),
    (optim.PagedAdamW8bit, {"min_8bit_size": 1, "page_min_numel": 0, "page_out": True}),
    (optim.Lion, {}),
    (optim.Lion8bit, {"min_8bit_size": 1}),
    (optim.PagedLion, {"page_min_numel": 0, "page_out": True}),
    (optim.PagedLion8bit, {"min_8bit_size": 1, "page_min_numel": 0, "page_out": True}),
]


def _steps(cls, kwargs, params, grads):
    opt = cls(params, lr=1e-2, **kwargs)
    for _ in range(2):
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    return opt


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS, ids=[c.__name__ for c, _ in OPTIMIZERS])
def test_native_optimizer_steps_on_tensor_device(monkeypatch, cls, kwargs):
    g = torch.Generator().manual_seed(1)
    host = [torch.randn(n, generator=g) for n in (300, 17)]
    grads_h = [torch.randn(t.shape, generator=g) for t in host]
    ref = [t.clone().requires_grad_() for t in host]
    with qpeft.use_backend("default"):
        _steps(cls, {k: v for k, v in kwargs.items() if k != "page_min_numel"}, ref, grads_h)
    with fake_cuda(monkeypatch) as fake, qpeft.use_backend("cuda"):
        params = [t.to("cuda:1").requires_grad_() for t in host]
        grads = [t.to("cuda:1") for t in grads_h]
        opt = _steps(cls, kwargs, params, grads)
        paged = cls.__name__.startswith("Paged")
        if paged:
            states = [s for st in opt.state.values() for s in st.values() if isinstance(s, torch.Tensor)]
            assert any(opt._pager.is_paged(s) for s in states), "the paged optimizer paged nothing"
        fake.assert_all_on(1, {"native"})
        names = {name for _, name, *_ in fake.launches}
    assert any(name.endswith("_step") for name in names), names
    if paged:
        assert {"managed_dlpack", "prefetch"} <= names, names
    for p, r in zip(params, ref):
        torch.testing.assert_close(_host(p.detach()), r.detach(), rtol=1e-6, atol=1e-6)


def test_paged_location_on_tensor_device(monkeypatch):
    from qpeft.optim.paging import CudaManagedMemory

    with fake_cuda(monkeypatch) as fake:
        memory = CudaManagedMemory()
        t = memory.alloc(64, torch.float32, torch.device("cuda:1"))
        assert memory.location(t) == "device"
        memory.prefetch([t], torch.device("cuda:1"), to_host=True)
        fake.assert_all_on(1, {"native"})
        assert [name for _, name, *_ in fake.launches] == [
            "managed_dlpack",
            "prefetch_location",
            "concurrent_managed_access",
            "prefetch",
        ]


def _qlora(x, packed, state, a, b, bias, gy):
    y = qf.qlora_linear(x, packed, state, a, b, 0.5, bias)
    y.backward(gy)
    return y, x.grad, a.grad, b.grad


def test_triton_launches_on_tensor_device(monkeypatch, x_host):
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the mock runs the Triton kernels in the interpreter (a GPU machine runs them for real)")
    g = torch.Generator().manual_seed(2)
    w = torch.randn(24, 70, generator=g)
    a, b = torch.randn(8, 70, generator=g) / 8, torch.randn(24, 8, generator=g)
    bias, gy = torch.randn(24, generator=g), torch.randn(6, 24, generator=g)
    want = _reference(_quant_round_trip, x_host)
    with fake_cuda(monkeypatch) as fake, qpeft.use_backend("triton"):
        got = _quant_round_trip(x_host.to("cuda:1"))
        packed, state = qf.quantize_4bit(w.to("cuda:1"), 64, "nf4", True)
        leaves = [t.to("cuda:1").requires_grad_() for t in (x_host, a, b)]
        y, dx, da, db = _qlora(
            leaves[0], packed, state, leaves[1], leaves[2], bias.to("cuda:1"), gy.to("cuda:1")
        )
        fake.assert_all_on(1, {"triton"})
        names = {name for _, name, *_ in fake.launches}
    assert {"quantize_4bit_kernel", "qlora_fwd_kernel", "qlora_dx_kernel"} <= names, names
    for gt, wt in zip(got, want):
        torch.testing.assert_close(_host(gt), wt, rtol=0, atol=0)
    assert all(isinstance(t, FakeCudaTensor) for t in (y, dx, da, db))


def _no_guard(device):
    return contextlib.nullcontext()


@pytest.mark.parametrize(
    "module,backend",
    [
        ("qpeft.backends.native.quant", "cuda"),
        ("qpeft.backends.triton.quant", "triton"),
    ],
)
def test_removed_guard_is_caught(monkeypatch, x_host, module, backend):
    """The record is not vacuous: without one module's guard, its launches land on device 0."""
    import importlib
    import os

    if backend == "triton" and (
        importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1"
    ):
        pytest.skip("the Triton launches are recorded in the interpreter")
    monkeypatch.setattr(importlib.import_module(module), "on_device", _no_guard)
    with fake_cuda(monkeypatch) as fake, qpeft.use_backend(backend):
        qf.quantize_4bit(x_host.to("cuda:1"), 64, "nf4", False)
        with pytest.raises(AssertionError, match="not on cuda:1"):
            fake.assert_all_on(1, {"native" if backend == "cuda" else "triton"})


def test_removed_paging_guard_is_caught(monkeypatch):
    import qpeft.optim.paging as paging

    monkeypatch.setattr(paging, "on_device", _no_guard)
    with fake_cuda(monkeypatch) as fake:
        memory = paging.CudaManagedMemory()
        memory.prefetch(
            [memory.alloc(64, torch.float32, torch.device("cuda:1"))], torch.device("cuda:1"), False
        )
        with pytest.raises(AssertionError, match="not on cuda:1"):
            fake.assert_all_on(1, {"native"})
