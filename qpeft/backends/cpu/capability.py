"""What this CPU offers the QLoRA layer: bf16 dot products, and its cache sizes.

Two questions, each answered in one small function so the source of the answer can be
swapped without touching the callers:

- ``compute_dtype(x_dtype)``: the dtype the CPU QLoRA layer (and ``Linear4bit``, which runs
  on it) multiplies in. bf16, with fp32 accumulation inside the GEMM, when x is bf16 and
  the CPU has bf16 dot products (AVX-512-BF16 ``vdpbf16ps`` or AMX-BF16 tiles); fp32
  otherwise (fp64 stays fp64 for gradcheck). On a CPU without them a bf16 GEMM is
  emulated and ran 5x slower than fp32 (docs/design.md, "CPU compute dtype").
  ``QPEFT_CPU_COMPUTE=auto|bf16|fp32`` overrides it for A/B runs and tests; ``bf16`` on a
  CPU without bf16 units is allowed (correct, slow).
  fp32 x also computes in bf16 (``auto`` only) when the user let torch's own fp32 matmuls
  use bf16 on oneDNN (``torch.set_float32_matmul_precision("medium")`` or
  ``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``; ``fp32_matmul_allows_bf16``),
  the CPU has bf16 dot products, and the caller says the shape is one where the bf16 path
  is faster (``large_shape``; the QLoRA layer decides that, ``qlora.fp32_may_take_bf16``).
- ``cache_sizes()``: (L1d, L2, L3) bytes as the kernel reports them in sysfs, with
  documented constants where sysfs is absent (containers without /sys, other OSes).
"""

from __future__ import annotations

import functools
import os

import torch

COMPUTE_ENV = "QPEFT_CPU_COMPUTE"
_COMPUTE_CHOICES = ("auto", "bf16", "fp32")

# Used when /sys/devices/system/cpu/cpu0/cache is unreadable: 48 KiB L1d, 2 MiB L2, 32 MiB
# L3 -- the per-core L1d/L2 of current server cores (Sapphire Rapids, Zen 4/5 have 32-48
# KiB and 1-2 MiB) and a modest shared L3, so panels sized from them stay in cache on
# any of those machines rather than overflowing on the smallest.
FALLBACK_CACHE_BYTES = (48 << 10, 2 << 20, 32 << 20)


@functools.lru_cache(maxsize=1)
def bf16_dot_products() -> bool:
    """True when the CPU kernels run at a level with bf16 dot products (``avx512_bf16`` or
    ``amx`` in ``qpeft.cpu_info()``), asked once. The level honours ``QPEFT_CPU_ISA``, so a
    cap below avx512_bf16 also makes the layer compute in fp32. Without the native module
    (the reference fallback) torch's cpuinfo answers; any failure of that probe answers
    False (fp32)."""
    try:
        from ..._native import cpu_info

        return cpu_info()["chosen_level"] in ("avx512_bf16", "amx")
    except ImportError:
        pass
    try:
        if torch.cpu._is_avx512_bf16_supported():
            return True
        caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
        return bool(caps.get("amx_bf16", False))
    except Exception:  # an old torch without the probes: the safe answer
        return False


def compute_choice() -> str:
    """``QPEFT_CPU_COMPUTE`` (read on every call, so tests and A/B runs can flip it)."""
    v = os.environ.get(COMPUTE_ENV, "auto").strip().lower() or "auto"
    if v not in _COMPUTE_CHOICES:
        raise ValueError(f"{COMPUTE_ENV} must be one of {_COMPUTE_CHOICES}, got {v!r}")
    return v


# torch's precision setting for fp32 matmuls on oneDNN (docs/design.md, "CPU compute dtype").
# torch >= 2.9 has per-backend settings: ``torch.backends.mkldnn.matmul.fp32_precision``
# ("none"/"ieee" by default, "bf16" after ``set_float32_matmul_precision("medium")`` or when
# set itself, "tf32" after "high"), read here through the C getter the property wraps
# (~1 us; the property ~3 us). Older torch (2.4 - 2.8) has only the global
# ``get_float32_matmul_precision()``, whose "medium" made oneDNN run fp32 matmuls in bf16.
# "tf32" (or "high") is not a bf16 licence on CPU: it keeps fp32.
_PRECISION_GETTER = getattr(torch._C, "_get_fp32_precision_getter", None)
_BF16_SETTINGS = {"bf16": True, "medium": True}  # setting -> allows bf16; others are added as seen


def _fp32_matmul_setting() -> str:
    if _PRECISION_GETTER is not None:
        try:
            return _PRECISION_GETTER("mkldnn", "matmul")
        except Exception:  # a torch whose getter refuses these names: the legacy API below
            pass
    try:
        return torch.get_float32_matmul_precision()
    except Exception:  # torch >= 2.9 raises on mixed legacy/new settings: the safe answer
        return "highest"


def fp32_matmul_allows_bf16() -> bool:
    """True when torch's fp32 matmuls on CPU may run in bf16 (the user's setting, read on
    every call so that switching it at run time takes effect; the answer cached per value)."""
    v = _fp32_matmul_setting()
    allowed = _BF16_SETTINGS.get(v)
    if allowed is None:
        allowed = _BF16_SETTINGS[v] = False
    return allowed


def compute_dtype(x_dtype: torch.dtype, large_shape: bool = True) -> torch.dtype:
    """The dtype the CPU QLoRA layer computes in for an input of ``x_dtype``. ``large_shape``
    (fp32 x only): whether the layer's shape is one where its bf16 path beats fp32, which
    fp32 x takes only then, under a torch setting that allows bf16 (see the module doc)."""
    if x_dtype == torch.float64:
        return torch.float64  # gradcheck: the reference's fp64
    choice = compute_choice()
    if choice == "fp32":
        return torch.float32
    if choice == "bf16":
        return torch.bfloat16
    if not bf16_dot_products():
        return torch.float32
    if x_dtype == torch.bfloat16:
        return torch.bfloat16
    if x_dtype == torch.float32 and large_shape and fp32_matmul_allows_bf16():
        return torch.bfloat16
    return torch.float32


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * mult


@functools.lru_cache(maxsize=1)
def cache_sizes() -> tuple[int, int, int]:
    """(L1d, L2, L3) in bytes of cpu0, from /sys/devices/system/cpu/cpu0/cache/index*/;
    any level that cannot be read keeps its ``FALLBACK_CACHE_BYTES`` entry."""
    found = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        entries = []
    for e in entries:
        if not e.startswith("index"):
            continue
        try:
            with open(f"{base}/{e}/level") as f:
                level = int(f.read())
            with open(f"{base}/{e}/type") as f:
                kind = f.read().strip()
            with open(f"{base}/{e}/size") as f:
                size = _parse_size(f.read())
        except (OSError, ValueError):
            continue
        if kind == "Instruction" or size <= 0:
            continue
        found[level] = size
    return tuple(found.get(i + 1, FALLBACK_CACHE_BYTES[i]) for i in range(3))
