"""Row chunks of a (possibly 4-bit) weight, so whole-weight reductions never hold a full copy.

DoRA needs the row norms of W + s*B@A on every forward (PEFT recomputes them, detached,
each call). Decoding W whole would keep a second fp32 copy of the weight alive (64 MiB
for a 4096x4096 layer); here rows are decoded in chunks of about ``CHUNK_ELEMENTS``
through ``qpeft.functional.dequantize_4bit`` on a slice of the packed codes.

A chunk must start on a quantization-block boundary (so its codes and absmax values are
a contiguous slice): with K columns and blocksize bs that is every bs / gcd(K, bs) rows
(1 row when bs divides K). Double-quantized statistics are decoded once up front
(``dequantize_blockwise`` + offset, the same two fp32 roundings as the fused decode;
1/64 of the weight's element count for blocksize 64).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from .. import functional as qf
from ..quant_state import QuantState
from .linear4bit import Linear4bit

# 2^20 fp32 elements = 4 MiB per chunk: large enough that per-chunk overhead is noise,
# small against any weight worth quantizing.
CHUNK_ELEMENTS = 1 << 20


def _fp32_absmax(state: QuantState) -> torch.Tensor:
    if not state.nested:
        return state.absmax
    return qf.dequantize_blockwise(state.absmax, state.state2, torch.float32) + state.offset.to(torch.float32)


def weight_rows(
    base: nn.Module, chunk_elements: int = CHUNK_ELEMENTS
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(row0, row1, W[row0:row1])`` in fp32 for an ``nn.Linear`` or a ``Linear4bit``."""
    if isinstance(base, nn.Linear):
        w = base.weight.detach()
        rows = max(1, chunk_elements // w.shape[1])
        for r0 in range(0, w.shape[0], rows):
            yield r0, min(r0 + rows, w.shape[0]), w[r0 : r0 + rows].float()
        return
    if not isinstance(base, Linear4bit):
        raise TypeError(f"expected nn.Linear or qpeft.nn.Linear4bit, got {type(base).__name__}")
    state = base.quant_state
    n, k = state.shape
    bs = state.blocksize
    align = bs // math.gcd(k, bs)
    rows = max(align, (chunk_elements // k) // align * align)
    absmax = _fp32_absmax(state)
    packed = base.weight.packed.reshape(-1)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        e0, e1 = r0 * k, r1 * k  # e0 is a multiple of bs, hence even: whole bytes
        sub = QuantState(
            absmax=absmax[e0 // bs : -(e1 // -bs)].contiguous(),
            shape=(r1 - r0, k),
            code=state.code,
            blocksize=bs,
            quant_type=state.quant_type,
            dtype=torch.float32,
        )
        codes = packed[e0 // 2 : (e1 + 1) // 2].reshape(-1, 1)
        yield r0, r1, qf.dequantize_4bit(codes, sub, torch.float32)


@torch.no_grad()
def row_norms(
    base: nn.Module,
    lora_A: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    scaling: float = 0.0,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """||W[j] + scaling * (B @ A)[j]||_2 for every output row j, in fp32 (DoRA's weight norm;
    autocast is off here: the norm is a weight statistic, not an activation)."""
    out = []
    a = lora_A.detach().float() if lora_A is not None else None
    with torch.autocast(base.weight.device.type, enabled=False):
        for r0, r1, w in weight_rows(base, chunk_elements):
            if a is not None:
                w = w + scaling * (lora_B.detach()[r0:r1].float() @ a)
            out.append(torch.linalg.vector_norm(w, dim=1))
    return torch.cat(out)
