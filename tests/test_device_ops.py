"""Every op on CPU and CUDA tensors, on every backend that serves the device, against the
reference ("default") computed on CPU. Without a GPU the CUDA cases are collected and
skipped; the CPU cases are a small sample (the per-op test files hold the full grids)."""

from __future__ import annotations

import pytest
import torch

import qpeft
import qpeft.functional as qf

from ._helpers import device_cases, within_reference
from .conftest import DTYPES, assert_bits_equal

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's numpy

# Odd numel (a padding nibble) with a partial last block, and a 2-D weight of partial rows.
SHAPES = [(3 * 64 + 5,), (33, 70)]


def _randn(shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def _on(backend, fn, *args, **kwargs):
    with qpeft.use_backend(backend):
        return fn(*args, **kwargs)


@pytest.mark.parametrize(
    "device,backend,quant_type,double_quant,dtype,shape",
    device_cases("quantize_4bit", ["nf4", "fp4"], [False, True], DTYPES, SHAPES, cpu=2),
)
def test_quantize_dequantize_4bit(device, backend, quant_type, double_quant, dtype, shape):
    x = _randn(shape, dtype, scale=3.0)
    p_ref, s_ref = _on("default", qf.quantize_4bit, x, 64, quant_type, double_quant)
    packed, state = _on(backend, qf.quantize_4bit, x.to(device), 64, quant_type, double_quant)
    assert packed.device.type == device and state.absmax.device.type == device
    assert_bits_equal(packed.cpu(), p_ref, "packed")
    assert_bits_equal(state.absmax.cpu(), s_ref.absmax, "absmax")
    if double_quant:
        assert_bits_equal(state.state2.absmax.cpu(), s_ref.state2.absmax, "nested absmax")
    for out_dtype in DTYPES:
        want = _on("default", qf.dequantize_4bit, p_ref, s_ref, out_dtype)
        got = _on(backend, qf.dequantize_4bit, packed, state, out_dtype)
        assert got.device.type == device
        assert_bits_equal(got.cpu(), want, f"dequantized to {out_dtype}")


@pytest.mark.parametrize(
    "device,backend,dtype,blocksize", device_cases("quantize_blockwise", DTYPES, [256, 64])
)
def test_blockwise_8bit(device, backend, dtype, blocksize):
    x = _randn((1000 + 3,), dtype)
    q_ref, s_ref = _on("default", qf.quantize_blockwise, x, blocksize)
    q, s = _on(backend, qf.quantize_blockwise, x.to(device), blocksize)
    assert q.device.type == device
    assert_bits_equal(q.cpu(), q_ref, "codes")
    assert_bits_equal(s.absmax.cpu(), s_ref.absmax, "absmax")
    got = _on(backend, qf.dequantize_blockwise, q, s, dtype)
    assert_bits_equal(got.cpu(), _on("default", qf.dequantize_blockwise, q_ref, s_ref, dtype), "decoded")


def _weight(n, k, quant_type, double_quant):
    w = _randn((n, k), seed=1)
    packed, state = _on("default", qf.quantize_4bit, w, 64, quant_type, double_quant)
    # the format decodes in fp32: that decoded W is the weight every backend multiplies by
    return packed, state, _on("default", qf.dequantize_4bit, packed, state, torch.float32).double()


@pytest.mark.parametrize(
    "device,backend,quant_type,dtype,m", device_cases("gemv_4bit", ["nf4", "fp4"], DTYPES, [1, 4])
)
def test_gemv_4bit(device, backend, quant_type, dtype, m):
    n, k = 70, 130  # partial blocks along k, odd n
    packed, state, w64 = _weight(n, k, quant_type, True)
    x = _randn((m, k), dtype, seed=2)
    ref = _on("default", qf.gemv_4bit, x, packed, state)
    y = _on(backend, qf.gemv_4bit, x.to(device), packed.to(device), state.to(device))
    assert y.device.type == device and y.dtype == dtype
    within_reference(y, ref, x.double() @ w64.T, "gemv")


def _qlora(x, packed, state, a, b, bias, gy):
    leaves = [t.clone().requires_grad_() for t in (x, a, b, bias)]
    y = qf.qlora_linear(leaves[0], packed, state, leaves[1], leaves[2], 0.5, leaves[3])
    y.backward(gy)
    return (y, *(t.grad for t in leaves))


@pytest.mark.parametrize(
    "device,backend,dtype,r,m", device_cases("qlora_linear", DTYPES, [8, 64], [1, 37], cpu=1)
)
def test_qlora_linear_forward_backward(device, backend, dtype, r, m):
    n, k = 48, 96
    packed, state, w64 = _weight(n, k, "nf4", True)
    x, gy = _randn((m, k), dtype, seed=3), _randn((m, n), dtype, seed=4)
    a, b = _randn((r, k), dtype, seed=5, scale=k**-0.5), _randn((n, r), dtype, seed=6)
    bias = _randn((n,), dtype, seed=7)
    ref = _on("default", _qlora, x, packed, state, a, b, bias, gy)
    moved = [t.to(device) for t in (x, a, b, bias, gy)]
    got = _on(backend, _qlora, moved[0], packed.to(device), state.to(device), *moved[1:])
    # fp64 oracle of the same function (W decoded exactly)
    x64, a64, b64, bias64, gy64 = (t.double() for t in (x, a, b, bias, gy))
    xa = x64 @ a64.T
    y64 = x64 @ w64.T + bias64 + 0.5 * xa @ b64.T
    dx64 = gy64 @ w64 + 0.5 * (gy64 @ b64) @ a64
    da64 = 0.5 * (gy64 @ b64).T @ x64
    db64 = 0.5 * gy64.T @ xa
    for name, ours, theirs, exact in zip(
        ("y", "dx", "dA", "dB", "dbias"), got, ref, (y64, dx64, da64, db64, gy64.sum(0))
    ):
        assert ours.device.type == device, name
        within_reference(ours, theirs, exact, name)


def test_triton_test_tensors_follow_the_device():
    """The Triton test files' factory calls land on the GPU when there is one (checked here
    with the meta device), seeded CPU draws included, with the same values as on CPU."""
    from ._helpers import _FactoriesOnDevice

    g = torch.Generator().manual_seed(5)
    with _FactoriesOnDevice("meta"):
        made = [
            torch.zeros(3),
            torch.tensor([1.0]),
            torch.randn(4, generator=g),
            torch.empty(2, device="cpu"),
        ]
    assert [t.device.type for t in made] == ["meta", "meta", "meta", "cpu"]
    with _FactoriesOnDevice("cpu"):
        drawn = torch.randn(4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(drawn, torch.randn(4, generator=torch.Generator().manual_seed(5)))
