"""CPU kernels: the C++ module ``qpeft._C`` (AVX2 with a scalar fallback, multi-threaded)."""

from __future__ import annotations

import torch

from ... import _native
from ..._registry import register_availability
from ..native_abi import register_native

register_availability("cpu", _native.cpu_unavailable)

# The kernels size their thread pool from torch's setting, so `torch.set_num_threads`
# governs qpeft too and the two never oversubscribe the cores together.
# Outputs from this size up get MADV_HUGEPAGE before the kernel first writes them: the
# first-touch page faults of a fresh 32 MiB tensor cost more than decoding into it
# (csrc/cpu/memory.cpp has the numbers). Smaller buffers mostly come from malloc's heap,
# already faulted in.
HUGEPAGE_MIN_BYTES = 8 << 20


def _empty(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    nbytes = out.numel() * out.element_size()
    if nbytes >= HUGEPAGE_MIN_BYTES:
        _native.cpu_module().advise_hugepages(out.data_ptr(), nbytes)
    return out


register_native("cpu", _native.cpu_module, lambda device: (torch.get_num_threads(),), _empty)
