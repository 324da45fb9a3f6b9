"""The AMX-BF16 GEMM on packed 4-bit weights (csrc/cpu/qgemm_amx.cpp): the bf16 products
of the CPU QLoRA layer on a CPU whose kernels run at the ``amx`` level (docs/design.md,
"AMX GEMM").

``qgemm_4bit(a, quant)`` is a[m, k] @ W^T and ``qgemm_4bit(a, quant, dx=True)`` a[m, n] @ W,
W [n, k] decoded from its packed codes into the tiles panel by panel (never whole), bf16
products accumulated in fp32. Internal: the checks here are those of a kernel entry (types,
dtypes, shapes, contiguity, one device), so a wrong call is a clear exception, never a
read out of bounds; the C++ entry re-checks every size.
"""

from __future__ import annotations

import functools

import torch

from ... import _native
from ..._formats import QUANT_TYPE_IDS
from ._gemm_checks import check_quant, need

_FN = "qgemm_4bit"

_OUT_DTYPES = {torch.float32: 0, torch.bfloat16: 2}


@functools.lru_cache(maxsize=1)
def _built() -> bool:
    """Whether this build holds the AMX kernel (``qpeft.cpu_info()["gemm_levels"]``: a
    compiler without AMX support builds the amx level without it)."""
    try:
        return "amx" in _native.cpu_module().cpu_info()["gemm_levels"]
    except ImportError:
        return False


def active() -> bool:
    """Whether the CPU kernels run at the ``amx`` level now (``qpeft.cpu_info()["chosen_level"]``;
    QPEFT_CPU_ISA and ``qpeft._C.set_isa`` move it) and the build holds the kernel. One
    native call (~1 us)."""
    try:
        return _native.cpu_module().active_isa() == "amx" and _built()
    except ImportError:
        return False


def qgemm_4bit(
    a: torch.Tensor,
    quant: tuple,
    *,
    dx: bool = False,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    accumulate: bool = False,
    col_block: int = 0,
    red_block: int = 0,
    num_threads: int | None = None,
) -> torch.Tensor:
    """a @ W^T (or a @ W with ``dx``) for bf16 a [m, k] (or [m, n]); ``quant`` is the tuple
    (packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
    quant_type, n, k) of the QLoRA ops. Returns ``out`` (allocated when None, of
    ``out_dtype``: float32 or bfloat16); ``accumulate`` adds into a float32 ``out``."""
    packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, n, k = quant
    check_quant(_FN, quant, contiguous=True)
    need(_FN, a, "a", torch.bfloat16, 2, contiguous=True)
    red, cols = (n, k) if dx else (k, n)
    if a.shape[1] != red:
        raise ValueError(
            f"qgemm_4bit: a must have {red} columns ({'n' if dx else 'k'}) for W of shape ({n}, {k}), "
            f"got shape {tuple(a.shape)}"
        )
    nested = nested_absmax is not None
    m = a.shape[0]
    if out is None:
        if accumulate:
            raise ValueError("qgemm_4bit: accumulate needs an out tensor")
        if out_dtype not in _OUT_DTYPES:
            raise TypeError(f"qgemm_4bit: out_dtype must be float32 or bfloat16, got {out_dtype}")
        out = torch.empty((m, cols), dtype=out_dtype)
    else:
        if out.dtype not in _OUT_DTYPES:
            raise TypeError(f"qgemm_4bit: out must be float32 or bfloat16, got {out.dtype}")
        need(_FN, out, "out", out.dtype, 2, contiguous=True)
        if tuple(out.shape) != (m, cols):
            raise ValueError(f"qgemm_4bit: out must have shape {(m, cols)}, got {tuple(out.shape)}")
    fn = _native.cpu_module().qgemm_4bit_amx_dx if dx else _native.cpu_module().qgemm_4bit_amx
    fn(
        a.data_ptr(),
        a.numel(),
        m,
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
        _OUT_DTYPES[out.dtype],
        accumulate,
        col_block,
        red_block,
        torch.get_num_threads() if num_threads is None else num_threads,
    )
    return out
