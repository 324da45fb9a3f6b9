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
    lacks), ``built_levels`` (the levels this build has quantization/optimizer/GEMV kernels
    for), ``kernels`` (per op, the level whose kernel runs), ``gemm_levels`` (the levels
    whose fused bf16 GEMM on packed 4-bit W this build holds: avx512_bf16, amx) and
    ``gemm_4bit_bf16`` (the one the QLoRA layer's bf16 mode runs at the chosen level, or
    None: W decoded to panels for oneDNN), ``gemm_4bit_f32`` (likewise for the fp32 mode:
    "avx2" at the avx2 level, else None). Raises ImportError without the native module and
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


class CudaFallbackWarning(ReferenceFallbackWarning):
    """qpeft._C_cuda is installed but cannot run here (a driver older than the CUDA toolkit it
    was built with, a GPU whose architecture it lacks, ...), so CUDA tensors run the Triton
    kernels or the pure-torch reference. A ReferenceFallbackWarning, so one filter silences both."""


_warned_cuda_fallback = False


def _warn_cuda_fallback(err: str) -> None:
    # Once per process, like the CPU fallback, and on one line.
    global _warned_cuda_fallback
    if _warned_cuda_fallback:
        return
    _warned_cuda_fallback = True
    warnings.warn(
        f"qpeft's CUDA C++ kernels cannot run here ({err}); CUDA tensors use the Triton kernels or the "
        "pure-torch reference instead (docs/gpu.md: which driver each CUDA toolkit needs).",
        CudaFallbackWarning,
        stacklevel=_caller_stacklevel(),
    )


@functools.cache
def _cuda_probe() -> str | None:
    """qpeft._C_cuda's probe() (a tiny kernel launched and waited for on every device), once
    per process: None when the module's kernels can run here, else the CUDA error."""
    mod = _load("_C_cuda")[0]
    if mod is None:
        return None  # cuda_unavailable reports the import error
    if not hasattr(mod, "probe"):
        return "this qpeft._C_cuda predates its probe() (a stale build): rebuild qpeft"
    try:
        err = mod.probe()
    except Exception as exc:  # a probe that cannot even be called says the same: unusable
        err = f"{type(exc).__name__}: {exc}"
    return err or None


def cuda_unavailable() -> str | None:
    """None when the CUDA C++ backend can run, else why not. Probes the module once per process
    (``_cuda_probe``), so that a driver too old for the build, which torch's own CUDA build may
    still accept, makes the backend unavailable (one CudaFallbackWarning) instead of raising at
    the first op or optimizer step."""
    err = _load("_C_cuda")[1]
    if err is not None:
        return err
    import torch

    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    probe_err = _cuda_probe()
    if probe_err is not None:
        _warn_cuda_fallback(probe_err)
        return f"qpeft._C_cuda cannot run here: {probe_err}"
    return None


def cuda_emu_module() -> ModuleType:
    mod, err = _load("_C_cuda_emu")
    if mod is None:
        raise ImportError(err)
    return mod


def cuda_emu_unavailable() -> str | None:
    return _load("_C_cuda_emu")[1]
