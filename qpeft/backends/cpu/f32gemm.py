"""The fused fp32 4-bit GEMM of the ``avx2`` level (csrc/cpu/qgemm_f32_avx2.cpp): the
QLoRA layer's fp32 base products, docs/design.md "fp32 GEMM".

``qgemm_4bit(x, quant, lora)`` is x [m, k] @ W'^T and ``qgemm_4bit_dx(dy, quant, lora)``
dy [m, n] @ W', where W' = W + L R with the LoRA term merged (``lora`` = (L [n, r], R
[r, k]), or None: W' = W). W is decoded from its packed codes (bit for bit
dequantize_4bit to fp32) straight into the micro-kernel's L2-resident panels and never
written as an [n, k] tensor; the merge costs n k r FMAs, as the panel path's. ``out`` with
``accumulate`` adds the product to it in place. ``extra`` (forward: E [e, k]; dx: E [n, e])
adds e output columns from a dense operand to the same pass over x and returns them as
a second result, x @ E^T (forward; the LoRA layer's xa = x A^T) or dy @ E (dx; g = dy B):
the rank-r product that otherwise reads x (dy) once more.
Internal: the checks here are those of a kernel entry (types, dtypes, shapes, one
device), so a wrong call is a clear exception, never a read out of bounds; the C++ entry
re-checks every size.
"""

from __future__ import annotations

import torch

from ... import _native
from ._gemm_checks import check_quant, need, quant_args

_FN = "qgemm_4bit_f32"
_FN_DX = "qgemm_4bit_f32_dx"
_F32 = torch.float32


def active() -> bool:
    """Whether the layer's fp32 products take the kernel now: built, and the CPU kernels at
    exactly the ``avx2`` level (``qpeft.cpu_info()["gemm_4bit_f32"]``; QPEFT_CPU_ISA and
    ``qpeft._C.set_isa`` move the level). One answer for both layer paths: the C++ layer
    call (``qpeft._C_layer``) asks the same native function. Measured faster than oneDNN's
    fp32 GEMM on decoded panels on an AVX2-only CPU (docs/design.md, "fp32 GEMM"); at the
    AVX-512 levels oneDNN's fp32 GEMM has twice the vector width of this AVX2
    micro-kernel, and no AVX-512 variant has been measured against it, so the panels stay
    there."""
    try:
        return _native.cpu_module().qgemm_4bit_f32_active()
    except ImportError:
        return False


# At or above both of these (rows of x, weights in W) the panels took less time: 4096x4096
# at M = 512, 1 thread, on the AVX2 EPYC VM, Linear4bit 226-237 ms fused vs 216-228 on
# panels and the QLoRA layer fwd+bwd (r = 16) 462-506 vs 436-486 (two interleaved runs
# each), where oneDNN's fp32 GEMM on a decoded panel edges out this micro-kernel and the
# decode is amortized over many rows. Below them the kernel took less: M = 16 and 64 on
# that W (15.6 vs 19.0, 39.2 vs 45.4 ms), the demo's layers at M = 512 (256 x 256 to 704 x
# 256, 6-9% less for fwd+bwd on 2 threads).
PANELS_MIN_ROWS = 256

# The most extra columns (the LoRA rank r, for xa = x A^T or g = dy B riding in the pass)
# the kernel takes (qgemm_f32.cpp: its extra block fits one column block); the layer
# computes the rank-r product with torch's GEMM beyond it.
MAX_EXTRA_COLS = 256
PANELS_MIN_WEIGHTS = 1 << 22


def use_for(m: int, n: int, k: int) -> bool:
    """Whether the fp32 layer's products for m rows of x and a W of n x k take the kernel:
    at the avx2 level (``active``), except for large m and W together (see above)."""
    return active() and not (m >= PANELS_MIN_ROWS and n * k >= PANELS_MIN_WEIGHTS)


def qgemm_4bit(
    x: torch.Tensor,
    quant: tuple,
    lora: tuple | None = None,
    *,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    extra: torch.Tensor | None = None,
    num_threads: int | None = None,
):
    """fp32 [m, n] = x @ (W + L R)^T for fp32 x [m, k] (any strides: made contiguous);
    ``quant`` is the tuple (packed, absmax, nested_absmax, nested_code, offset, blocksize,
    nested_blocksize, quant_type, n, k) of the QLoRA ops. With ``extra`` E [e, k]: the pair
    (that, x @ E^T [m, e])."""
    return _call(x, quant, lora, out, accumulate, extra, num_threads, dx=False)


def qgemm_4bit_dx(
    dy: torch.Tensor,
    quant: tuple,
    lora: tuple | None = None,
    *,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    extra: torch.Tensor | None = None,
    num_threads: int | None = None,
):
    """fp32 [m, k] = dy @ (W + L R) for fp32 dy [m, n]; with ``extra`` E [n, e] the pair
    (that, dy @ E [m, e]); the rest as ``qgemm_4bit``."""
    return _call(dy, quant, lora, out, accumulate, extra, num_threads, dx=True)


def _call(x, quant, lora, out, accumulate, extra, num_threads, *, dx: bool):
    n, k = quant[8], quant[9]
    fn, name = (_FN_DX, "dy") if dx else (_FN, "x")
    red, cols = (n, k) if dx else (k, n)
    check_quant(fn, quant)
    need(fn, x, name, _F32, 2)
    if x.shape[1] != red:
        raise ValueError(
            f"{fn}: {name} must have {'n' if dx else 'k'} = {red} columns for W of shape ({n}, {k}), "
            f"got shape {tuple(x.shape)}"
        )
    rank = 0
    if lora is not None:
        lo, ro = lora
        need(fn, lo, "lora L", _F32, 2)
        need(fn, ro, "lora R", _F32, 2)
        rank = lo.shape[1]
        if tuple(lo.shape) != (n, rank) or tuple(ro.shape) != (rank, k):
            raise ValueError(
                f"{fn}: the LoRA factors must be L [{n}, r] and R [r, {k}], got {tuple(lo.shape)} and {tuple(ro.shape)}"
            )
        lo, ro = lo.contiguous(), ro.contiguous()
    if out is None:
        if accumulate:
            raise ValueError(f"{fn}: accumulate needs an out tensor")
        out = torch.empty((x.shape[0], cols), dtype=_F32)
    else:
        need(fn, out, "out", _F32, 2, contiguous=True)
        if tuple(out.shape) != (x.shape[0], cols):
            raise ValueError(f"{fn}: out must be [{x.shape[0]}, {cols}], got {tuple(out.shape)}")
    ne, out2 = 0, None
    if extra is not None:
        need(fn, extra, "extra", _F32, 2)
        ne = extra.shape[0] if not dx else extra.shape[1]
        if extra.shape[1 if not dx else 0] != red or not 0 < ne <= MAX_EXTRA_COLS:
            want = f"[e, {k}]" if not dx else f"[{n}, e]"
            raise ValueError(
                f"{fn}: extra must be {want} with 0 < e <= {MAX_EXTRA_COLS}, got {tuple(extra.shape)}"
            )
        extra = extra.contiguous()
        out2 = torch.empty((x.shape[0], ne), dtype=_F32)
    x = x.contiguous()
    qargs, _alive = quant_args(quant)
    _native.cpu_module().qgemm_4bit_f32(
        dx,
        x.data_ptr(),
        x.numel(),
        x.shape[0],
        n,
        k,
        *qargs,
        lo.data_ptr() if rank else 0,
        lo.numel() if rank else 0,
        ro.data_ptr() if rank else 0,
        ro.numel() if rank else 0,
        rank,
        out.data_ptr(),
        out.numel(),
        accumulate,
        extra.data_ptr() if ne else 0,
        extra.numel() if ne else 0,
        ne,
        out2.data_ptr() if ne else 0,
        out2.numel() if ne else 0,
        0,  # the kernel's default blocking (qgemm_f32.cpp)
        0,
        torch.get_num_threads() if num_threads is None else num_threads,
    )
    return out if out2 is None else (out, out2)


def lora_grad(g: torch.Tensor, q: torch.Tensor, scaling: float, transpose_out: bool = False) -> torch.Tensor:
    """(s g)^T q for fp32 g [m, r] (any strides) and q [m, c] (made contiguous): [r, c], or
    with ``transpose_out`` its transpose as a contiguous [c, r]. Each g element is scaled in
    fp32 first (as ``g * s`` rounds it), then each output is one FMA chain over the m rows.
    The LoRA layer's dA = (s g)^T x and dB = ((s xa)^T dy)^T on this level (the fp32
    BLAS's skinny GEMMs for these, [r, m] @ [m, c], ran at 20-30 GFLOP/s on the demo's
    shapes)."""
    fn = "lora_grad_f32"
    need(fn, g, "g", _F32, 2)
    need(fn, q, "q", _F32, 2)
    if q.shape[0] != g.shape[0]:
        raise ValueError(f"{fn}: g {tuple(g.shape)} and q {tuple(q.shape)} must have the same rows")
    m, r = g.shape
    cols = q.shape[1]
    q = q.contiguous()
    out = torch.empty((cols, r) if transpose_out else (r, cols), dtype=_F32)
    _native.cpu_module().lora_grad_f32(
        g.data_ptr(),
        g.untyped_storage().nbytes() // 4 - g.storage_offset(),
        g.stride(0),
        g.stride(1),
        m,
        r,
        float(scaling),
        q.data_ptr(),
        q.numel(),
        cols,
        out.data_ptr(),
        out.numel(),
        transpose_out,
        torch.get_num_threads(),
    )
    return out
