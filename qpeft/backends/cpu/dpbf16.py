"""The fused 4-bit GEMM of the ``avx512_bf16`` level (csrc/cpu/qgemm_avx512bf16.cpp):
x @ W^T for the CPU QLoRA layer's bf16 mode on a CPU with AVX512-BF16 but no AMX (AMD Zen
4/5), docs/design.md "AVX512-BF16 GEMM".

``qgemm_4bit(x, quant)`` decodes W [n, k] from its packed codes four rows at a time into
an L1-resident scratch (bit for bit dequantize_4bit to bf16) and multiplies it with
vdpbf16ps against bf16 x [m, k], fp32 accumulation; the fp32 result is not rounded to bf16.
Internal: the checks here are those of a kernel entry (types, dtypes, shapes, one
device), so a wrong call is a clear exception, never a read out of bounds; the C++ entry
re-checks every size.
"""

from __future__ import annotations

import functools

import torch

from ... import _native
from ..._formats import QUANT_TYPE_IDS

# Rows of x up to which the kernel measured faster than the oneDNN panels at the
# avx512_bf16 level (benchmarks/isa_ab.py --dpbf16, 4096x4096, three runs on the SPR-class
# VM: 0.59-0.88 of the panels' time at M=128, 0.82-1.03 at 256, 1.28 at 512: the x rows a
# W tile multiplies no longer stay in L2). The decode-sized M <= 8 take the GEMV.
MAX_ROWS = 128


@functools.lru_cache(maxsize=1)
def _usable() -> bool:
    """Whether this build holds the kernel (``qpeft.cpu_info()["gemm_levels"]``: the
    compiler accepted the level's flags); the level itself is only chosen on a CPU with
    AVX512-BF16."""
    try:
        return "avx512_bf16" in _native.cpu_module().cpu_info()["gemm_levels"]
    except ImportError:
        return False


def active() -> bool:
    """Whether the CPU kernels run at the ``avx512_bf16`` level now (``qpeft.cpu_info()
    ["chosen_level"]``; QPEFT_CPU_ISA and ``qpeft._C.set_isa`` move it) and the kernel is
    built. At ``amx`` the AMX kernel is the one to use."""
    try:
        return _native.cpu_module().active_isa() == "avx512_bf16" and _usable()
    except ImportError:
        return False


def use_for(m: int, quant: tuple) -> bool:
    """Whether the QLoRA layer's bf16 forward takes this kernel for m rows of x: at the
    ``avx512_bf16`` level, m up to MAX_ROWS, and W's rows in whole 32-element chunks of one
    block (k and blocksize multiples of 32: else the kernel decodes element by element,
    correct but slower than the panels)."""
    blocksize, k = quant[5], quant[9]
    return m <= MAX_ROWS and k % 32 == 0 and blocksize % 32 == 0 and active()


def _need(t, name: str, dtype: torch.dtype, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"qgemm_4bit_dpbf16: {name} must be a tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"qgemm_4bit_dpbf16: {name} must be on the CPU, got {t.device}")
    if t.dtype != dtype:
        raise TypeError(f"qgemm_4bit_dpbf16: {name} must be {dtype}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"qgemm_4bit_dpbf16: {name} must be {ndim}-D, got shape {tuple(t.shape)}")


def qgemm_4bit(x: torch.Tensor, quant: tuple, *, num_threads: int | None = None) -> torch.Tensor:
    """fp32 [m, n] = x @ W^T for bf16 x [m, k] (any strides: made contiguous); ``quant`` is
    the tuple (packed, absmax, nested_absmax, nested_code, offset, blocksize,
    nested_blocksize, quant_type, n, k) of the QLoRA ops."""
    packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, n, k = quant
    if quant_type not in QUANT_TYPE_IDS:
        raise ValueError(
            f"qgemm_4bit_dpbf16: quant_type must be one of {sorted(QUANT_TYPE_IDS)}, got {quant_type!r}"
        )
    _need(x, "x", torch.bfloat16, 2)
    if x.shape[1] != k:
        raise ValueError(
            f"qgemm_4bit_dpbf16: x must have k = {k} columns for W of shape ({n}, {k}), "
            f"got shape {tuple(x.shape)}"
        )
    _need(packed, "packed", torch.uint8)
    nested = nested_absmax is not None
    _need(absmax, "absmax", torch.uint8 if nested else torch.float32)
    if nested:
        _need(nested_absmax, "nested_absmax", torch.float32)
        _need(nested_code, "nested_code", torch.float32)
        _need(offset, "offset", torch.float32)
        if nested_code.numel() != 256 or offset.numel() != 1:
            raise ValueError(
                "qgemm_4bit_dpbf16: nested_code must hold 256 values and offset 1, got "
                f"{nested_code.numel()} and {offset.numel()}"
            )
        nested_absmax, nested_code, offset = (t.contiguous() for t in (nested_absmax, nested_code, offset))
    x, packed, absmax = x.contiguous(), packed.contiguous(), absmax.contiguous()
    out = torch.empty((x.shape[0], n), dtype=torch.float32)
    _native.cpu_module().qgemm_4bit_dpbf16(
        x.data_ptr(),
        x.numel(),
        x.shape[0],
        n,
        k,
        packed.data_ptr(),
        packed.numel(),
        absmax.data_ptr(),
        absmax.numel(),
        blocksize,
        QUANT_TYPE_IDS[quant_type],
        nested_absmax.data_ptr() if nested else 0,
        nested_absmax.numel() if nested else 0,
        nested_code.data_ptr() if nested else 0,
        offset.data_ptr() if nested else 0,
        nested_blocksize if nested else 0,
        out.data_ptr(),
        out.numel(),
        torch.get_num_threads() if num_threads is None else num_threads,
    )
    return out
