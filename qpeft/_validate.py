"""Argument checks shared by every backend's kernels.

Each op's kernel calls its check before touching data, so a direct
``torch.ops.qpeft.*`` call with inconsistent tensors gets a Python exception that
names the problem, never a crash in native code (which re-checks sizes anyway).
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

import torch

from ._formats import BLOCKSIZES_4BIT, FLOAT_DTYPES, QUANT_TYPES


def _blocks(n: int, blocksize: int) -> int:
    return -(n // -blocksize)


def float_input(x: torch.Tensor, what: str) -> None:
    if x.dtype not in FLOAT_DTYPES:
        kind = "complex" if x.is_complex() else ("bool" if x.dtype == torch.bool else str(x.dtype))
        raise TypeError(
            f"{what} must be float32, float16 or bfloat16, got {kind} ({x.dtype})"
            + ("; cast float64 data with .float() first" if x.dtype == torch.float64 else "")
        )
    if x.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(x.shape)}): there is nothing to quantize")


def blocksize(bs: int) -> None:
    if bs not in BLOCKSIZES_4BIT:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES_4BIT}, got {bs}")


def blocksize8(bs: int) -> None:
    # 8-bit blockwise ops take any blocksize > 0, as bitsandbytes' CPU quantize_blockwise does.
    if isinstance(bs, bool) or bs <= 0:
        raise ValueError(f"blocksize must be a positive integer, got {bs!r}")


def quant_type(qt: str) -> None:
    if qt not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {qt!r}")


def out_dtype(dtype: torch.dtype) -> None:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"output dtype must be float32, float16 or bfloat16, got {dtype}")


def out_tensor(
    out: torch.Tensor | None, shape: Sequence[int], dtype: torch.dtype, like: torch.Tensor
) -> None:
    """``out=`` of a dequantize: a tensor of exactly the result's shape, dtype and device."""
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(int(s) for s in shape) or out.dtype != dtype:
        raise ValueError(
            f"out is {tuple(out.shape)} {out.dtype} but the result is {tuple(int(s) for s in shape)} {dtype}"
        )
    if out.device != like.device:
        raise ValueError(f"out is on {out.device} but the quantized data is on {like.device}")


def same_device(*named: tuple[str, torch.Tensor]) -> None:
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def tensor(t: torch.Tensor, name: str, dtype: torch.dtype, numel: int) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if t.numel() != numel:
        raise ValueError(
            f"{name} has {t.numel()} elements but {numel} are needed; the packed data and its "
            "quantization state disagree (truncated or mismatched checkpoint?)"
        )


def quantize_4bit(x: torch.Tensor, bs: int, qt: str) -> None:
    float_input(x, "input")
    blocksize(bs)
    quant_type(qt)


def dequantize_4bit(
    packed: torch.Tensor, absmax: torch.Tensor, bs: int, qt: str, shape: Sequence[int], dtype, out=None
) -> int:
    blocksize(bs)
    quant_type(qt)
    out_dtype(dtype)
    if any(int(s) < 0 for s in shape):
        raise ValueError(f"shape must be non-negative, got {tuple(shape)}")
    n = prod(int(s) for s in shape)
    if n == 0:
        raise ValueError(f"shape {tuple(shape)} is empty: there is nothing to dequantize")
    same_device(("packed", packed), ("absmax", absmax))
    tensor(packed, "packed", torch.uint8, (n + 1) // 2)
    tensor(absmax, "absmax", torch.float32, _blocks(n, bs))
    out_tensor(out, shape, dtype, packed)
    return n


def dequantize_4bit_nested(
    packed, absmax_codes, nested_absmax, nested_code, offset, bs, nested_bs, qt, shape, dtype, out=None
) -> int:
    blocksize(bs)
    blocksize(nested_bs)
    quant_type(qt)
    out_dtype(dtype)
    n = prod(int(s) for s in shape)
    if n <= 0:
        raise ValueError(f"shape {tuple(shape)} is empty: there is nothing to dequantize")
    same_device(
        ("packed", packed),
        ("absmax", absmax_codes),
        ("nested_absmax", nested_absmax),
        ("nested_code", nested_code),
        ("offset", offset),
    )
    nb = _blocks(n, bs)
    tensor(packed, "packed", torch.uint8, (n + 1) // 2)
    tensor(absmax_codes, "absmax (double-quantized codes)", torch.uint8, nb)
    tensor(nested_absmax, "nested_absmax", torch.float32, _blocks(nb, nested_bs))
    tensor(nested_code, "nested_code", torch.float32, 256)
    tensor(offset, "offset", torch.float32, 1)
    out_tensor(out, shape, dtype, packed)
    return n


def code8(code: torch.Tensor) -> None:
    tensor(code, "code", torch.float32, 256)
    if code.device.type == "cpu" and not bool((code[1:] >= code[:-1]).all()):
        raise ValueError("code must be sorted ascending (the encoder searches it)")


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, bs: int) -> None:
    float_input(x, "input")
    blocksize8(bs)
    same_device(("input", x), ("code", code))
    code8(code)


def dequantize_blockwise(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, bs: int, dtype, out=None
) -> None:
    blocksize8(bs)
    out_dtype(dtype)
    if q.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {q.dtype}")
    if q.numel() == 0:
        raise ValueError("codes are empty: there is nothing to dequantize")
    same_device(("codes", q), ("absmax", absmax), ("code", code))
    tensor(absmax, "absmax", torch.float32, _blocks(q.numel(), bs))
    tensor(code, "code", torch.float32, 256)
    out_tensor(out, q.shape, dtype, q)
