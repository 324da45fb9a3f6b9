"""Shared by the tests of the CUDA emulation (backend "cuda_emulated", module qpeft._C_cuda_emu)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from qpeft import _native

from .conftest import assert_bits_equal


def cuda_headers_present() -> bool:
    """Whether the build should have produced qpeft._C_cuda_emu (CMakeLists.txt looks in the same places)."""
    roots = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH", "CUDAToolkit_ROOT")]
    dirs = [Path(r) / "include" for r in roots if r] + [
        Path("/usr/local/cuda/include"),
        Path("/opt/cuda/include"),
    ]
    dirs.append(Path("/usr/include"))
    return any((d / "cuda_bf16.h").exists() and (d / "cuda_runtime.h").exists() for d in dirs)


def emu_module():
    """qpeft._C_cuda_emu; skips only where the CUDA toolkit headers are absent (it cannot be built
    there), and fails where they are present but the module is missing."""
    reason = _native.cuda_emu_unavailable()
    if reason is None:
        return _native.cuda_emu_module()
    if os.environ.get("QPEFT_CUDA_EMULATION", "auto").strip() == "0":
        pytest.skip("built with QPEFT_CUDA_EMULATION=0")
    if cuda_headers_present():
        pytest.fail(f"the CUDA toolkit headers are installed but the emulation module is missing: {reason}")
    pytest.skip(f"no CUDA toolkit headers: the emulation module cannot be built ({reason})")


def assert_same_values(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Bit-identical where the expected value is not NaN, NaN where it is NaN.

    The device (and so the emulation, which runs its conversions) writes the canonical
    NaN 0x7fff when rounding a NaN to fp16/bf16, torch writes 0x7fc0 / 0x7e00: only the
    payload of NaNs may differ.
    """
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    if actual.is_floating_point():
        nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
        assert torch.equal(nan_a, nan_e), f"{what}: NaN positions differ"
        actual = torch.where(nan_a, torch.zeros((), dtype=actual.dtype), actual)
        expected = torch.where(nan_e, torch.zeros((), dtype=expected.dtype), expected)
    assert_bits_equal(actual, expected, what)
