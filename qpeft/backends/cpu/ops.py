"""CPU kernels: the C++ module ``qpeft._C`` (AVX2 with a scalar fallback, multi-threaded)."""

from __future__ import annotations

import torch

from ... import _native
from ..._registry import register_availability
from ..native_abi import register_native

register_availability("cpu", _native.cpu_unavailable)

# The kernels size their thread pool from torch's setting, so `torch.set_num_threads`
# governs qpeft too and the two never oversubscribe the cores together.
register_native("cpu", _native.cpu_module, lambda device: (torch.get_num_threads(),))
