"""The fused QLoRA linear on CPU: W decoded a row panel at a time, every product in fp32.

Computed in fp32 on every CPU for now (on an AVX2-only CPU a bf16 GEMM ran 5x slower
than fp32, and a transposed bf16 weight had no fast path at all; choosing bf16 on CPUs
with bf16 dot products is the CPU-capability work of docs/design.md), so x, A, B are
widened to fp32 once and W is decoded to fp32 by the C++ kernel, ``PANEL_ELEMS``
elements (a few rows of W) at a time, into one reused buffer:

- memory: one 16 MiB panel instead of a whole fp32 copy of W (64 MiB at 4096x4096,
  224 MiB at 4096x14336), and no first-touch page faults on a fresh buffer per call;
- time: the decode runs at memory speed (see the "dequantize" cases of python -m benchmarks) and each panel
  is consumed by the GEMM while it is still in cache.

Each output element is the fp32 dot product the reference (``backends/default/qlora.py``)
computes, but the GEMM library may split K differently for a panel than for all of W,
and dx = dy @ W accumulates panel by panel: the same products, summed in another order.
For M <= 8 the forward's x @ W^T is the C++ GEMV of ``qpeft::gemv_4bit`` instead (W read
once, packed). All stay within the fp32 dot-product bounds tests/test_qlora_cpu.py derives.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

from ..._dispatch import kernel_for
from ..._formats import GEMV_MAX_ROWS
from ..default.qlora import backward_from

# Elements of W decoded per panel: 4M fp32 = 16 MiB, 1024 rows of a 4096-wide weight.
# On the dev box (M=1, K=N=4096, NF4+DQ): 5.9 ms with 1024-row panels, 20 ms with 256
# rows (the per-panel op overhead dominates), 60 ms decoding all of W to a fresh tensor.
PANEL_ELEMS = 1 << 22

_workspace = threading.local()


def _panel_buffer(numel: int) -> torch.Tensor:
    """A reused fp32 buffer of at least ``numel`` elements (one per thread). A panel
    larger than two regular ones (a weight whose row length forbids aligned panels is
    decoded whole) gets a buffer of its own that is not kept."""
    if numel > 2 * PANEL_ELEMS:
        return torch.empty(numel, dtype=torch.float32)
    buf = getattr(_workspace, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=torch.float32)
        _workspace.buf = buf
    return buf[:numel]


def _panel_rows(n: int, k: int, blocksize: int, nested_blocksize: int | None) -> int:
    """Rows per panel: a panel must start on a quantization block (and, with double
    quantization, on a block of nested absmax), so its codes and statistics are plain
    slices of the packed tensors."""
    align = blocksize * (nested_blocksize or 1)  # elements a panel start must be a multiple of
    step = align // math.gcd(k, align)  # rows
    rows = max(step, (PANEL_ELEMS // max(k, 1)) // step * step)
    return min(rows, n)


def _decode_panels(
    packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, n, k
):
    """Yield (r0, r1, W[r0:r1] as fp32 [r1 - r0, k]), decoded by this backend's dequantize
    kernel with out= (called directly: the op's dispatch would add ~80 us per panel, a
    third of a small layer's whole forward)."""
    nested = nested_absmax is not None
    decode = kernel_for("dequantize_4bit_nested" if nested else "dequantize_4bit", packed.device)
    rows = _panel_rows(n, k, blocksize, nested_blocksize if nested else None)
    buf = _panel_buffer(rows * k)
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


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # fp32, except fp64 inputs (gradcheck) which stay fp64 as in the reference
    return torch.float64 if x.dtype == torch.float64 else torch.float32


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
    cdt = _compute_dtype(x)
    xc = x.to(cdt)
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
    else:
        base = None
        for r0, r1, w in _decode_panels(
            packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, n, k
        ):
            if r0 == 0 and r1 == n:  # one panel: W whole
                base = F.linear(xc, w.to(cdt))
                break
            if base is None:
                base = torch.empty((x.shape[0], n), dtype=cdt)
            base[:, r0:r1] = F.linear(xc, w.to(cdt))
    # base is this call's own tensor: the rest is added in place (on a small layer each
    # extra [M, N] temporary cost about as much as the LoRA products)
    y, xa = base, None
    if lora_a is not None:  # no adapter: the LoRA terms are skipped, not computed as zeros
        xa = F.linear(xc, lora_a.to(cdt))
        t = xa * scaling
        if rank_scale is not None:
            t = t * rank_scale.to(cdt)
        y = base.addmm_(t, lora_b.to(cdt).t())
    if bias is not None:
        y.add_(bias.to(cdt))
    if out_scale is not None:
        y.mul_(out_scale.to(cdt))
    return y.to(x.dtype), (xa.to(x.dtype) if return_xa and xa is not None else x.new_empty((0,)))


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

    def add_dy_w(dy, acc):  # acc += dy @ W, W's panels accumulated one after another
        for r0, r1, w in _decode_panels(
            packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, n, k
        ):
            acc.addmm_(dy[:, r0:r1], w.to(acc.dtype))

    return backward_from(
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
