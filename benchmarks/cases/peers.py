"""The peers, imported if installed: bitsandbytes, torchao's NF4 tensor, HF PEFT."""

from __future__ import annotations

import importlib
import warnings

import qpeft


def optional(module: str):
    """The module, or None when it is not installed (or fails to import)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(module)
    except Exception:
        return None


def qpeft_backends(device: str) -> list[str]:
    """qpeft's native/Triton backends that run on ``device``, in preference order."""
    wanted = ("cpu",) if device == "cpu" else ("triton", "cuda")
    return [b for b in wanted if b in qpeft.available_backends()]


def torchao_nf4():
    """(to_nf4, linear_nf4) of torchao, or None."""
    mod = optional("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
    return None if mod is None else (mod.to_nf4, mod.linear_nf4)
