"""The per-state check cache of ``qpeft._checks.state_4bit`` (docs/design.md, "Per-call
overhead"): a QuantState that passed is not checked again while its tensors and fields are
unchanged, and any change (a field reassigned, a tensor replaced, a tensor's dtype or size
changed in place) runs the full check again, with its usual error. Also the no-grad path of
``qlora_linear`` (no autograd node) against the autograd one."""

from __future__ import annotations

import pytest
import torch

import qpeft.functional as qf
from qpeft import QuantState, _checks
from qpeft.nn import Linear4bit, QLoRALinear


def _layer(double_quant=True, n=48, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    packed, state = qf.quantize_4bit(w, 64, "nf4", double_quant)
    a = torch.randn(4, k, generator=g) * 0.1
    b = torch.randn(n, 4, generator=g) * 0.1
    x = torch.randn(5, k, generator=g)
    return packed, state, a, b, x


@pytest.fixture
def full_checks(monkeypatch):
    """Counts the full (uncached) state checks."""
    calls = []
    full = _checks._state_4bit_full

    def counting(*args):
        calls.append(1)
        return full(*args)

    monkeypatch.setattr(_checks, "_state_4bit_full", counting)
    return calls


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_checked_once_while_unchanged(full_checks, double_quant):
    packed, state, a, b, x = _layer(double_quant)
    y0 = qf.qlora_linear(x, packed, state, a, b, 0.5)
    for _ in range(3):
        torch.testing.assert_close(qf.qlora_linear(x, packed, state, a, b, 0.5), y0, rtol=0, atol=0)
    assert len(full_checks) == 1
    # another packed tensor (same bytes) is another signature: checked again
    qf.qlora_linear(x, packed.clone(), state, a, b, 0.5)
    assert len(full_checks) == 2


def test_replaced_absmax_is_rechecked():
    packed, state, a, b, x = _layer()
    qf.qlora_linear(x, packed, state, a, b, 0.5)
    state.absmax = state.absmax.to(torch.int16)
    with pytest.raises(
        TypeError, match=r"absmax \(double-quantized codes\) must be torch.uint8, got torch.int16"
    ):
        qf.qlora_linear(x, packed, state, a, b, 0.5)


def test_absmax_dtype_changed_in_place_is_rechecked():
    packed, state, a, b, x = _layer(double_quant=False)
    qf.linear_4bit(x, packed, state)
    state.absmax.data = state.absmax.data.double()  # the same tensor object, another dtype
    with pytest.raises(TypeError, match="absmax must be torch.float32, got torch.float64"):
        qf.linear_4bit(x, packed, state)


def test_nested_absmax_resized_in_place_is_rechecked():
    packed, state, a, b, x = _layer()
    qf.qlora_linear(x, packed, state, a, b, 0.5)
    state.state2.absmax.resize_(0)
    with pytest.raises(ValueError, match="nested_absmax has 0 elements but 1 are needed"):
        qf.qlora_linear(x, packed, state, a, b, 0.5)


def test_replaced_nested_state_and_fields_are_rechecked():
    packed, state, a, b, x = _layer()
    qf.qlora_linear(x, packed, state, a, b, 0.5)
    good = state.state2
    state.state2 = QuantState(absmax=good.absmax[:0], code=good.code, blocksize=good.blocksize)
    with pytest.raises(ValueError, match="nested_absmax has 0 elements"):
        qf.qlora_linear(x, packed, state, a, b, 0.5)
    state.state2 = good
    qf.qlora_linear(x, packed, state, a, b, 0.5)
    state.blocksize = 128
    with pytest.raises(ValueError, match="absmax .* has 48 elements but 24 are needed"):
        qf.qlora_linear(x, packed, state, a, b, 0.5)
    state.blocksize = 64
    state.shape = torch.Size((64, 48))  # same element count, another matrix
    with pytest.raises(ValueError, match="x has 64 input features"):
        qf.qlora_linear(x, packed, state, a, b, 0.5)
    state.shape = [48, 64]  # a list (mutable): never cached, always checked
    qf.qlora_linear(x, packed, state, a, b, 0.5)
    state.shape[0] = 47
    with pytest.raises(ValueError, match="packed has 1536 elements but 1504 are needed"):
        qf.qlora_linear(x, packed, state, a, b, 0.5)


def test_truncated_packed_after_a_call_is_rechecked():
    lin = torch.nn.Linear(64, 48)
    layer = Linear4bit.from_linear(lin)
    x = torch.randn(3, 64)
    layer(x)
    layer.weight = layer.weight.packed[:-1]  # plain uint8 codes: wrapped with the layer's quant_state
    with pytest.raises(ValueError, match="packed has 1535 elements but 1536 are needed"):
        layer(x)


def test_load_state_dict_of_another_layer_takes_effect():
    torch.manual_seed(0)
    one = QLoRALinear.from_linear(torch.nn.Linear(64, 48), r=4)
    two = QLoRALinear.from_linear(torch.nn.Linear(64, 48), r=4)
    torch.nn.init.normal_(two.adapters["default"].lora_B)
    x = torch.randn(5, 64)
    with torch.no_grad():
        one(x)  # its state checked (and cached) once
        one.load_state_dict(two.state_dict())
        torch.testing.assert_close(one(x), two(x), rtol=0, atol=0)


@pytest.mark.parametrize("needs", ["x", "lora", "bias", "none"])
def test_no_grad_path_matches_autograd_path(needs):
    packed, state, a, b, x = _layer()
    bias = torch.randn(48)
    x = x.requires_grad_(needs == "x")
    a.requires_grad_(needs == "lora")
    b.requires_grad_(needs == "lora")
    bias.requires_grad_(needs == "bias")
    y = qf.qlora_linear(x, packed, state, a, b, 0.5, bias)
    with torch.no_grad():
        y_ng = qf.qlora_linear(x, packed, state, a, b, 0.5, bias)
    assert y.requires_grad == (needs != "none") and not y_ng.requires_grad
    torch.testing.assert_close(y_ng, y.detach(), rtol=0, atol=0)
    if needs != "none":
        y.sum().backward()
        grads = {"x": x.grad, "lora": a.grad, "bias": bias.grad}
        assert grads[needs] is not None


def test_no_grad_path_under_autocast_keeps_autocast_dtype():
    packed, state, a, b, x = _layer()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = qf.qlora_linear(x.reshape(5, 1, 64), packed, state, a, b, 0.5)
    assert y.dtype == torch.bfloat16 and y.shape == (5, 1, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the autograd path, same autocast
        ref = qf.qlora_linear(x.reshape(5, 1, 64).requires_grad_(), packed, state, a, b, 0.5)
    assert ref.requires_grad
    torch.testing.assert_close(y, ref.detach(), rtol=0, atol=0)


def test_no_grad_path_traces_under_torch_compile():
    """The check and the no-autograd forward trace with fullgraph=True (no graph break),
    and the compiled inference call equals eager."""
    torch.manual_seed(1)
    layer = QLoRALinear.from_linear(torch.nn.Linear(64, 48), r=4)
    torch.nn.init.normal_(layer.adapters["default"].lora_B)
    x = torch.randn(5, 64)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        y = compiled(x)
        assert torch.equal(y, layer(x))


def test_compiled_calls_leave_the_check_caches_alone():
    """torch.compile traces the full check, not the weak-keyed caches: a guard on those
    dictionaries' keys broke (StopIteration inside dynamo) when an unrelated entry was
    collected between compiling and calling."""
    import gc

    torch.manual_seed(2)
    others = [QLoRALinear.from_linear(torch.nn.Linear(64, 64), r=4) for _ in range(3)]
    x = torch.randn(5, 64)
    for other in others:
        other(x)  # their states enter the caches first
    layer = QLoRALinear.from_linear(torch.nn.Linear(64, 64), r=4)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    with torch.no_grad():
        y = compiled(x)
        assert layer.base_layer.quant_state not in _checks._checked_states
        del others, other
        gc.collect()
        assert torch.equal(compiled(x), y)
        assert torch.equal(layer(x), y)


@pytest.mark.parametrize("fn", ["linear_4bit", "qlora_linear"])
def test_offset_storage_swapped_in_place_is_read(fn):
    # the cached arguments held a [1] view of the offset: `.data =` with the same dtype and
    # shape (the signature holds) left it on the old storage, so the old offset was decoded
    packed, state, a, b, x = _layer()

    def call():
        if fn == "linear_4bit":
            return qf.linear_4bit(x, packed, state)
        return qf.qlora_linear(x, packed, state, a, b, 0.5)

    y0 = call()
    assert torch.equal(call(), y0)  # served from the cache
    state.offset.data = state.offset.data + 1.0
    y1 = call()
    assert not torch.equal(y1, y0)
    w = qf.dequantize_4bit(packed, state)
    ref = x @ w.t() + (0.5 * (x @ a.t()) @ b.t() if fn == "qlora_linear" else 0)
    torch.testing.assert_close(y1, ref, rtol=1e-5, atol=1e-4)
    assert torch.equal(call(), y1)
