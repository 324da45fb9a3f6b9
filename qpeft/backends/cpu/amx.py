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
from ._gemm_checks import check_quant, need, quant_args

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
    lora: tuple[torch.Tensor, torch.Tensor] | None = None,
    col_block: int = 0,
    red_block: int = 0,
    num_threads: int | None = None,
) -> torch.Tensor:
    """a @ W^T (or a @ W with ``dx``) for bf16 a [m, k] (or [m, n]); ``quant`` is the tuple
    (packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
    quant_type, n, k) of the QLoRA ops. Returns ``out`` (allocated when None, of
    ``out_dtype``: float32 or bfloat16); ``accumulate`` adds into a float32 ``out``.

    ``lora = (l, r)``, fp32 contiguous l [m, rank] and r [rank, cols] (cols = n, or k with
    ``dx``): the result is a @ W^T (or a @ W) + l @ r, the rank-r sum in fp32 added to the
    fp32 accumulators in the kernel's epilogue (no [m, cols] pass of its own), then stored
    (rounded once for a bfloat16 ``out``, added for ``accumulate``)."""
    n, k = quant[8], quant[9]
    check_quant(_FN, quant, contiguous=True)
    need(_FN, a, "a", torch.bfloat16, 2, contiguous=True)
    red, cols = (n, k) if dx else (k, n)
    if a.shape[1] != red:
        raise ValueError(
            f"qgemm_4bit: a must have {red} columns ({'n' if dx else 'k'}) for W of shape ({n}, {k}), "
            f"got shape {tuple(a.shape)}"
        )
    m = a.shape[0]
    lora_args = (0, 0, 0, 0, 0)
    if lora is not None:
        ll, lr = lora
        need(_FN, ll, "lora l", torch.float32, 2, contiguous=True)
        need(_FN, lr, "lora r", torch.float32, 2, contiguous=True)
        rank = ll.shape[1]
        if ll.shape[0] != m or tuple(lr.shape) != (rank, cols):
            raise ValueError(
                f"qgemm_4bit: lora must be l [{m}, rank] and r [rank, {cols}], got shapes "
                f"{tuple(ll.shape)} and {tuple(lr.shape)}"
            )
        lora_args = (ll.data_ptr(), ll.numel(), lr.data_ptr(), lr.numel(), rank)
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
    qargs, _alive = quant_args(quant)
    fn = _native.cpu_module().qgemm_4bit_amx_dx if dx else _native.cpu_module().qgemm_4bit_amx
    fn(
        a.data_ptr(),
        a.numel(),
        m,
        n,
        k,
        *qargs,
        out.data_ptr(),
        out.numel(),
        _OUT_DTYPES[out.dtype],
        accumulate,
        *lora_args,
        col_block,
        red_block,
        torch.get_num_threads() if num_threads is None else num_threads,
    )
    return out


def lora_grad(lt: torch.Tensor, x: torch.Tensor, *, transpose: bool = False, num_threads: int | None = None):
    """lt^T @ x for fp32 lt [m, r] and bf16 x [m, c]: fp32 [r, c] ([c, r] with ``transpose``),
    the LoRA weight gradients' products reduced over the m rows (dA = gs^T x, dB = dy'^T xs
    as (xs^T dy')^T). Exact fp32 products of the bf16 values of x, summed in fp32 in m
    order (AVX-512 FMAs; oneDNN's bf16 GEMM of these skinny shapes ran 2-4x slower and
    rounded its result to bf16; docs/design.md, "AMX GEMM")."""
    fn = "lora_grad"
    need(fn, lt, "l", torch.float32, 2, contiguous=True)
    need(fn, x, "x", torch.bfloat16, 2, contiguous=True)
    if lt.shape[0] != x.shape[0]:
        raise ValueError(f"{fn}: l and x must have the same rows, got {tuple(lt.shape)} and {tuple(x.shape)}")
    m, r = lt.shape
    c = x.shape[1]
    out = torch.empty((c, r) if transpose else (r, c), dtype=torch.float32)
    _native.cpu_module().lora_grad_amx(
        lt.data_ptr(),
        lt.numel(),
        r,
        x.data_ptr(),
        x.numel(),
        m,
        c,
        out.data_ptr(),
        out.numel(),
        transpose,
        torch.get_num_threads() if num_threads is None else num_threads,
    )
    return out
