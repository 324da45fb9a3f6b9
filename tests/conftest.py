"""Shared fixtures: the ``backend`` fixture, per-backend hypothesis budgets, and the
re-exported assertion helpers (their home is tests/_helpers.py).

Every kernel is held to the pure-torch reference (backend "default"). Bit-exact
comparisons look at the raw bits, so -0.0 vs +0.0 and NaN payload differences in
finite-input cases would show.
"""

from __future__ import annotations

import os

import torch

# Without a GPU, Triton's interpreter runs the Triton kernels on CPU tensors (how CI
# executes them); it must be chosen before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings

import qpeft

from ._helpers import DTYPES, assert_bits_equal, bits  # noqa: F401  (re-exported for the test modules)

settings.register_profile(
    "qpeft",
    deadline=None,
    max_examples=int(os.environ.get("QPEFT_HYPOTHESIS_EXAMPLES", "60")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("qpeft")

# Native CPU kernels are always built by `pip install .`; a missing qpeft._C fails
# these tests (use_backend raises) instead of skipping them.
CPU_BACKENDS = ["cpu"]

# Every backend that runs on CPU tensors here: the reference, the C++ CPU kernels, the
# Triton kernels under TRITON_INTERPRET=1 and the CUDA C++ kernels run by the emulation
# harness. Which of them implement which op (test_backends.py checks these lists
# against the registry, so a new kernel cannot go untested):
ALL_BACKENDS = ["default", "cpu", "triton", "cuda_emulated"]
QUANT_BACKENDS = ALL_BACKENDS  # quantize/dequantize 4-bit (+nested) and 8-bit blockwise
GEMV_BACKENDS = ["default", "cpu", "cuda_emulated"]
QLORA_BACKENDS = ["default", "cpu", "triton", "cuda_emulated"]
OPTIM_BACKENDS = ["default", "cpu", "cuda_emulated"]


def _require(name: str) -> None:
    """Skip (with the reason) where ``name`` cannot run on CPU tensors here; never for "cpu"
    or "default", and for "cuda_emulated" only where it cannot be built (emu_support)."""
    if name == "cuda_emulated":
        from .emu_support import emu_module

        emu_module()
    elif name == "triton":
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton runs CPU tensors only under TRITON_INTERPRET=1 (a GPU is present)")
    if name not in ("default", "cpu") and name not in qpeft.available_backends():
        try:
            with qpeft.use_backend(name):
                pass
        except qpeft.BackendUnavailableError as exc:
            pytest.skip(str(exc))


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    """Runs the test with every op forced to one backend (parametrize it with
    indirect=True to choose the backends, e.g. GEMV_BACKENDS)."""
    _require(request.param)
    with qpeft.use_backend(request.param):
        yield request.param


@dataclass(frozen=True)
class Budget:
    """How much work one hypothesis property may do on a backend. The Triton interpreter
    and the CUDA emulator run kernels thousands of times slower than the C++ CPU kernels,
    so they get fewer examples and smaller shapes (chosen so that the whole suite stays
    within its time on 2 cores); a fraction is a share of the profile's max_examples
    (QPEFT_HYPOTHESIS_EXAMPLES), a fixed count is capped by it."""

    share: float  # of the profile's max_examples
    cap: int  # at most this many examples
    max_dim: int  # largest extent of one dimension of a generated tensor
    max_ndim: int  # most dimensions of a generated tensor

    def examples(self, weight: float = 1.0) -> int:
        return max(1, min(self.cap, int(settings.default.max_examples * self.share * weight)))

    def run(self, check, weight: float = 1.0, **strategies) -> None:
        """Run ``check(**drawn)`` as a hypothesis property with this budget's example count
        (``weight`` scales it for a property that is costlier or cheaper than the rest)."""
        settings(max_examples=self.examples(weight))(given(**strategies)(check))()


BUDGETS = {
    # The reference checks itself against the format's definition (cheap torch ops).
    "default": Budget(share=1 / 3, cap=10**6, max_dim=97, max_ndim=3),
    "cpu": Budget(share=1.0, cap=10**6, max_dim=97, max_ndim=3),
    # Interpreter: about a third of the examples, 2-D shapes up to 70 (as before the merge).
    "triton": Budget(share=1 / 3, cap=10**6, max_dim=70, max_ndim=2),
    # Emulator: 12 examples at most (every CUDA thread is a fiber), shapes up to 70.
    "cuda_emulated": Budget(share=1 / 5, cap=12, max_dim=70, max_ndim=3),
}


@pytest.fixture
def budget(backend) -> Budget:
    return BUDGETS[backend]


# The same assertions on CPU and CUDA tensors: "cuda" cases are collected everywhere (ids
# contain "cuda") and skipped, with the reason, where torch sees no GPU.
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.cuda.is_available() is False")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=NO_CUDA)])
def device(request) -> torch.device:
    return torch.device(request.param)
