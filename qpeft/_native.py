"""Loading the compiled modules, with errors that say what to do.

Importing qpeft never imports these eagerly and never initialises CUDA; the first
kernel call does.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import warnings
from types import ModuleType

_HINTS = {
    "_C": (
        "build it: run `pip install -e .` in the qpeft source tree (or `pip install .` for a "
        "non-editable install); it needs a C++17 compiler, and CMake and pybind11 come from pip"
    ),
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


def cpu_info() -> dict:
    """What the CPU kernels detected and chose (qpeft._C, csrc/cpu/cpu_info.h).

    Keys: ``model`` (cpuid's brand string), ``features`` (dict of bools: avx2, fma, f16c,
    avx512f/bw/vl/dq/vbmi, avx512_bf16, avx512_vnni, amx_tile, amx_bf16, the OS state bits
    and whether Linux granted AMX tile data), ``detected_level``, ``cap`` (``QPEFT_CPU_ISA``
    or None), ``chosen_level`` (what the kernels run at), ``note`` (why a cap was clamped),
    ``override`` (a test's ``qpeft._C.set_isa``), ``levels`` (scalar < avx2 < avx512 <
    avx512_bf16 < amx), ``missing`` (per level above the detected one, the features it
    lacks), ``built_levels`` (the levels this build has kernels for) and ``kernels`` (per
    op, the level whose kernel runs). Raises ImportError without the native module and
    ValueError when ``QPEFT_CPU_ISA`` is not a level name.
    """
    return cpu_module().cpu_info()


def cuda_module() -> ModuleType:
    mod, err = _load("_C_cuda")
    if mod is None:
        raise ImportError(err)
    return mod


class ReferenceFallbackWarning(RuntimeWarning):
    """qpeft's compiled CPU kernels are missing, so CPU tensors run the pure-torch reference."""


_warned_cpu_fallback = False


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points the warning at the first frame outside qpeft and
    torch (the user's call), so that it says which line of theirs was slow."""
    internal = tuple(
        os.path.dirname(os.path.abspath(m.__file__)) + os.sep
        for m in (sys.modules["qpeft"], sys.modules["torch"])
        if getattr(m, "__file__", None)
    )
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(internal):
        frame, level = frame.f_back, level + 1
    return level


def _warn_cpu_fallback(err: str) -> None:
    # Once per process, by a flag rather than the warnings registry: under an "always"
    # filter the registry would repeat it on every op call. Not at import (importing qpeft
    # loads no native module); the first op on a CPU tensor asks whether "cpu" can run.
    global _warned_cpu_fallback
    if _warned_cpu_fallback:
        return
    _warned_cpu_fallback = True
    warnings.warn(
        f"{err}. qpeft's CPU ops are falling back to the pure-torch reference, which is tens to "
        "hundreds of times slower (a 4096x4096 NF4 quantize takes about a second instead of about "
        "10 ms).",
        ReferenceFallbackWarning,
        stacklevel=_caller_stacklevel(),
    )


def cpu_unavailable() -> str | None:
    err = _load("_C")[1]
    if err is not None:
        _warn_cpu_fallback(err)
    return err


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
