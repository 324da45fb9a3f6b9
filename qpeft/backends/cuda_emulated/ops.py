"""Registrations of the "cuda_emulated" backend: the ABI of ``qpeft._C_cuda`` on CPU
pointers, with 0 in place of the stream handle (the harness runs each launch to
completion before returning)."""

from __future__ import annotations

import torch

from ... import _native
from ..._registry import register_availability
from ..native_abi import register_native
from ..native_gemv import register_native_gemv
from ..native_optim import register_native_optim


def _no_stream(device: torch.device) -> tuple:
    return (0,)


register_availability("cuda_emulated", _native.cuda_emu_unavailable)

register_native("cuda_emulated", _native.cuda_emu_module, _no_stream)
register_native_gemv("cuda_emulated", _native.cuda_emu_module, _no_stream)
register_native_optim("cuda_emulated", _native.cuda_emu_module, _no_stream)
