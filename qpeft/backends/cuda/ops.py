"""CUDA kernels: the CUDA C++ module ``qpeft._C_cuda``, launched on torch's current stream."""

from __future__ import annotations

import torch

from ... import _native
from ..._registry import register_availability
from ..native_abi import register_native

register_availability("cuda", _native.cuda_unavailable)

register_native("cuda", _native.cuda_module, lambda device: (torch.cuda.current_stream(device).cuda_stream,))
