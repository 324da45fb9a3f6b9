"""Shared fixtures and assertions.

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

import pytest
from hypothesis import HealthCheck, settings

import qpeft

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
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor, for exact comparison (distinguishes -0.0, NaN payloads)."""
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().reshape(-1).view(view)


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    diff = bits(actual) != bits(expected)
    if bool(diff.any()):
        idx = diff.reshape(-1).nonzero()[:8, 0]
        a, e = actual.reshape(-1)[idx], expected.reshape(-1)[idx]
        pytest.fail(
            f"{what}: {int(diff.sum())} of {diff.numel()} elements differ; first at flat "
            f"{idx.tolist()}: got {a.tolist()} expected {e.tolist()}"
        )


@pytest.fixture(params=["default", *CPU_BACKENDS])
def backend(request):
    with qpeft.use_backend(request.param):
        yield request.param


# The same assertions on CPU and CUDA tensors: "cuda" cases are collected everywhere (ids
# contain "cuda") and skipped, with the reason, where torch sees no GPU.
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.cuda.is_available() is False")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=NO_CUDA)])
def device(request) -> torch.device:
    return torch.device(request.param)
