"""Loading the compiled modules, with errors that say what to do.

Importing qpeft never imports these eagerly and never initialises CUDA; the first
kernel call does.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

_HINTS = {
    "_C": "reinstall qpeft from source with a C++17 compiler and CMake (`pip install .`)",
    "_C_cuda": (
        "qpeft was built without CUDA kernels; rebuild with the CUDA toolkit on PATH "
        "(`QPEFT_CUDA=1 pip install .`)"
    ),
    "_C_cuda_emu": (
        "qpeft was built without the CUDA emulation module; rebuild where the CUDA toolkit headers are "
        "installed (`QPEFT_CUDA_EMULATION=1 pip install .`, with CUDA_HOME set if they are not in /usr/local/cuda)"
    ),
}


@functools.cache
def _load(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(f"qpeft.{name}"), None
    except ImportError as exc:  # only a missing/broken module; anything else propagates
        return None, f"qpeft.{name} could not be imported ({exc}); {_HINTS[name]}"


def cpu_module() -> ModuleType:
    mod, err = _load("_C")
    if mod is None:
        raise ImportError(err)
    return mod


def cuda_module() -> ModuleType:
    mod, err = _load("_C_cuda")
    if mod is None:
        raise ImportError(err)
    return mod


def cpu_unavailable() -> str | None:
    return _load("_C")[1]


def cuda_unavailable() -> str | None:
    err = _load("_C_cuda")[1]
    if err is not None:
        return err
    import torch

    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


def cuda_emu_module() -> ModuleType:
    mod, err = _load("_C_cuda_emu")
    if mod is None:
        raise ImportError(err)
    return mod


def cuda_emu_unavailable() -> str | None:
    return _load("_C_cuda_emu")[1]
