"""The CUDA C++ backend is probed once (qpeft._C_cuda.probe: a tiny kernel launched and waited
for) before it is considered available: a failing probe (a driver older than the build's
toolkit) makes it unavailable with exactly one CudaFallbackWarning, and CUDA ops then resolve
to Triton or the reference instead of raising. No GPU here: the module and torch's view of
the device are mocked."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

import qpeft
from qpeft import _dispatch, _native
from qpeft.optim.paging import StatePager

DRIVER_TOO_OLD = (
    "cudaGetDeviceCount: cudaErrorInsufficientDriver (CUDA driver version is insufficient for CUDA "
    "runtime version); the driver supports CUDA 12.8, this module was built with CUDA 13.0"
)


@pytest.fixture
def fake_cuda_module(monkeypatch):
    """qpeft._C_cuda replaced by a module whose probe() returns ``result[0]`` (counting calls),
    with torch seeing a GPU; every cache of the probe and the dispatcher reset around it."""
    result = [""]
    calls = []

    def probe():
        calls.append(1)
        return result[0]

    fake = types.SimpleNamespace(probe=probe)
    real_load = _native._load

    def load(name):
        return (fake, None) if name == "_C_cuda" else real_load(name)

    monkeypatch.setattr(_native, "_load", load)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_native, "_warned_cuda_fallback", False)
    _native._cuda_probe.cache_clear()
    _dispatch.reset()
    yield result, calls
    monkeypatch.undo()
    _native._cuda_probe.cache_clear()
    _dispatch.reset()


def test_failing_probe_makes_the_backend_unavailable_with_one_warning(fake_cuda_module):
    result, calls = fake_cuda_module
    result[0] = DRIVER_TOO_OLD
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reason = _dispatch.unavailable_reason("cuda")
        assert "cuda" not in qpeft.available_backends()
        _dispatch.reset()  # even a re-probe of the dispatcher asks the module only once
        assert _native.cuda_unavailable() == reason
        # CUDA ops resolve past the CUDA C++ backend: gemv_4bit (no Triton kernel) to the
        # reference, quantize_4bit to the first available of Triton and the reference
        assert _dispatch.kernel_for("gemv_4bit", "cuda") is _dispatch.kernels_of("default")["gemv_4bit"]
        assert (
            _dispatch.kernel_for("quantize_4bit", "cuda") is not _dispatch.kernels_of("cuda")["quantize_4bit"]
        )
        with pytest.raises(qpeft.BackendUnavailableError, match="cudaErrorInsufficientDriver"):
            with qpeft.use_backend("cuda"):
                pass
    assert "cudaErrorInsufficientDriver" in reason and "CUDA 13.0" in reason
    fallback = [w for w in caught if issubclass(w.category, qpeft.CudaFallbackWarning)]
    assert len(fallback) == 1, [str(w.message) for w in caught]
    assert issubclass(qpeft.CudaFallbackWarning, qpeft.ReferenceFallbackWarning)
    message = str(fallback[0].message)
    assert "\n" not in message and "cudaErrorInsufficientDriver" in message and "docs/gpu.md" in message
    assert len(calls) == 1  # probed once per process (cached)


def test_failing_probe_keeps_paged_optimizer_state_in_device_memory(fake_cuda_module):
    result, _ = fake_cuda_module
    result[0] = "device 0: launching a probe kernel: cudaErrorNoKernelImageForDevice"
    pager = StatePager(paged=True, page_out=False, page_min_numel=0)
    param = torch.empty(0, device="meta")
    param_cuda = types.SimpleNamespace(numel=lambda: 10, device=torch.device("cuda", 0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert pager.placement(param_cuda) == "device"  # not "paged": no managed memory to allocate
        assert pager.placement(param_cuda) == "device"
    assert sum(issubclass(w.category, qpeft.CudaFallbackWarning) for w in caught) == 1
    assert pager.placement(param) != "paged"


def test_successful_probe_makes_the_backend_available_without_warning(fake_cuda_module):
    result, calls = fake_cuda_module
    result[0] = ""
    with warnings.catch_warnings():
        warnings.simplefilter("error", qpeft.ReferenceFallbackWarning)
        assert _native.cuda_unavailable() is None
        assert _dispatch.unavailable_reason("cuda") is None
        assert _dispatch.kernel_for("gemv_4bit", "cuda") is _dispatch.kernels_of("cuda")["gemv_4bit"]
        _dispatch.reset()
        assert _dispatch.unavailable_reason("cuda") is None
    assert len(calls) == 1


def test_a_probe_that_raises_counts_as_failed(fake_cuda_module, monkeypatch):
    def boom():
        raise RuntimeError("driver shim crashed")

    real_load = _native._load
    monkeypatch.setattr(
        _native,
        "_load",
        lambda name: (types.SimpleNamespace(probe=boom), None) if name == "_C_cuda" else real_load(name),
    )
    with pytest.warns(qpeft.CudaFallbackWarning, match="driver shim crashed"):
        assert "driver shim crashed" in _native.cuda_unavailable()


def test_no_probe_without_a_device(fake_cuda_module, monkeypatch):
    _, calls = fake_cuda_module
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _native.cuda_unavailable() == "torch sees no CUDA device"
    assert calls == []


def test_emulation_module_has_the_probe():
    """The binding is shared: the emulation build answers the probe too (it drives no device)."""
    if _native.cuda_emu_unavailable() is not None:
        pytest.skip(_native.cuda_emu_unavailable())
    assert _native.cuda_emu_module().probe() == ""


# --- setup.py: qpeft._C_cuda is built for torch's CUDA major version ---------------------------


def _setup_functions():
    """setup.py's definitions, without its setup() call."""
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "setup.py"
    ns = {"__name__": "qpeft_setup_under_test", "__file__": str(path)}
    exec(compile(path.read_text().split("\next_modules = [")[0], str(path), "exec"), ns)
    return ns


@pytest.fixture
def fake_nvcc(tmp_path, monkeypatch):
    nvcc = tmp_path / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.88'\n")
    nvcc.chmod(0o755)
    monkeypatch.setenv("CUDACXX", str(nvcc))
    monkeypatch.delenv("CMAKE_CUDA_COMPILER", raising=False)
    return str(nvcc)


@pytest.mark.parametrize(
    "torch_cuda,mode,built",
    [("13.0", "auto", True), ("13.2", "1", True), ("none", "auto", True), ("12.8", "auto", False)],
)
def test_setup_builds_cuda_only_for_torchs_major(fake_nvcc, monkeypatch, capsys, torch_cuda, mode, built):
    monkeypatch.setenv("QPEFT_TORCH_CUDA", torch_cuda)
    monkeypatch.setenv("QPEFT_CUDA", mode)
    setup = _setup_functions()
    monkeypatch.setattr(setup["Path"], "glob", lambda self, pattern: iter(()))  # no /usr/local/cuda-12.*
    assert setup["_cuda_setting"]() == ((True, fake_nvcc) if built else (False, None))
    out = capsys.readouterr().out
    if not built:
        assert "is CUDA 13.0 but torch (QPEFT_TORCH_CUDA) is built with CUDA 12.8" in out
        assert "SKIPPING qpeft._C_cuda" in out


def test_setup_refuses_a_mismatched_nvcc_when_cuda_is_required(fake_nvcc, monkeypatch):
    monkeypatch.setenv("QPEFT_TORCH_CUDA", "12.8")
    monkeypatch.setenv("QPEFT_CUDA", "1")
    setup = _setup_functions()
    monkeypatch.setattr(setup["Path"], "glob", lambda self, pattern: iter(()))
    with pytest.raises(RuntimeError, match=r"CUDA 13\.0 but torch .* CUDA 12\.8.*docs/gpu\.md"):
        setup["_cuda_setting"]()
