"""Shared by the tests of the CUDA emulation (backend "cuda_emulated", module qpeft._C_cuda_emu)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qpeft import _native

from ._helpers import assert_same_values  # noqa: F401  (re-exported: the emulation tests' comparison)


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
