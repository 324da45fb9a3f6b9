"""torch's dispatcher sees qpeft's kernels; the backend choice on top of it; arguments are
checked once, at the public boundary (qpeft.functional), with clear errors."""

from __future__ import annotations

import pytest
import torch

import qpeft
from qpeft import _checks, _dispatch, _ops
from qpeft import functional as qf


def test_every_op_has_device_kernels_for_cpu_and_cuda():
    ops = _ops.OPS
    assert "dequantize_4bit" in ops and "qlora_linear" in ops and "adamw8bit_multi_step_" in ops
    for op in ops:
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"qpeft::{op}", key), (op, key)
        # no catch-all kernel: the device key decides (the optimizer steps route what
        # reaches no device key, a sparse gradient or empty lists, through their checks)
        catch_all = torch._C._dispatch_has_kernel_for_dispatch_key(
            f"qpeft::{op}", "CompositeExplicitAutograd"
        )
        assert catch_all == op.endswith("_step_"), op


def test_profiler_names_the_op():
    x = torch.randn(64, 64)
    packed, state = qf.quantize_4bit(x)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        qf.dequantize_4bit(packed, state)
    names = {e.key for e in prof.key_averages()}
    assert "qpeft::dequantize_4bit_nested" in names


def test_compile_traces_the_ops_without_graph_breaks():
    x = torch.randn(32, 64)
    packed, state = qf.quantize_4bit(x, double_quant=False)

    def f(p, a):
        return torch.ops.qpeft.dequantize_4bit(p, a, 64, "nf4", [32, 64], torch.float32) * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(packed, state.absmax), f(packed, state.absmax), rtol=0, atol=0)


def test_default_choice_is_probed_once_and_cached(monkeypatch):
    backend = _dispatch._backends["cpu"]
    calls = []
    real = backend.unavailable

    def counting():
        calls.append(1)
        return real()

    monkeypatch.setattr(backend, "unavailable", counting)
    _dispatch.reset()
    try:
        x = torch.randn(256)
        for _ in range(5):
            qf.quantize_4bit(x)
        assert len(calls) == 1
        assert _dispatch.kernel_for("quantize_4bit", "cpu") is _dispatch.kernels_of("cpu")["quantize_4bit"]
    finally:
        monkeypatch.undo()
        _dispatch.reset()


def test_unavailable_cpu_module_falls_back_to_the_reference(monkeypatch):
    # (the one-time warning of a missing qpeft._C is tested in test_cli.py, in a subprocess)
    backend = _dispatch._backends["cpu"]
    monkeypatch.setattr(backend, "unavailable", lambda: "qpeft._C could not be imported (test)")
    _dispatch.reset()
    try:
        x = torch.randn(300)
        packed = qf.quantize_4bit(x)[0]
        assert (
            _dispatch.kernel_for("quantize_4bit", "cpu") is _dispatch.kernels_of("default")["quantize_4bit"]
        )
        with qpeft.use_backend("default"):
            assert torch.equal(packed, qf.quantize_4bit(x)[0])
        with pytest.raises(qpeft.BackendUnavailableError, match="test"):
            with qpeft.use_backend("cpu"):
                pass
    finally:
        monkeypatch.undo()
        _dispatch.reset()


def test_use_backend_forces_and_refuses():
    x = torch.randn(128)
    with qpeft.use_backend("default"):
        assert qpeft.current_backend() == "default"
        assert (
            _dispatch.kernel_for("quantize_4bit", "cpu") is _dispatch.kernels_of("default")["quantize_4bit"]
        )
    assert qpeft.current_backend() is None
    with pytest.raises(qpeft.BackendUnavailableError, match="unknown backend"):
        with qpeft.use_backend("nope"):
            pass
    if "cuda_emulated" in qpeft.available_backends():
        # a forced backend without the op's kernel raises instead of falling back (the
        # emulated backend serves every op, so one of its kernels is hidden for the check)
        packed, state = qf.quantize_4bit(torch.randn(16, 64))
        a, b = torch.randn(4, 64), torch.zeros(16, 4)
        table = _dispatch._backends["cuda_emulated"].kernels
        kernel = table.pop("qlora_linear")
        try:
            with (
                qpeft.use_backend("cuda_emulated"),
                pytest.raises(qpeft.BackendUnavailableError, match="no kernel"),
            ):
                qf.qlora_linear(torch.randn(2, 64), packed, state, a, b, 1.0)
        finally:
            table["qlora_linear"] = kernel
    assert qf.quantize_4bit(x)[0].shape == (64, 1)


def test_functional_checks_each_argument_once(monkeypatch):
    """The public call checks the quantization state once; the ops below do not re-check."""
    calls = []
    for name in ("dequantize_4bit", "dequantize_4bit_nested", "state_4bit", "qlora_linear"):
        real = getattr(_checks, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(_checks, name, spy)
    w = torch.randn(48, 64)
    packed, state = qf.quantize_4bit(w)
    calls.clear()
    qf.dequantize_4bit(packed, state)
    assert calls == ["state_4bit", "dequantize_4bit_nested"]
    calls.clear()
    a = torch.randn(4, 64, requires_grad=True)
    b = torch.randn(48, 4, requires_grad=True)
    x = torch.randn(3, 64, requires_grad=True)
    y = qf.qlora_linear(x, packed, state, a, b, 0.5)
    y.sum().backward()
    assert calls == ["qlora_linear", "state_4bit", "dequantize_4bit_nested"]


def test_out_version_counter_is_bumped():
    packed, state = qf.quantize_4bit(torch.randn(64), double_quant=False)
    out = torch.empty(64)
    v = out._version
    qf.dequantize_4bit(packed, state, out=out)
    assert out._version > v


def test_sparse_tensors_get_clear_errors():
    p, g, m, v = torch.randn(10), torch.randn(10).to_sparse(), torch.zeros(10), torch.zeros(10)
    with pytest.raises(TypeError, match="sparse"):
        torch.ops.qpeft.adamw32_step_(p, g, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
    with pytest.raises(TypeError, match="sparse"):
        torch.ops.qpeft.adamw32_multi_step_([p], [g], [m], [v], 1e-3, 0.9, 0.999, 1e-8, 0.0, [1])
    with pytest.raises(TypeError, match="dense"):
        qf.quantize_4bit(torch.randn(64).to_sparse())


def test_multi_step_with_empty_lists_is_a_no_op():
    torch.ops.qpeft.adamw32_multi_step_([], [], [], [], 1e-3, 0.9, 0.999, 1e-8, 0.0, [])
    torch.ops.qpeft.lion32_multi_step_([], [], [], 1e-3, 0.9, 0.99, 0.0)


# --- defects found by tests written outside the project: each now a clear error ----------


@pytest.mark.parametrize("backend", ["default", "cpu"])
def test_dequantize_out_overlapping_packed_is_refused(backend):
    if backend not in qpeft.available_backends():
        pytest.skip(f"backend {backend} unavailable here")
    n = 8192
    x = torch.randn(n)
    with qpeft.use_backend(backend):
        packed, state = qf.quantize_4bit(x, double_quant=False, blocksize=64)
        storage = torch.empty(n * 4 + packed.numel(), dtype=torch.uint8)
        storage[: packed.numel()] = packed.reshape(-1)
        overlapping_packed = storage[: packed.numel()].view(-1, 1)
        out = storage[: n * 4].view(torch.float32)  # starts on the packed bytes
        with pytest.raises(ValueError, match="overlaps packed"):
            qf.dequantize_4bit(overlapping_packed, state, out=out)
        q, s8 = qf.quantize_blockwise(x)
        big = torch.empty(n * 4, dtype=torch.uint8)
        big[:n] = q
        with pytest.raises(ValueError, match="overlaps q"):
            qf.dequantize_blockwise(big[:n], s8, out=big.view(torch.float32))


def test_disjoint_out_in_one_buffer_is_accepted():
    x = torch.randn(128)
    packed, state = qf.quantize_4bit(x, double_quant=False)
    buf = torch.empty(128 * 4 + 64, dtype=torch.uint8)
    p = buf[:64].view(64, 1)
    p.copy_(packed)
    out = buf[64:].view(torch.float32)
    torch.testing.assert_close(qf.dequantize_4bit(p, state, out=out), qf.dequantize_4bit(packed, state))


def test_bool_packed_is_refused():
    packed, state = qf.quantize_4bit(torch.randn(64), double_quant=False)
    with pytest.raises(TypeError, match="bool"):
        qf.dequantize_4bit(packed.bool(), state)
    a, b = torch.randn(2, 8), torch.randn(8, 2)
    packed, state = qf.quantize_4bit(torch.randn(8, 8))
    with pytest.raises(TypeError, match="bool"):
        qf.qlora_linear(torch.randn(1, 8), packed.bool(), state, a, b, 1.0)
    with pytest.raises(TypeError, match="bool"):
        qf.gemv_4bit(torch.randn(1, 8), packed.bool(), state)


def test_quant_storage_dtypes_are_viewed_as_bytes():
    x = torch.randn(64, 64)
    packed, state = qf.quantize_4bit(x)
    as_bf16 = (
        packed.reshape(-1).view(torch.bfloat16).reshape(-1, 1)
    )  # bitsandbytes' quant_storage=torch.bfloat16
    assert torch.equal(qf.dequantize_4bit(as_bf16, state), qf.dequantize_4bit(packed, state))


@pytest.mark.parametrize(
    "call",
    [
        lambda: qf.quantize_4bit([1.0, 2.0]),
        lambda: qf.quantize_blockwise((1.0, 2.0)),
        lambda: qf.dequantize_4bit([0, 1], qf.quantize_4bit(torch.randn(4))[1]),
        lambda: qf.quantize_blockwise(torch.randn(8), code=[0.0] * 256),
    ],
)
def test_non_tensor_inputs_name_the_argument(call):
    with pytest.raises(TypeError, match="must be a torch.Tensor, got (list|tuple)"):
        call()


def test_offset_none_with_double_quant_is_a_type_error():
    packed, state = qf.quantize_4bit(torch.randn(64, 64))
    state.offset = None
    with pytest.raises(TypeError, match="state.offset"):
        qf.dequantize_4bit(packed, state)
    with pytest.raises(TypeError, match="state.offset"):
        qf.gemv_4bit(torch.randn(1, 64), packed, state)


@pytest.mark.parametrize("double_quant", [False, True])
def test_meta_tensors_are_supported(double_quant):
    x = torch.empty(128, 96, device="meta")
    packed, state = qf.quantize_4bit(x, double_quant=double_quant)
    assert packed.is_meta and packed.shape == (128 * 96 // 2, 1)
    assert state.absmax.is_meta and state.nested == double_quant
    w = qf.dequantize_4bit(packed, state, torch.bfloat16)
    assert w.is_meta and w.shape == (128, 96) and w.dtype == torch.bfloat16
    q, s8 = qf.quantize_blockwise(torch.empty(1000, device="meta"))
    assert q.is_meta and s8.absmax.shape == (4,)
