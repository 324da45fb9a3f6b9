"""The fused 4-bit GEMM of the ``avx512_bf16`` level (csrc/cpu/qgemm_avx512bf16.cpp):
x @ W^T and dy @ W for the CPU QLoRA layer's bf16 mode on a CPU with AVX512-BF16 but no AMX (AMD Zen
4/5), docs/design.md "AVX512-BF16 GEMM".

``qgemm_4bit(x, quant)`` decodes W [n, k] from its packed codes four rows at a time into
an L1-resident scratch (bit for bit dequantize_4bit to bf16) and multiplies it with
vdpbf16ps against bf16 x [m, k], fp32 accumulation; the fp32 result is not rounded to bf16.
``qgemm_4bit_dx(dy, quant)`` is dy [m, n] @ W the same way, W decoded in strips of 128
columns with pairs of its rows interleaved (the reduction runs over n).
Internal: the checks here are those of a kernel entry (types, dtypes, shapes, one
device), so a wrong call is a clear exception, never a read out of bounds; the C++ entry
re-checks every size.
"""

from __future__ import annotations

import functools

import torch

from ... import _native
from ._gemm_checks import check_quant, need, quant_args

_FN = "qgemm_4bit_dpbf16"
_FN_DX = "qgemm_4bit_dpbf16_dx"

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


def use_for_dx(m: int, quant: tuple) -> bool:
    """Whether the QLoRA layer's bf16 backward takes ``qgemm_4bit_dx`` for dx = dy @ W with
    m rows of dy: the forward's rule (``use_for``), M <= 8 included (the panel path is the
    alternative there too: no GEMV for dx)."""
    return use_for(m, quant)


def qgemm_4bit(x: torch.Tensor, quant: tuple, *, num_threads: int | None = None) -> torch.Tensor:
    """fp32 [m, n] = x @ W^T for bf16 x [m, k] (any strides: made contiguous); ``quant`` is
    the tuple (packed, absmax, nested_absmax, nested_code, offset, blocksize,
    nested_blocksize, quant_type, n, k) of the QLoRA ops."""
    return _call(x, quant, num_threads, dx=False)


def qgemm_4bit_dx(dy: torch.Tensor, quant: tuple, *, num_threads: int | None = None) -> torch.Tensor:
    """fp32 [m, k] = dy @ W for bf16 dy [m, n] (any strides: made contiguous); ``quant`` as
    for ``qgemm_4bit``."""
    return _call(dy, quant, num_threads, dx=True)


def _call(x: torch.Tensor, quant: tuple, num_threads: int | None, *, dx: bool) -> torch.Tensor:
    n, k = quant[8], quant[9]
    fn, name = (_FN_DX, "dy") if dx else (_FN, "x")
    red, cols = (n, k) if dx else (k, n)
    check_quant(fn, quant)
    need(fn, x, name, torch.bfloat16, 2)
    if x.shape[1] != red:
        raise ValueError(
            f"{fn}: {name} must have {'n' if dx else 'k'} = {red} columns for W of shape ({n}, {k}), "
            f"got shape {tuple(x.shape)}"
        )
    x = x.contiguous()
    qargs, _alive = quant_args(quant)
    out = torch.empty((x.shape[0], cols), dtype=torch.float32)
    native = _native.cpu_module()
    (native.qgemm_4bit_dpbf16_dx if dx else native.qgemm_4bit_dpbf16)(
        x.data_ptr(),
        x.numel(),
        x.shape[0],
        n,
        k,
        *qargs,
        out.data_ptr(),
        out.numel(),
        torch.get_num_threads() if num_threads is None else num_threads,
    )
    return out
