"""Entry checks shared by the CPU's fused 4-bit GEMM wrappers (amx.py, dpbf16.py, f32gemm.py): the
types, dtypes and shapes of one call, so a wrong call is a clear exception before the C++
entry (which re-checks every size) touches memory. ``fn`` names the wrapper in messages."""

from __future__ import annotations

import torch

from ..._formats import QUANT_TYPE_IDS


def need(
    fn: str, t, name: str, dtype: torch.dtype, ndim: int | None = None, contiguous: bool = False
) -> None:
    """``t`` is a CPU tensor of ``dtype`` (and ``ndim`` dims; ``contiguous``: for a wrapper
    that hands the kernel its storage as it is instead of a contiguous copy)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{fn}: {name} must be on the CPU, got {t.device}")
    if t.dtype != dtype:
        raise TypeError(f"{fn}: {name} must be {dtype}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{fn}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{fn}: {name} must be contiguous")


def check_quant(fn: str, quant: tuple, contiguous: bool = False) -> None:
    """The packed weight and its statistics of the QLoRA ops' quant tuple (packed, absmax,
    nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, n, k)."""
    packed, absmax, nested_absmax, nested_code, offset, _, _, quant_type, _, _ = quant
    if quant_type not in QUANT_TYPE_IDS:
        raise ValueError(f"{fn}: quant_type must be one of {sorted(QUANT_TYPE_IDS)}, got {quant_type!r}")
    need(fn, packed, "packed", torch.uint8, contiguous=contiguous)
    nested = nested_absmax is not None
    need(fn, absmax, "absmax", torch.uint8 if nested else torch.float32, contiguous=contiguous)
    if nested:
        need(fn, nested_absmax, "nested_absmax", torch.float32, contiguous=contiguous)
        need(fn, nested_code, "nested_code", torch.float32, contiguous=contiguous)
        need(fn, offset, "offset", torch.float32, contiguous=contiguous)
        if nested_code.numel() != 256 or offset.numel() != 1:
            raise ValueError(
                f"{fn}: nested_code must hold 256 values and offset 1, got "
                f"{nested_code.numel()} and {offset.numel()}"
            )


def quant_args(quant: tuple) -> tuple[tuple, tuple]:
    """The fused GEMM entries' arguments for the packed weight, in their order: packed, its
    length, absmax, its length, blocksize, the quant type's id, nested absmax, its length,
    nested code, offset, nested blocksize (pointers as integers; 0 where not nested). Also
    returns the contiguous tensors the pointers point into: keep them alive across the call."""
    packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, _, _ = quant
    packed, absmax = packed.contiguous(), absmax.contiguous()
    nested = nested_absmax is not None
    if nested:
        nested_absmax, nested_code, offset = (t.contiguous() for t in (nested_absmax, nested_code, offset))
    args = (
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
    )
    return args, (packed, absmax, nested_absmax, nested_code, offset)
