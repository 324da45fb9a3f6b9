"""The fused QLoRA linear on CPU: W decoded a row panel at a time into one reused buffer.

The compute dtype follows the CPU (``capability.compute_dtype``, docs/design.md "CPU
compute dtype"): with bf16 x on a CPU with bf16 dot products (AVX-512-BF16, AMX) W is
decoded to bf16 panels and every product is a bf16 GEMM of torch's oneDNN with fp32
accumulation (``_forward_bf16`` / ``_backward_bf16`` below); everywhere else (an
AVX2-only CPU ran a bf16 GEMM 5x slower than fp32) x, A, B are widened to fp32 once and
W is decoded to fp32 by the C++ kernel, ``panel_elems`` elements (a few rows of W) at a
time:

- memory: one panel of at most 4M elements (16 MiB fp32, 8 MiB bf16) instead of a whole
  copy of W (64 MiB fp32 at 4096x4096, 224 MiB at 4096x14336), and no first-touch page
  faults on a fresh buffer per call;
- time: the decode runs at memory speed (see the "dequantize" cases of python -m benchmarks) and each panel
  is consumed by the GEMM while it is still in cache.

In fp32, each output element is the fp32 dot product the reference (``backends/default/qlora.py``)
computes, but the GEMM library may split K differently for a panel than for all of W,
and dx = dy @ W accumulates panel by panel: the same products, summed in another order.
For M <= 8 the forward's x @ W^T is the C++ GEMV of ``qpeft::gemv_4bit`` instead (W read
once, packed). A small layer in fp32 (W of at most 64K elements, few rows of x) takes
one native call for its whole forward and one for its backward instead (``_small_forward``,
``_small_backward``; docs/design.md, "Per-call overhead"): the same fp32 products summed
in another order. All stay within the fp32 dot-product bounds tests/test_qlora_cpu.py and
tests/test_small_layer.py derive; the bf16 mode within those qpeft/testing.py derives.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

from ... import _native
from ..._dispatch import kernel_for
from ..._formats import GEMV_MAX_ROWS, QUANT_TYPE_IDS
from ..default.qlora import backward_from
from . import amx, capability, dpbf16, f32gemm

# Elements of W decoded per panel: a quarter of the L3 the CPU reports (the rest for x, the
# output and the other cores), at least its L2, at most PANEL_MAX_ELEMS (4M: 16 MiB of fp32,
# 8 MiB of bf16; 1024 rows of a 4096-wide weight). Within the L3 the per-GEMM-call overhead,
# not cache misses, decides: on the dev box (AVX2, M=1, K=N=4096, NF4+DQ, fp32) 5.9 ms with
# 1024-row panels, 20 ms with 256 rows, 60 ms decoding all of W to a fresh tensor; on a
# Xeon with AMX (1 thread, bf16, M=16) 6.7 ms with 1024-row panels, 8.6 ms with 256-row
# (L2-sized) ones and 8.1 ms with 2048-row ones. If sysfs is unreadable the caches are
# capability.FALLBACK_CACHE_BYTES.
PANEL_MAX_ELEMS = 1 << 22
# Tests patch this to an element count to force tiny panels; None: sized from the caches.
PANEL_ELEMS = None


def panel_elems(itemsize: int) -> int:
    if PANEL_ELEMS is not None:
        return PANEL_ELEMS
    _, l2, l3 = capability.cache_sizes()
    return max(l2 // itemsize, min(l3 // 4 // itemsize, PANEL_MAX_ELEMS))


_workspace = threading.local()


def _panel_buffer(numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A reused buffer of at least ``numel`` elements of ``dtype`` (one per thread and
    dtype). A panel larger than two regular ones (a weight whose row length forbids
    aligned panels is decoded whole) gets a buffer of its own that is not kept."""
    if numel > 2 * panel_elems(dtype.itemsize):
        return torch.empty(numel, dtype=dtype)
    attr = "buf" if dtype == torch.float32 else f"buf_{str(dtype)[6:]}"
    buf = getattr(_workspace, attr, None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype)
        setattr(_workspace, attr, buf)
    return buf[:numel]


def _panel_rows(n: int, k: int, blocksize: int, nested_blocksize: int | None, itemsize: int = 4) -> int:
    """Rows per panel: a panel must start on a quantization block (and, with double
    quantization, on a block of nested absmax), so its codes and statistics are plain
    slices of the packed tensors."""
    align = blocksize * (nested_blocksize or 1)  # elements a panel start must be a multiple of
    step = align // math.gcd(k, align)  # rows
    rows = max(step, (panel_elems(itemsize) // max(k, 1)) // step * step)
    return min(rows, n)


def _decode_panels(
    packed,
    absmax,
    nested_absmax,
    nested_code,
    offset,
    blocksize,
    nested_blocksize,
    quant_type,
    n,
    k,
    dtype=torch.float32,
):
    """Yield (r0, r1, W[r0:r1] as ``dtype`` [r1 - r0, k]), decoded by this backend's
    dequantize kernel with out= (called directly: the op's dispatch would add ~80 us per
    panel, a third of a small layer's whole forward). bf16 panels are the fp32 decode
    rounded to nearest even by the kernel (one rounding, as ``dequantize_4bit`` to bf16)."""
    nested = nested_absmax is not None
    decode = kernel_for("dequantize_4bit_nested" if nested else "dequantize_4bit", packed.device)
    rows = _panel_rows(n, k, blocksize, nested_blocksize if nested else None, dtype.itemsize)
    buf = _panel_buffer(rows * k, dtype)
    if rows >= n:  # one panel (a small layer): W whole, from the whole tensors, no slicing
        panel = buf.view(n, k)
        if nested:
            decode(
                packed,
                absmax,
                nested_absmax,
                nested_code,
                offset,
                blocksize,
                nested_blocksize,
                quant_type,
                panel.shape,
                dtype,
                out=panel,
            )
        else:
            decode(packed, absmax, blocksize, quant_type, panel.shape, dtype, out=panel)
        yield 0, n, panel
        return
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        e0, count = r0 * k, (r1 - r0) * k
        b0, blocks = e0 // blocksize, -(count // -blocksize)
        panel = buf[:count].view(r1 - r0, k)
        codes = packed.reshape(-1)[e0 // 2 : (e0 + count + 1) // 2]
        if nested:
            g0 = b0 // nested_blocksize
            decode(
                codes,
                absmax[b0 : b0 + blocks],
                nested_absmax[g0 : g0 - (blocks // -nested_blocksize)],
                nested_code,
                offset,
                blocksize,
                nested_blocksize,
                quant_type,
                panel.shape,
                panel.dtype,
                out=panel,
            )
        else:
            decode(
                codes, absmax[b0 : b0 + blocks], blocksize, quant_type, panel.shape, panel.dtype, out=panel
            )
        yield r0, r1, panel


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # ``t.to(dtype)`` costs ~3 us even when it returns t; a small layer's forward made eight
    return t if t.dtype == dtype else t.to(dtype)


# Below this much work (M * N * K) fp32 x stays fp32 even where torch's setting allows bf16:
# the bf16 path's extra passes (x and dy rounded to bf16, bf16 -> fp32 of the results)
# cost more than its faster GEMMs save. fwd+bwd, r = 8, 1 thread, min of 9 x 3 interleaved,
# 2-core SPR-class VM (amx level, contended): 40x260x256 0.53 ms fp32 vs 0.78 bf16,
# 64x300x256 0.71 vs 0.79, 24x512x512 1.57 vs 1.53, 256x300x256 2.0 vs 1.7, 9x1024x1024
# 24 vs 1.6, 12x2048x2048 152 vs 16.
FP32_BF16_MIN_WORK = 1 << 23


def fp32_may_take_bf16(m: int, n: int, k: int) -> bool:
    """Whether fp32 x of M rows on an [N, K] layer takes the bf16 path when torch's setting
    allows bf16 for fp32 matmuls (``capability.fp32_matmul_allows_bf16``; docs/design.md,
    "CPU compute dtype"). Not at M <= GEMV_MAX_ROWS (the forward is the fp32 GEMV either
    way) nor below FP32_BF16_MIN_WORK (which also keeps the one-call small-layer kernels,
    ``_small_forward`` / ``_small_backward``, on their fp32 shapes): fp32 stays allowed by
    torch's semantics ("may use bf16 internally"). The same answer for a forward and its
    backward (M, N, K are the same), so a step never mixes the two modes in one layer."""
    return m > GEMV_MAX_ROWS and m * n * k >= FP32_BF16_MIN_WORK


def fp32_takes_bf16(m: int, n: int, k: int) -> bool:
    """Whether fp32 x of M rows on an [N, K] layer computes in bf16 now (``_compute_dtype``):
    what qpeft._C_layer asks before serving a call of at least FP32_BF16_MIN_WORK."""
    return capability.compute_dtype(torch.float32, fp32_may_take_bf16(m, n, k)) != _F32


def _compute_dtype(x: torch.Tensor, n: int = 0, k: int = 0) -> torch.dtype:
    # by capability (bf16 for bf16 x with bf16 units, for fp32 x of a large shape when
    # torch's fp32 matmul setting allows bf16, or with QPEFT_CPU_COMPUTE=bf16); fp64
    # inputs (gradcheck) stay fp64 as in the reference. n = k = 0: "not a large shape".
    if x.dtype is not _F32:
        return capability.compute_dtype(x.dtype)
    return capability.compute_dtype(x.dtype, n > 0 and fp32_may_take_bf16(x.shape[0], n, k))


# --- fp32: the LoRA up-projection merged into the decoded panel -----------------------------
#
# y = x W^T + (s xa rs) B^T = x (W + (s rs B) A)^T, and dx = dy' W + (s g rs) A =
# dy' (W + (s rs B) A): with the panel decoded anyway, adding the rank-r product (s rs B) A
# to it (N K r multiply-adds, in cache) lets the base GEMM carry the LoRA term, where the
# composed path pays an [M, N] (or [M, K]) pass for it: a GEMM of inner dimension r (M N r,
# or M K r, multiply-adds) and a read-modify-write of y (dx) in memory. That wins when the
# merge's N K r is not much above the pass's M N r, i.e. K <= 2 M for the forward (N <= 2 M
# for dx); the factor 2 is the memory pass, which at these shapes costs as much as the
# rank-r FLOPs (1 thread, 2-core SPR-class VM, M = 512, r = 8, fp32: a 256 -> 704 layer's
# forward + backward 5.46 ms merged vs 6.29 composed). Numerics: each weight is rounded
# once more (W + L), the LoRA term reaches the output through the merge's r + 3 roundings
# plus the GEMM's, inside the fp32 bound of the reference's order (qpeft/testing.py,
# ``oracle``: K + r + 4 roundings on the LoRA path, K + 2 on the base path).
MERGE_RATIO = 2


def merges_lora(m: int, inner: int) -> bool:
    """Whether the fp32 panel path merges the LoRA term into W: ``inner`` is K for the
    forward, N for dx."""
    return inner <= MERGE_RATIO * m


def _scaled_b(lora_b: torch.Tensor, scaling: float, rank_scale, dtype: torch.dtype) -> torch.Tensor:
    """(B s) rs, [N, r], rounded as the reference rounds (xa s) rs."""
    bs = _cast(lora_b, dtype) * scaling
    return bs if rank_scale is None else bs * _cast(rank_scale, dtype)


def qlora_linear(
    x,
    packed,
    absmax,
    nested_absmax,
    nested_code,
    offset,
    blocksize,
    nested_blocksize,
    quant_type,
    n,
    k,
    lora_a,
    lora_b,
    scaling,
    bias,
    rank_scale,
    out_scale,
    return_xa,
):
    cdt = _compute_dtype(x, n, k)
    quant = (
        packed,
        absmax,
        nested_absmax,
        nested_code,
        offset,
        blocksize,
        nested_blocksize,
        quant_type,
        n,
        k,
    )
    if cdt == torch.bfloat16:
        return _forward_bf16(x, quant, lora_a, lora_b, scaling, bias, rank_scale, out_scale, return_xa)
    if cdt == torch.float32 and _small(x.shape[0], n, k):
        return _small_forward(x, quant, lora_a, lora_b, scaling, bias, rank_scale, out_scale, return_xa)
    xc = _cast(x, cdt)
    if cdt == torch.float32 and 1 <= x.shape[0] <= GEMV_MAX_ROWS:
        # decode-sized M: the fused GEMV reads the packed codes once instead of decoding panels
        base = kernel_for("gemv_4bit", x.device)(
            xc,
            packed,
            absmax,
            nested_absmax,
            nested_code,
            offset,
            blocksize,
            nested_blocksize,
            quant_type,
            n,
            k,
        )
        xa = None
    else:
        merge = lora_a is not None and merges_lora(x.shape[0], k)
        bs, a = (_scaled_b(lora_b, scaling, rank_scale, cdt), _cast(lora_a, cdt)) if merge else (None, None)
        if cdt == torch.float32 and f32gemm.use_for(x.shape[0], n, k):
            # W decoded into the kernel's own panels, xa = x A^T in the same pass over x
            want_xa = (
                lora_a is not None and (return_xa or not merge) and lora_a.shape[0] <= f32gemm.MAX_EXTRA_COLS
            )
            extra = _cast(lora_a, cdt) if want_xa else None
            base = f32gemm.qgemm_4bit(xc, quant, (bs, a) if merge else None, extra=extra)
            base, xa = base if want_xa else (base, None)
        else:
            base, xa = _base_panels(xc, quant, (bs, a) if merge else None), None
        if merge:
            if return_xa and xa is None:
                xa = torch.mm(a, xc.t()).t()  # [M, r], a view of [r, M]
            return _finish(base, xa, x, bias, out_scale, cdt, return_xa)
    # base is this call's own tensor: the rest is added in place (on a small layer each
    # extra [M, N] temporary cost about as much as the LoRA products)
    y = base
    if lora_a is not None:  # no adapter: the LoRA terms are skipped, not computed as zeros
        if xa is None:
            # xa^T = A @ x^T ([r, M]; xa is its transposed view, returned contiguous by
            # _finish): the rank-r products in the [r, *] orientation (see _backward_composed)
            xa = torch.mm(_cast(lora_a, cdt), xc.t()).t()
        t_t = xa.t() * scaling
        if rank_scale is not None:
            t_t = t_t * _rank_col(rank_scale, cdt)
        y = base.addmm_(t_t.t(), _cast(lora_b, cdt).t())
    return _finish(y, xa, x, bias, out_scale, cdt, return_xa)


def _base_panels(xc, quant, lowrank):
    """x @ W^T (lowrank (bs, a): x @ (W + bs a)^T) with W decoded panel by panel for torch's
    GEMM (the path below the avx2 level and for fp64)."""
    n = quant[8]
    base = None
    for r0, r1, w in _decode_panels(*quant):
        w = _cast(w, xc.dtype)
        if lowrank is not None:  # W + (s rs B) A: the LoRA up-projection rides in the base GEMM
            w.addmm_(lowrank[0][r0:r1], lowrank[1])
        if r0 == 0 and r1 == n:  # one panel: W whole
            return F.linear(xc, w)
        if base is None:
            base = torch.empty((xc.shape[0], n), dtype=xc.dtype)
        base[:, r0:r1] = F.linear(xc, w)
    return base


def _finish(y, xa, x, bias, out_scale, cdt, return_xa):
    """y + bias, times out_scale, in place; both results cast to x's dtype."""
    if bias is not None:
        y.add_(_cast(bias, cdt))
    if out_scale is not None:
        y.mul_(_cast(out_scale, cdt))
    if not return_xa or xa is None:
        return _cast(y, x.dtype), x.new_empty((0,))
    # xa is a transposed view on the GEMV and merge paths ([r, M] products): returned
    # contiguous, as the fake (and every other backend) has it; [M, r] is a small copy
    return _cast(y, x.dtype), _cast(xa, x.dtype).contiguous()


# --- small layers: the whole fp32 forward in one native call ------------------------------
#
# On a layer of 64x64 .. 256x256 the composed forward above spends its time in per-op
# overhead (a panel decode, two F.linear, a scale, addmm_, add_: ~3-5 us each), not in
# arithmetic. ``qpeft._C.qlora_small_forward`` does all of it in one call: x @ W^T by the
# 4-bit GEMV kernel over chunks of GEMV_MAX_ROWS rows of x (the packed W, at most 32 KiB
# here, re-read per chunk from cache), the rank-r terms in plain loops, in the order the
# composed path rounds them (docs/design.md, "Per-call overhead", has the measurements).
# Taken for fp32 compute when W has at most SMALL_MAX_ELEMS elements, x at most
# SMALL_MAX_ROWS rows and the GEMV work M*N*K is at most SMALL_MAX_WORK; beyond that the
# panel decode + oneDNN GEMM was faster (kernel alone, 1 thread, AMX Xeon VM, min of 7x100
# calls: 64x64 M=64 86 vs 73 us, 128x128 M=32 71 vs 76, 256x256 M=8 68 vs 113, M=16
# 132 vs 135, M=32 233 vs 162).
SMALL_MAX_ELEMS = 1 << 16
SMALL_MAX_ROWS = 32
SMALL_MAX_WORK = 1 << 19


def _small(m: int, n: int, k: int) -> bool:
    nk = n * k
    return 0 < m <= SMALL_MAX_ROWS and nk <= SMALL_MAX_ELEMS and m * nk <= SMALL_MAX_WORK


_F32 = torch.float32


def _f32c(t: torch.Tensor) -> torch.Tensor:
    """t as a contiguous fp32 tensor (t itself when it is one)."""
    if t.dtype is not _F32:
        t = t.to(_F32)
    return t if t.is_contiguous() else t.contiguous()


def _pl(t: torch.Tensor | None) -> tuple[int, int]:
    return (0, 0) if t is None else (t.data_ptr(), t.numel())


def _small_forward(x, quant, lora_a, lora_b, scaling, bias, rank_scale, out_scale, return_xa):
    packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, n, k = quant
    m = x.shape[0]
    xf = _f32c(x)
    if not (packed.is_contiguous() and absmax.is_contiguous()):
        packed, absmax = packed.contiguous(), absmax.contiguous()
    if nested_absmax is not None:
        nested_absmax, nested_code, offset = _f32c(nested_absmax), _f32c(nested_code), _f32c(offset)
        nested = (nested_absmax.data_ptr(), nested_absmax.numel(), nested_code.data_ptr(), offset.data_ptr())
    else:
        nested = (0, 0, 0, 0)
    xa = None
    r = 0
    if lora_a is not None:
        lora_a, lora_b = _f32c(lora_a), _f32c(lora_b)
        r = lora_a.shape[0]
        if rank_scale is not None:
            rank_scale = _f32c(rank_scale)
        if return_xa:
            xa = torch.empty((m, r), dtype=_F32)
    if bias is not None:
        bias = _f32c(bias)
    if out_scale is not None:
        out_scale = _f32c(out_scale)
    y = torch.empty((m, n), dtype=_F32)
    _native.cpu_module().qlora_small_forward(
        xf.data_ptr(),
        xf.numel(),
        m,
        n,
        k,
        packed.data_ptr(),
        packed.numel(),
        absmax.data_ptr(),
        absmax.numel(),
        blocksize,
        QUANT_TYPE_IDS[quant_type],
        *nested,
        nested_blocksize,
        *_pl(lora_a),
        *_pl(lora_b),
        r,
        scaling,
        *_pl(rank_scale),
        *_pl(bias),
        *_pl(out_scale),
        y.data_ptr(),
        y.numel(),
        *_pl(xa),
        torch.get_num_threads(),
    )
    dt = x.dtype
    if dt is not _F32:
        y = y.to(dt)
        if xa is not None:
            xa = xa.to(dt)
    return y, (xa if xa is not None else x.new_empty((0,)))


# The backward's products run at the baseline ISA (loops along contiguous rows), so the
# one-call backward is taken only up to SMALL_BACKWARD_MAX_ROWS rows and this M*N*K: there
# it beat the composed backward (decode + oneDNN GEMMs + ten ATen calls; same run as
# above: 128x128 M=16 97 vs 134 us, 256x256 M=4 142 vs 183; it lost at 64x64 M=64, 153 vs
# 127, and 256x256 M=8, 235 vs 180).
SMALL_BACKWARD_MAX_ROWS = 16
SMALL_BACKWARD_MAX_WORK = 1 << 18


def _small_backward(
    grad_y,
    x,
    quant,
    lora_a,
    lora_b,
    xa,
    scaling,
    rank_scale,
    out_scale,
    need_dx,
    need_da,
    need_db,
    need_dbias,
):
    packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, n, k = quant
    m = grad_y.shape[0]
    dy = _f32c(grad_y)
    if not (packed.is_contiguous() and absmax.is_contiguous()):
        packed, absmax = packed.contiguous(), absmax.contiguous()
    if nested_absmax is not None:
        nested_absmax, nested_code, offset = _f32c(nested_absmax), _f32c(nested_code), _f32c(offset)
        nested = (nested_absmax.data_ptr(), nested_absmax.numel(), nested_code.data_ptr(), offset.data_ptr())
    else:
        nested = (0, 0, 0, 0)
    r = 0
    xf = xs = a32 = b32 = None
    if lora_a is None:
        need_da = need_db = False
    else:
        # fp32 copies under their own names: dA and dB are returned in lora_a's and
        # lora_b's own dtypes (the fake's, and the reference's)
        a32, b32 = _f32c(lora_a), _f32c(lora_b)
        r = lora_a.shape[0]
        if rank_scale is not None:
            rank_scale = _f32c(rank_scale)
        if need_da:
            xf = _f32c(x)  # read only here: a frozen layer's x stand-in is never materialized
        if need_db:
            xs = _f32c(xa)
    if out_scale is not None:
        out_scale = _f32c(out_scale)
    dx = torch.empty((m, k), dtype=_F32) if need_dx else None
    da = torch.empty((r, k), dtype=_F32) if need_da else None
    db = torch.empty((n, r), dtype=_F32) if need_db else None
    _native.cpu_module().qlora_small_backward(
        dy.data_ptr(),
        dy.numel(),
        *_pl(xf),
        m,
        n,
        k,
        packed.data_ptr(),
        packed.numel(),
        absmax.data_ptr(),
        absmax.numel(),
        blocksize,
        QUANT_TYPE_IDS[quant_type],
        *nested,
        nested_blocksize,
        *_pl(a32),
        *_pl(b32),
        *_pl(xs),
        r,
        scaling,
        *_pl(rank_scale),
        *_pl(out_scale),
        *_pl(dx),
        *_pl(da),
        *_pl(db),
    )
    dbias = None
    if need_dbias:  # torch's sum, as the reference sums: the same bits
        dbias = (dy if out_scale is None else dy * out_scale).sum(0)
    # in the dtypes backward_from returns; distinct empty tensors for what was not computed
    return (
        x.new_empty((0,)) if dx is None else _cast(dx, x.dtype),
        x.new_empty((0,)) if da is None else _cast(da, lora_a.dtype),
        x.new_empty((0,)) if db is None else _cast(db, lora_b.dtype),
        x.new_empty((0,)) if dbias is None else _cast(dbias, grad_y.dtype),
    )


def qlora_linear_backward(
    grad_y,
    x,
    packed,
    absmax,
    nested_absmax,
    nested_code,
    offset,
    blocksize,
    nested_blocksize,
    quant_type,
    n,
    k,
    lora_a,
    lora_b,
    xa,
    scaling,
    rank_scale,
    out_scale,
    need_dx,
    need_da,
    need_db,
    need_dbias,
):
    cdt = _compute_dtype(x, n, k)
    quant = (
        packed,
        absmax,
        nested_absmax,
        nested_code,
        offset,
        blocksize,
        nested_blocksize,
        quant_type,
        n,
        k,
    )
    if cdt == torch.bfloat16:
        return _backward_bf16(
            grad_y,
            x,
            quant,
            lora_a,
            lora_b,
            xa,
            scaling,
            rank_scale,
            out_scale,
            need_dx,
            need_da,
            need_db,
            need_dbias,
        )

    m = x.shape[0]
    if cdt == _F32 and 0 < m <= SMALL_BACKWARD_MAX_ROWS and m * n * k <= SMALL_BACKWARD_MAX_WORK:
        return _small_backward(
            grad_y,
            x,
            quant,
            lora_a,
            lora_b,
            xa,
            scaling,
            rank_scale,
            out_scale,
            need_dx,
            need_da,
            need_db,
            need_dbias,
        )

    def add_dy_w(dy, acc, lowrank=None, extra=None):
        """acc += dy @ W, W's panels accumulated one after another; acc None: dy @ W, new.
        lowrank (bs, a): the panels of W + bs @ a instead (see ``merges_lora``). extra E
        [n, e]: the pair (that, dy @ E) when the fused fp32 kernel runs (E's columns ride in
        its pass over dy), else just that (the caller computes dy @ E itself)."""
        if dy.dtype == _F32 and f32gemm.use_for(dy.shape[0], n, k):  # W decoded into the kernel's panels
            if extra is not None and extra.shape[1] > f32gemm.MAX_EXTRA_COLS:
                extra = None  # too many columns to ride along: the caller forms dy @ E itself
            return f32gemm.qgemm_4bit_dx(dy, quant, lowrank, out=acc, accumulate=acc is not None, extra=extra)
        for r0, r1, w in _decode_panels(*quant):
            w = _cast(w, dy.dtype)
            if lowrank is not None:
                w.addmm_(lowrank[0][r0:r1], lowrank[1])
            if acc is None:
                acc = torch.mm(dy[:, r0:r1], w)
            else:
                acc.addmm_(dy[:, r0:r1], w)
        return acc

    args = (
        add_dy_w,
        grad_y,
        x,
        lora_a,
        lora_b,
        xa,
        scaling,
        rank_scale,
        out_scale,
        need_dx,
        need_da,
        need_db,
        need_dbias,
    )
    if lora_a is None:
        return backward_from(*args)
    # where the products with W take the fused GEMM, dA and dB take its level's kernel too
    return _backward_composed(*args, fused=cdt == _F32 and f32gemm.use_for(m, n, k))


def _rank_col(rank_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """rank_scale ([r], or anything broadcasting against xa's last dimension) as a column
    that scales the rows of an [r, *] product: the same elementwise products."""
    return _cast(rank_scale, dtype).reshape(-1, 1)


def _backward_composed(
    add_dy_w,
    grad_y,
    x,
    lora_a,
    lora_b,
    xa,
    scaling,
    rank_scale,
    out_scale,
    need_dx,
    need_da,
    need_db,
    need_dbias,
    fused=False,
):
    """The reference's ``backward_from`` with an adapter, its rank-r products taken in the
    [r, *] orientation: g^T = B^T @ dy^T, dA = (s g^T) @ x, dB = ((s xa^T) @ dy)^T (and
    xa^T = A @ x^T in the forward). Each is a skinny GEMM (one dimension r = 4..64) that
    the fp32 BLAS ran 1.4-2.8x faster producing [r, *] than [*, r]: dy @ B 160 vs 94 us,
    dy^T @ xs 202 vs 72 us, x @ A^T (K = 704) 159 vs 90 us (M = 512, N = 704, r = 8; 1
    thread, min of 100; the e2e demo's shapes, 2-core SPR-class VM). The same products
    as the reference, each output element one fp32 (fp64) dot product summed in some
    order: within the bound tests/test_qlora_cpu.py applies whatever the order."""
    cdt = _compute_dtype(x)
    dy = _cast(grad_y, cdt)
    if out_scale is not None:
        dy = dy * _cast(out_scale, cdt)
    rs = None if rank_scale is None else _rank_col(rank_scale, cdt)
    dx = da = db = dbias = g_t = None
    merge = need_dx and merges_lora(x.shape[0], lora_b.shape[0])
    if need_dx and merge:  # dy' (W + (s rs B) A) in the panels' GEMMs
        bs = _scaled_b(lora_b, scaling, rank_scale, cdt)
        dx = add_dy_w(dy, None, (bs, _cast(lora_a, cdt)), _cast(lora_b, cdt) if need_da else None)
        if isinstance(dx, tuple):  # g = dy @ B from the same pass over dy
            dx, g = dx
            g_t = g.t()
        dx = _cast(dx, x.dtype)
    if need_da or (need_dx and not merge):
        if g_t is None:
            g_t = torch.mm(_cast(lora_b, cdt).t(), dy.t())  # (dy @ B)^T, [r, M]
        gs_t = g_t * scaling if rs is None else g_t * scaling * rs
        if need_dx and not merge:
            dx = torch.mm(gs_t.t(), _cast(lora_a, cdt))  # [M, K], then + dy @ W in place
            add_dy_w(dy, dx)
            dx = _cast(dx, x.dtype)
        if need_da:
            if fused and rs is None:  # (s g)^T x on the fused GEMM's level
                da = _cast(f32gemm.lora_grad(g_t.t(), _cast(x, cdt), scaling), lora_a.dtype)
            else:
                da = _cast(torch.mm(gs_t, _cast(x, cdt)), lora_a.dtype)
    if need_db:
        if fused and rs is None:
            db = _cast(f32gemm.lora_grad(_cast(xa, cdt), dy, scaling, transpose_out=True), lora_b.dtype)
        else:
            # [r, M], row-major whatever xa's layout (the fused kernel's [M, r], or the panels'
            # [r, M] product seen transposed): for N = 1 torch's GEMM sums in another order
            # for a transposed operand, and the C++ layer call (PanelQLoRABackward) multiplies
            # this row-major [r, M]: the same bits on both paths
            xa_t = _cast(xa, cdt).t().contiguous()
            xs_t = xa_t * scaling if rs is None else xa_t * scaling * rs
            db = _cast(torch.mm(xs_t, dy).t().contiguous(), lora_b.dtype)
    if need_dbias:
        dbias = _cast(dy.sum(0), grad_y.dtype)
    # distinct empty tensors (outputs must not alias), made only for what was not computed
    return tuple(x.new_empty((0,)) if t is None else t for t in (dx, da, db, dbias))


# --- bf16 compute (CPUs with bf16 dot products; docs/design.md "CPU compute dtype") --------
#
# Every product is one call of torch's bf16 GEMM (oneDNN: AMX tiles or vdpbf16ps, fp32
# accumulation, the [M, *] result rounded once to bf16). What stays fp32: the sum of the
# base and LoRA terms, bias and out_scale (so y is rounded to x's dtype once more, at the
# end), the panel-by-panel accumulation of dx (each panel's product is rounded to bf16
# once, then summed in fp32: the panels' rounding errors add up to at most 2^-8 of
# sum_n |dy||W|, however many panels), and dbias. qpeft/testing.py derives the error
# bounds this gives against the fp64 oracle.

_BF16 = torch.bfloat16


# Up to this M the forward multiplies W_panel @ x^T (see _base_bf16).
TRANSPOSED_MAX_ROWS = 256


def _base_bf16(xb: torch.Tensor, quant: tuple) -> torch.Tensor:
    """x @ W^T for M > GEMV_MAX_ROWS, as bf16 [M, N]: W decoded to bf16 panels (sized
    from the caches, ``panel_elems``), each consumed by one oneDNN GEMM while in cache.
    Every output element comes from one GEMM call (panels split N, not K): one rounding.

    Up to TRANSPOSED_MAX_ROWS rows it computes (x @ W^T)^T = W_panel @ x^T into row panels
    of an [N, M] result (a contiguous out=) and transposes that once: oneDNN ran it 1.3-2x
    faster than x @ W_panel^T at M = 9..512 (AMX Xeon, 1024-row panels, 1 thread), but the
    final transpose of [N, M] grows with M (9 ms at M=512, N=4096) and outweighs the gain
    above a few hundred rows, where x @ W_panel^T fills column slices of [M, N] instead."""
    n, m = quant[8], xb.shape[0]
    if m <= TRANSPOSED_MAX_ROWS:
        out_t = torch.empty((n, m), dtype=_BF16)
        xt = xb.t()
        for r0, r1, w in _decode_panels(*quant, dtype=_BF16):
            torch.mm(w, xt, out=out_t[r0:r1])
        return out_t.t().contiguous()
    out = torch.empty((m, n), dtype=_BF16)
    for r0, r1, w in _decode_panels(*quant, dtype=_BF16):
        if r0 == 0 and r1 == n:
            return F.linear(xb, w)
        out[:, r0:r1] = F.linear(xb, w)
    return out


# --- AMX (docs/design.md, "AMX GEMM") -------------------------------------------------------
# At the amx level (qpeft.cpu_info()["chosen_level"]; QPEFT_CPU_ISA=avx512_bf16 keeps the
# oneDNN panels for A/B runs) the bf16 products with W run on qpeft's own AMX kernel
# (backends/cpu/amx.py): W decoded from its codes straight into the tiles, never a decoded
# panel handed to oneDNN, and the fp32 accumulators never rounded to bf16 before the LoRA
# term is added (one rounding fewer than the panels, inside the same bounds,
# qpeft/testing.py): the kernel's epilogue adds the rank-r term in fp32 and stores y / dx
# in x's dtype (``_forward_amx``, the dx branch of ``_backward_bf16``); dA and dB come from
# ``amx.lora_grad`` (fp32 sums of exact products). Taken only where it measured faster than the panels (benchmarks/
# isa_ab.py --amx, same run, interleaved medians): ``_amx_forward`` / ``_amx_dx``.


def _amx_forward(m: int, n: int, k: int) -> bool:
    return m > GEMV_MAX_ROWS and amx.active()


def _amx_dx(m: int, n: int, k: int) -> bool:
    return amx.active()


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the AMX kernel stores for x's result: x's own where the kernel writes it
    (bf16, fp32), else fp32 (cast after)."""
    return x.dtype if x.dtype in (_BF16, torch.float32) else torch.float32


def _forward_bf16(x, quant, lora_a, lora_b, scaling, bias, rank_scale, out_scale, return_xa):
    xb = x.to(_BF16)
    f32 = torch.float32
    if _amx_forward(x.shape[0], quant[8], quant[9]):
        return _forward_amx(x, xb, quant, lora_a, lora_b, scaling, bias, rank_scale, out_scale, return_xa)
    if 1 <= x.shape[0] <= GEMV_MAX_ROWS:
        # decode-sized M: the C++ GEMV (fp32, reads the packed codes once) as in fp32 mode
        y = kernel_for("gemv_4bit", x.device)(x.to(f32), *quant)
    elif dpbf16.use_for(x.shape[0], quant):
        # avx512_bf16 level, small M: the fused decode + vdpbf16ps kernel (fp32 [M, N])
        y = dpbf16.qgemm_4bit(xb, quant)
    else:
        y = _base_bf16(xb, quant).to(f32)
    xa = None
    if lora_a is not None:  # no adapter: the LoRA terms are skipped
        xa = F.linear(xb, lora_a.to(_BF16))  # [M, r] bf16, fp32 accumulation over K
        t = xa.to(f32) * scaling
        if rank_scale is not None:
            t = t * rank_scale.to(f32)
        # the rank-r product is cheap next to x @ W^T: fp32, added to the fp32 copy of base
        y.addmm_(t, lora_b.to(f32).t())
    if bias is not None:
        y.add_(bias.to(f32))
    if out_scale is not None:
        y.mul_(out_scale.to(f32))
    return y.to(x.dtype), (xa.to(x.dtype) if return_xa and xa is not None else x.new_empty((0,)))


def _forward_amx(x, xb, quant, lora_a, lora_b, scaling, bias, rank_scale, out_scale, return_xa):
    """The forward at the amx level (M > 8): one kernel call computes x @ W^T + t @ B^T
    (t = s xa rs, fp32; the rank-r sum added to the fp32 accumulators in the kernel's
    epilogue, as ``addmm_`` added it to the fp32 base before) and, with no bias or
    out_scale to apply, stores y in x's dtype itself: no fp32 [M, N] tensor, no addmm_ or
    cast pass over it (those were ~10% of the layer's fwd+bwd at M=512; docs/design.md,
    "AMX GEMM")."""
    f32 = torch.float32
    xa = lora = None
    if lora_a is not None:  # no adapter: the LoRA terms are skipped
        xa = F.linear(xb, lora_a.to(_BF16))  # [M, r] bf16, fp32 accumulation over K
        t = xa.to(f32) * scaling
        if rank_scale is not None:
            t = t * rank_scale.to(f32)
        lora = (t.contiguous(), lora_b.to(f32).t().contiguous())
    xa_out = xa.to(x.dtype) if return_xa and xa is not None else x.new_empty((0,))
    if bias is None and out_scale is None:
        # nothing to add after the LoRA term: the kernel stores x's dtype (bf16: its fp32
        # sums rounded once, as y.to(bf16) would)
        y = amx.qgemm_4bit(xb.contiguous(), quant, out_dtype=_out_dtype(x), lora=lora)
        return _cast(y, x.dtype), xa_out
    y = amx.qgemm_4bit(xb.contiguous(), quant, lora=lora)  # fp32 [M, N]
    if bias is not None:
        y.add_(bias.to(f32))
    if out_scale is not None:
        y.mul_(out_scale.to(f32))
    return y.to(x.dtype), xa_out


def _backward_bf16(
    grad_y,
    x,
    quant,
    lora_a,
    lora_b,
    xa,
    scaling,
    rank_scale,
    out_scale,
    need_dx,
    need_da,
    need_db,
    need_dbias,
):
    f32 = torch.float32
    if out_scale is None:
        # dy' = dy rounded once (no copy for bf16 grad_y: an fp32 round trip of [M, N] cost
        # two copies per backward, a tenth of the layer's time at M=512 on the AMX Xeon)
        dy32, dy = None, grad_y.to(_BF16)
    else:
        dy32 = grad_y.to(f32) * out_scale.to(f32)
        dy = dy32.to(_BF16)  # dy' rounded once
    rs = None if rank_scale is None else rank_scale.to(f32)
    dx, da, db, dbias = (x.new_empty((0,)) for _ in range(4))  # distinct: outputs must not alias
    if lora_a is None:  # no adapter: dx = dy @ W alone, no dA/dB
        need_da = need_db = False
    if need_dx or need_da:
        if lora_a is not None:
            g = dy @ lora_b.to(_BF16)  # [M, r]
            gs = g.to(f32) * scaling if rs is None else g.to(f32) * scaling * rs
            gs = gs.to(_BF16)
        use_amx = need_dx and _amx_dx(x.shape[0], quant[8], quant[9])
        if need_dx and (use_amx or dpbf16.use_for_dx(x.shape[0], quant)):
            # dy' @ W, fp32 [M, K]: the AMX kernel, or at the avx512_bf16 level (small M) the
            # fused decode + vdpbf16ps kernel (docs/design.md, "AVX512-BF16 GEMM")
            if use_amx:
                # + (s g rs) @ A in fp32 from the same bf16 operands, in the kernel's
                # epilogue, and dx stored in x's dtype by the kernel (no fp32 [M, K] tensor)
                lora = None
                if lora_a is not None:
                    lora = (gs.to(f32).contiguous(), lora_a.to(_BF16).to(f32).contiguous())
                dx = _cast(
                    amx.qgemm_4bit(dy.contiguous(), quant, dx=True, out_dtype=_out_dtype(x), lora=lora),
                    x.dtype,
                )
            else:
                acc = dpbf16.qgemm_4bit_dx(dy, quant)
                if lora_a is not None:
                    # + (s g rs) @ A in fp32 from the same bf16 operands (one rounding fewer
                    # than oneDNN's bf16 output, and no bf16 -> fp32 pass over [M, K])
                    acc.addmm_(gs.to(f32), lora_a.to(_BF16).to(f32))
                dx = acc.to(x.dtype)
        elif need_dx:
            if lora_a is None:
                acc = torch.zeros((x.shape[0], x.shape[1]), dtype=f32)
            else:
                acc = (gs @ lora_a.to(_BF16)).to(f32)  # [M, K], then + dy @ W panel by panel
            part = torch.empty_like(acc, dtype=_BF16)  # one panel's dy @ W, reused
            for r0, r1, w in _decode_panels(*quant, dtype=_BF16):
                # a contiguous copy of dy's columns: oneDNN ran [512, 1024] @ [1024, 4096]
                # 15% faster from it than from the strided view (AMX Xeon, 1 thread)
                acc.add_(torch.mm(dy[:, r0:r1].contiguous(), w, out=part))
            dx = acc.to(x.dtype)
        if need_da:
            if amx.active():  # fp32 sums of the exact products, no bf16 rounding of dA
                da = amx.lora_grad(gs.to(f32), x.to(_BF16).contiguous()).to(lora_a.dtype)
            else:
                da = (gs.t() @ x.to(_BF16)).to(lora_a.dtype)
    if need_db:
        xs = xa.to(f32) * scaling if rs is None else xa.to(f32) * scaling * rs
        if amx.active():
            db = amx.lora_grad(xs.to(_BF16).to(f32), dy.contiguous(), transpose=True).to(lora_b.dtype)
        else:
            db = (dy.t() @ xs.to(_BF16)).to(lora_b.dtype)
    if need_dbias:
        dbias = (grad_y.to(f32) if dy32 is None else dy32).sum(0).to(grad_y.dtype)
    return dx, da, db, dbias
