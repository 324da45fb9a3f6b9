"""Backend "cuda_emulated": the ABI of ``qpeft._C_cuda`` on CPU pointers, run by the
emulation harness (``qpeft._C_cuda_emu``), with 0 in place of the stream handle (the
harness runs each launch to completion before returning). Never chosen by default."""

from __future__ import annotations

import torch

from ... import _native
from ..._dispatch import register_backend
from ..native import gemv as native_gemv
from ..native import optim as native_optim
from ..native import qlora as native_qlora
from ..native import quant as native_quant


def _no_stream(device: torch.device) -> tuple:
    return (0,)


register_backend(
    "cuda_emulated",
    {
        **native_quant.kernels(_native.cuda_emu_module, _no_stream),
        **native_gemv.kernels(_native.cuda_emu_module, _no_stream),
        **native_optim.kernels(_native.cuda_emu_module, _no_stream),
        **native_qlora.kernels(_native.cuda_emu_module, _no_stream),
    },
    _native.cuda_emu_unavailable,
)
