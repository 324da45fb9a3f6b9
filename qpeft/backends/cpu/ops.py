"""Backend "cpu": the C++ module ``qpeft._C`` (AVX2 with a scalar fallback, on torch's
OpenMP team): quantization and optimizer steps over the shared native ABI, its own GEMV,
and the QLoRA layer composed from them (``qlora.py``)."""

from __future__ import annotations

import torch

from ... import _native
from ..._dispatch import register_backend
from ..native import optim as native_optim
from ..native import quant as native_quant
from . import gemv, qlora


def _threads(device: torch.device) -> tuple:
    # torch's setting, so `torch.set_num_threads` governs qpeft too and the two never
    # oversubscribe the cores together
    return (torch.get_num_threads(),)


register_backend(
    "cpu",
    {
        **native_quant.kernels(_native.cpu_module, _threads),
        "gemv_4bit": gemv.gemv_4bit,
        "qlora_linear": qlora.qlora_linear,
        "qlora_linear_backward": qlora.qlora_linear_backward,
        **native_optim.kernels(_native.cpu_module, _threads, cpu_lists=True),
    },
    _native.cpu_unavailable,
)
