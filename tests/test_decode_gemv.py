"""The decode path (docs/design.md, "Decode path"): Linear4bit, QLoRALinear without an active
adapter and ``qpeft.functional.linear_4bit`` run ``qpeft::gemv_4bit`` at 1 <= M <= 8 rows
(M = the product of x's leading dims) and the 4-bit matmul (``qpeft::qlora_linear`` without
an adapter) otherwise; the qlora ops take lora_A = lora_B = None and skip the LoRA terms.

Values: the GEMV path equals ``qf.gemv_4bit`` of the same backend bit for bit (with a bias,
the GEMV's fp32 result plus the bias, rounded once); the matmul path equals ``qlora_linear``
with a zero adapter bit for bit (its LoRA terms add exact zeros); the reference backend's
GEMV equals x @ W^T computed in fp32 by torch bit for bit. Across backends the CPU GEMV is
held to the derived bound of tests/_helpers.py (cpu_gemv_bound).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qpeft
import qpeft.functional as qf
from qpeft.nn import Linear4bit, QLoRALinear

from ._helpers import DTYPES, cpu_gemv_bound

K, N = 96, 40
QLORA_BACKENDS = ["default", "cpu", "triton"]


def _runnable(backend: str) -> None:
    """Skip Triton where it cannot run CPU tensors (no triton, or a GPU without the interpreter)."""
    if backend == "triton":
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton runs CPU tensors only under TRITON_INTERPRET=1")


def _ops_called(fn) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.key for e in prof.key_averages() if e.key.startswith("qpeft::")]


def _layer(bias=True, dtype=torch.float32, quant_type="nf4", double_quant=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(K, N, bias=bias).to(dtype)
    return Linear4bit.from_linear(lin, quant_type=quant_type, double_quant=double_quant)


@pytest.mark.parametrize("lead", [(1,), (3,), (8,), (2, 4), (1, 1, 5), (2, 1, 3)])
def test_linear4bit_decode_runs_the_gemv(lead):
    layer = _layer()
    x = torch.randn(*lead, K)
    ops = _ops_called(lambda: layer(x))
    assert "qpeft::gemv_4bit" in ops
    assert "qpeft::qlora_linear" not in ops and "qpeft::dequantize_4bit_nested" not in ops


@pytest.mark.parametrize("lead", [(9,), (3, 3), (0,), (17, 2)])
def test_linear4bit_more_rows_take_the_matmul(lead):
    layer = _layer()
    ops = _ops_called(lambda: layer(torch.randn(*lead, K)))
    assert "qpeft::qlora_linear" in ops and "qpeft::gemv_4bit" not in ops


@pytest.mark.parametrize("how", ["disabled", "no_active_adapter"])
@pytest.mark.parametrize("m", [1, 8, 9])
def test_qlora_linear_without_adapter_runs_the_gemv(how, m):
    torch.manual_seed(1)
    layer = QLoRALinear.from_linear(nn.Linear(K, N), r=4)
    if how == "disabled":
        layer.disable_adapters()
    else:
        layer.set_adapter(None)
    x = torch.randn(m, K)
    ops = _ops_called(lambda: layer(x))
    if m <= 8:
        assert "qpeft::gemv_4bit" in ops and "qpeft::qlora_linear" not in ops
    else:
        assert "qpeft::qlora_linear" in ops and "qpeft::gemv_4bit" not in ops
    assert torch.equal(layer(x), layer.base_layer(x))


def test_the_forward_builds_no_adapter_tensors(monkeypatch):
    # no zero-rank adapter per call: torch.zeros is never called by the forward
    layer = _layer()
    x = torch.randn(2, K)
    calls = []
    real = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    layer(x)
    layer(torch.randn(12, K))
    assert calls == []


def _gemv_then_bias(x, layer):
    """The GEMV path by hand: fp32 GEMV of x (exactly widened), + bias in fp32, one rounding."""
    y = qf.gemv_4bit(x.float(), layer.weight, layer.quant_state)
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y.to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("backend", ["default", "cpu"])
def test_gemv_path_values(dtype, bias, backend):
    layer = _layer(bias=bias, dtype=dtype)
    x = torch.randn(2, 3, K).to(dtype)
    with qpeft.use_backend(backend):
        y = layer(x)
        expected = _gemv_then_bias(x.reshape(6, K), layer).reshape(2, 3, N)
        no_bias = qf.gemv_4bit(x, layer.weight, layer.quant_state)
    assert y.dtype == dtype and y.shape == (2, 3, N)
    assert torch.equal(y, expected)
    if not bias:  # the GEMV rounds once to x's dtype: the same bits as through fp32
        assert torch.equal(y, no_bias)
    w = layer.dequantize(torch.float32)
    if backend == "default":  # the reference GEMV is torch's fp32 x @ W^T
        ref = x.reshape(6, K).float() @ w.T
        if bias:
            ref = ref + layer.bias.float()
        assert torch.equal(y.reshape(6, N), ref.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_path_within_the_cpu_bound_of_the_exact_product(dtype):
    layer = _layer(bias=False, quant_type="fp4", double_quant=False)
    x = torch.randn(5, K).to(dtype)
    with qpeft.use_backend("cpu"):
        y = layer(x)
    w = layer.dequantize(torch.float32)
    err = (y.double() - x.double() @ w.double().T).abs()
    assert bool((err <= cpu_gemv_bound(x, w, dtype, layer.blocksize)).all())


@pytest.mark.parametrize("backend", ["default", "cpu"])
def test_non_contiguous_x(backend):
    layer = _layer()
    wide = torch.randn(K + 5, 4).T  # [4, K + 5], column-major
    x = wide[:, 2 : K + 2]
    assert not x.is_contiguous()
    big = torch.randn(K, 12).T  # 12 rows: the matmul path
    w = layer.dequantize(torch.float32)
    with qpeft.use_backend(backend):
        for t in (x, big):
            y, y_c = layer(t), layer(t.contiguous())
            if backend == "cpu" and t is x:  # the C++ GEMV reads a contiguous copy: same bits
                assert torch.equal(y, y_c)
            else:  # torch's fp32 matmul may sum a strided x in another order: the fp32 bound
                tol = 2 * (t.abs() @ w.abs().T) * (K * 2.0**-24) + 1e-30
                assert bool(((y - y_c).abs() <= tol).all())


@pytest.mark.parametrize("m", [1, 8, 9, 20])
@pytest.mark.parametrize("backend", QLORA_BACKENDS)
def test_no_adapter_equals_a_zero_adapter(m, backend):
    # a zero adapter's terms add exact zeros, so skipping them changes no bit
    _runnable(backend)
    layer = _layer()
    x = torch.randn(m, K)
    a, b = torch.zeros(1, K), torch.zeros(N, 1)
    with qpeft.use_backend(backend):
        y0 = qf.qlora_linear(x, layer.weight, layer.quant_state, None, None, 0.0, layer.bias)
        yz = qf.qlora_linear(x, layer.weight, layer.quant_state, a, b, 0.0, layer.bias)
        scale = torch.rand(N)
        y0s = qf.qlora_linear(
            x, layer.weight, layer.quant_state, None, None, 1.0, layer.bias, out_scale=scale
        )
        yzs = qf.qlora_linear(x, layer.weight, layer.quant_state, a, b, 1.0, layer.bias, out_scale=scale)
        if m > 8 or backend == "triton":  # linear_4bit's matmul path is the no-adapter op
            assert torch.equal(qf.linear_4bit(x, layer.weight, layer.quant_state, layer.bias), y0)
    assert torch.equal(y0, yz) and torch.equal(y0s, yzs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: the CPU bf16 mode too
@pytest.mark.parametrize("backend", QLORA_BACKENDS)
def test_no_adapter_ops_directly(backend, dtype):
    _runnable(backend)
    layer = _layer()
    st = layer.quant_state
    x = torch.randn(11, K).to(dtype)
    quant = (st.absmax, st.state2.absmax, st.state2.code, st.offset.reshape(1), 64, 256, "nf4", N, K)
    zeros = (torch.zeros(1, K), torch.zeros(N, 1))
    dy = torch.randn(11, N).to(dtype)
    with qpeft.use_backend(backend):
        y, xa = torch.ops.qpeft.qlora_linear(x, layer.weight, *quant, None, None, 0.0, None, None, None, True)
        yz, _ = torch.ops.qpeft.qlora_linear(x, layer.weight, *quant, *zeros, 0.0, None, None, None, True)
        grads = torch.ops.qpeft.qlora_linear_backward(
            dy, x, layer.weight, *quant, None, None, x.new_empty(0), 0.0, None, None, True, False, False, True
        )
        zgrads = torch.ops.qpeft.qlora_linear_backward(
            dy, x, layer.weight, *quant, *zeros, x.new_empty(0), 0.0, None, None, True, False, False, True
        )
    assert torch.equal(y, yz) and xa.numel() == 0
    assert torch.equal(grads[0], zgrads[0]) and torch.equal(grads[3], zgrads[3])
    assert grads[1].numel() == 0 and grads[2].numel() == 0


def test_fake_kernels_take_no_adapter():
    layer = _layer()
    st = layer.quant_state
    meta = lambda t: t.to("meta")
    quant = (meta(st.absmax), meta(st.state2.absmax), meta(st.state2.code), meta(st.offset.reshape(1)))
    quant = (*quant, 64, 256, "nf4", N, K)
    x = torch.empty(3, K, device="meta")
    y, xa = torch.ops.qpeft.qlora_linear(
        x, meta(layer.weight), *quant, None, None, 0.0, None, None, None, True
    )
    assert y.shape == (3, N) and xa.shape == (0,)
    dx, da, db, dbias = torch.ops.qpeft.qlora_linear_backward(
        torch.empty(3, N, device="meta"), x, meta(layer.weight), *quant, None, None, x.new_empty(0), 0.0,
        None, None, True, False, False, True,
    )  # fmt: skip
    assert dx.shape == (3, K) and da.shape == (0,) and db.shape == (0,) and dbias.shape == (N,)


@pytest.mark.parametrize("m", [1, 6, 13])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_wrt_x_and_bias(m, dtype):
    layer = _layer(dtype=dtype)
    layer.bias.requires_grad_(True)
    x = torch.randn(m, K).to(dtype).requires_grad_()
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    w = layer.dequantize(torch.float32)
    # the reference's dx = dy @ W in fp32, rounded once; dbias = sum(dy) in fp32
    with qpeft.use_backend("default"):
        dx_ref, _, _, dbias_ref = torch.ops.qpeft.qlora_linear_backward(
            dy, x.detach(), layer.weight, layer.quant_state.absmax, layer.quant_state.state2.absmax,
            layer.quant_state.state2.code, layer.quant_state.offset.reshape(1), 64, 256, "nf4", N, K,
            None, None, x.new_empty(0), 0.0, None, None, True, False, False, True,
        )  # fmt: skip
    assert x.grad.dtype == dtype and layer.bias.grad.dtype == dtype
    exact = dy.double() @ w.double()
    # Bound: fp32 accumulation over N (gamma_N * sum |dy w|, Higham 3.1), plus for 16-bit x
    # the one rounding of dx to its dtype (u_d |dx|) and, in the CPU backend's bf16 mode
    # (bf16 x on CPUs with bf16 units), W decoded to bf16: each product off by u_d relative.
    a = dy.double().abs() @ w.double().abs()
    u_d = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 0.0}[dtype]
    tol = a * (N * 2.0**-24 + u_d) + exact.abs() * u_d + 1e-30
    assert bool(((x.grad.double() - exact).abs() <= tol).all())
    assert bool(((x.grad.double() - dx_ref.double()).abs() <= 2 * tol).all())
    assert torch.equal(layer.bias.grad, dbias_ref.to(dtype))


def test_gradcheck_fp64_through_the_matmul_path():
    layer = _layer(quant_type="fp4")
    x = torch.randn(3, K, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(N, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, b: qf.linear_4bit(x, layer.weight, layer.quant_state, b), (x, bias), eps=1e-6, atol=1e-5
    )


def test_no_weight_gradient_and_nothing_saved_of_x():
    layer = _layer()
    x = torch.randn(4, K, requires_grad=True)
    y = qf.linear_4bit(x, layer.weight, layer.quant_state)
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    assert all(t.data_ptr() != x.data_ptr() for t in saved)
    assert not layer.weight.requires_grad and y.requires_grad


def test_autocast_casts_x():
    layer = _layer(bias=True)
    x = torch.randn(4, K)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, layer(x.to(torch.bfloat16)))


def test_linear_4bit_argument_errors():
    layer = _layer()
    with pytest.raises(ValueError, match="in_features"):
        qf.linear_4bit(torch.randn(2, K + 1), layer.weight, layer.quant_state)
    with pytest.raises(ValueError, match="bias must have shape"):
        qf.linear_4bit(torch.randn(2, K), layer.weight, layer.quant_state, torch.zeros(N + 1))
    with pytest.raises(ValueError, match="given together"):
        qf.qlora_linear(torch.randn(2, K), layer.weight, layer.quant_state, torch.zeros(1, K), None, 1.0)
    with pytest.raises(ValueError, match="rank_scale"):
        qf.qlora_linear(
            torch.randn(2, K), layer.weight, layer.quant_state, None, None, 1.0, rank_scale=torch.ones(1)
        )


def test_a_forced_backend_without_a_gemv_takes_the_matmul():
    # use_backend("triton") has no gemv_4bit kernel: the decode path must not raise
    _runnable("triton")
    layer = _layer()
    x = torch.randn(2, K)
    with qpeft.use_backend("triton"):
        ops = _ops_called(lambda: layer(x))
        y = layer(x)
    assert "qpeft::qlora_linear" in ops and "qpeft::gemv_4bit" not in ops
    with qpeft.use_backend("default"):
        ref = qf.qlora_linear(
            x, layer.weight, layer.quant_state, torch.zeros(1, K), torch.zeros(N, 1), 0.0, layer.bias
        )
    w = layer.dequantize(torch.float32)
    tol = (x.abs() @ w.abs().T) * (K * 2.0**-24) + 1e-30
    assert bool(((y - ref).abs() <= tol).all())


@settings(max_examples=25, deadline=None)
@given(
    lead=st.lists(st.integers(0, 5), min_size=1, max_size=3),
    k=st.integers(1, 130),
    n=st.integers(1, 40),
    blocksize=st.sampled_from([32, 64, 128]),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    double_quant=st.booleans(),
    bias=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_linear_4bit_random_shapes(lead, k, n, blocksize, quant_type, double_quant, bias, dtype, seed):
    """Any x [..., K]: the GEMV path (1 <= M <= 8) equals the fp32 GEMV plus the bias rounded
    once, the matmul path the no-adapter op, bit for bit; the op that ran is the one M picks."""
    g = torch.Generator().manual_seed(seed)
    packed, state = qf.quantize_4bit(torch.randn(n, k, generator=g), blocksize, quant_type, double_quant)
    x = torch.randn(*lead, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    m = x.numel() // k
    ops = _ops_called(lambda: qf.linear_4bit(x, packed, state, b))
    y = qf.linear_4bit(x, packed, state, b)
    assert y.shape == (*lead, n) and y.dtype == dtype
    x2 = x.reshape(-1, k)
    if 1 <= m <= 8:
        assert "qpeft::gemv_4bit" in ops and "qpeft::qlora_linear" not in ops
        expected = qf.gemv_4bit(x2.float(), packed, state)
        expected = (expected + b.float() if bias else expected).to(dtype)
    else:
        assert "qpeft::qlora_linear" in ops and "qpeft::gemv_4bit" not in ops
        expected = qf.qlora_linear(x2, packed, state, None, None, 0.0, b)
    assert torch.equal(y.reshape(-1, n), expected)


def test_kernel_backend_names_the_kernel_that_would_run():
    from qpeft._dispatch import has_kernel, kernel_backend

    assert kernel_backend("gemv_4bit", "cpu") in ("cpu", "default")
    with qpeft.use_backend("default"):
        assert kernel_backend("gemv_4bit", torch.device("cpu")) == "default"
        assert has_kernel("qlora_linear", "cpu")
    if os.environ.get("TRITON_INTERPRET") == "1" and "triton" in qpeft.available_backends():
        with qpeft.use_backend("triton"):
            assert kernel_backend("gemv_4bit", "cpu") is None  # Triton has no GEMV
            assert kernel_backend("qlora_linear", "cpu") == "triton"
