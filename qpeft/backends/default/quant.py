"""Reference quantize/dequantize kernels (4-bit NF4/FP4, double-quantized 4-bit, 8-bit
blockwise): one torch op per step, rounding in fp32 in the order docs/design.md
("Formats") defines."""

from __future__ import annotations

from math import prod

import torch
import torch.nn.functional as F

from ..._formats import ABSMAX_FLOOR, LUT_BINS, code4, encode4_tables, lut8, zero_code4


def _blockify(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """[n] -> [blocks, blocksize], the last block zero-padded (zeros never raise an absmax)."""
    pad = -flat.numel() % blocksize
    return F.pad(flat, (0, pad)).view(-1, blocksize)


def _scale_blocks(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values[i] * scales[i // blocksize] in fp32, for a flat [n] tensor."""
    n = values.numel()
    return (_blockify(values, blocksize) * scales[:, None]).reshape(-1)[:n]


def _absmax(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.abs().amax(dim=1)  # NaN propagates: a block with a NaN has a NaN absmax


def quantize_4bit(x: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.numel()
    blocks = _blockify(x.reshape(-1).float(), blocksize)
    absmax = _absmax(blocks)
    floored = absmax.clamp(min=ABSMAX_FLOOR)
    v = blocks * (1.0 / floored)[:, None]
    if n % blocksize:
        # The last partial block divides instead (bitsandbytes' CPU path does; the two
        # differ by an ulp at times, which moves values that sit exactly on a midpoint).
        v[-1] = blocks[-1] / floored[-1]
        # bitsandbytes also stores that block's absmax floored (format.h: stored_absmax4).
        absmax[-1] = floored[-1]
    v = v.clamp(-1.0, 1.0).reshape(-1)[:n]
    mid, order = encode4_tables(quant_type, x.device)
    idx = torch.bucketize(v, mid)  # #{k : mid[k] < v}: a value on a midpoint takes the lower code
    idx = torch.where(torch.isnan(v), len(mid), idx)  # NaN: the top code, as !(NaN <= m) for all m
    codes = order[idx].to(torch.uint8)
    if n % 2:
        codes = torch.cat([codes, codes.new_full((1,), zero_code4(quant_type))])
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.unsqueeze(1), absmax


def _unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n].long()


def _decode4(packed, absmax, blocksize, quant_type, shape, dtype, out) -> torch.Tensor:
    n = prod(int(s) for s in shape)
    values = code4(quant_type, packed.device)[_unpack(packed, n)]
    result = _scale_blocks(values, absmax, blocksize).to(dtype).reshape(tuple(shape))
    return result if out is None else out.copy_(result)


def dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype, out=None):
    return _decode4(packed, absmax, blocksize, quant_type, shape, dtype, out)


def nested_absmax(absmax_codes, nested_absmax_, nested_code, offset, nested_blocksize) -> torch.Tensor:
    """fp32 absmax of double quantization: dequantize the 8-bit codes, then add the offset."""
    values = nested_code[absmax_codes.reshape(-1).long()]
    return _scale_blocks(values, nested_absmax_, nested_blocksize) + offset.reshape(())


def dequantize_4bit_nested(
    packed,
    absmax_codes,
    nested_absmax_,
    nested_code,
    offset,
    blocksize,
    nested_blocksize,
    quant_type,
    shape,
    dtype,
    out=None,
):
    absmax = nested_absmax(absmax_codes, nested_absmax_, nested_code, offset, nested_blocksize)
    return _decode4(packed, absmax, blocksize, quant_type, shape, dtype, out)


def quantize_blockwise(
    x: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.numel()
    blocks = _blockify(x.reshape(-1).float(), blocksize)
    absmax = _absmax(blocks)
    v = (blocks * (1.0 / absmax)[:, None]).clamp(-1.0, 1.0)
    # The 65536-bin lookup (format.h: lut_bin): each fp32 step rounds on its own.
    bins = (((v + 1.0) * 0.5) * float(LUT_BINS - 1) + 0.5).to(torch.int32)
    bins = torch.where(torch.isnan(v), 0, bins).long()
    q = lut8(code).to(x.device)[bins]
    q = torch.where((absmax == 0)[:, None], 0, q).to(torch.uint8)
    return q.reshape(-1)[:n].reshape(x.shape), absmax


def dequantize_blockwise(q, absmax, code, blocksize, dtype, out=None):
    values = code[q.reshape(-1).long()]
    result = _scale_blocks(values, absmax, blocksize).to(dtype).reshape(q.shape)
    return result if out is None else out.copy_(result)
