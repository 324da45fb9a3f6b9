"""Public quantization API: tensors in, (codes, QuantState) out, and back.

Thin over the registered ops (``torch.ops.qpeft.*``): this layer is the public boundary
where every argument is checked, once (``qpeft._checks``), and adds argument defaults,
double quantization, the non-finite check and QuantState bookkeeping.
"""

from __future__ import annotations

import weakref

import torch

from . import (
    _checks,
    _ops,  # noqa: F401  (defines torch.ops.qpeft.*)
    backends,  # noqa: F401  (registers every backend's kernels)
)
from ._formats import NESTED_BLOCKSIZE, code4, dynamic_map
from .autograd import (
    EagerLinear4bitFunction,
    EagerQLoRAFunction,
    Linear4bitFunction,
    QLoRAFunction,
    TracedQLoRAFunction,
    autocast_enabled,
    linear_4bit_forward,
    qlora_forward,
)
from .quant_state import QuantState

__all__ = [
    "quantize_4bit",
    "dequantize_4bit",
    "quantize_blockwise",
    "dequantize_blockwise",
    "qlora_linear",
    "linear_4bit",
    "gemv_4bit",
]


def _offset32(offset: torch.Tensor) -> torch.Tensor:
    """The double-quantization offset as the ops take it: one fp32 element. An fp32 offset
    is passed as it is (0-d as bitsandbytes makes it, or [1]): the same tensor the layers'
    cached plans hold, so a call through either path saves the same tensor for backward
    (activation checkpointing compares the saved tensors' shapes with the recomputed ones),
    and no view is made per call (~2 us of a small layer's call)."""
    return offset if offset.dtype == torch.float32 else offset.reshape(1).to(torch.float32)


def _check_finite(x: torch.Tensor, absmax: torch.Tensor, allow_nonfinite: bool) -> None:
    # A block's absmax is non-finite exactly when the block holds a NaN or an Inf
    # (absmax propagates NaN), so the full scan below runs only on bad input.
    if allow_nonfinite or absmax.is_meta or bool(torch.isfinite(absmax).all()):
        return  # meta tensors have no values to check
    bad = ~torch.isfinite(x.reshape(-1))
    count = int(bad.sum())
    first = int(bad.nonzero()[0, 0])
    index = (
        tuple(int(i) for i in torch.unravel_index(torch.tensor(first), x.shape)) if x.dim() > 1 else (first,)
    )
    raise ValueError(
        f"input has {count} non-finite value(s) (NaN or Inf); the first is at index {index} "
        f"(flat {first}) = {float(x.reshape(-1)[first])}. Pass allow_nonfinite=True to quantize anyway "
        "(the blocks holding them then decode to non-finite values)."
    )


def quantize_4bit(
    x: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
    *,
    allow_nonfinite: bool = False,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``x`` (fp32/fp16/bf16, any shape) to packed 4-bit NF4 or FP4 codes.

    Returns ``(packed, state)``: ``packed`` is uint8 ``[(numel + 1) // 2, 1]``, two
    codes per byte with the first element in the high nibble; ``state`` holds one
    fp32 absmax per ``blocksize`` elements, double-quantized to 8 bits (blocks of
    256, plus an fp32 offset) when ``double_quant``. Bit-compatible with
    ``bitsandbytes.functional.quantize_4bit(x, blocksize, compress_statistics=double_quant,
    quant_type=quant_type)``.

    Non-finite input raises ValueError unless ``allow_nonfinite=True``; then it is quantized
    as bitsandbytes quantizes it (the blocks holding NaN/Inf decode to non-finite values;
    with ``double_quant`` the offset and nested statistics are non-finite too, bit for bit
    as bitsandbytes has them). An fp32 overflow of the double-quantization offset is
    treated alike.
    """
    _checks.quantize_4bit(x, blocksize, quant_type)
    packed, absmax = torch.ops.qpeft.quantize_4bit(x, blocksize, quant_type)
    _check_finite(x, absmax, allow_nonfinite)
    state = QuantState(
        absmax=absmax,
        shape=x.shape,
        code=code4(quant_type, x.device).clone(),
        blocksize=blocksize,
        quant_type=quant_type,
        dtype=x.dtype,
    )
    if double_quant:
        offset = absmax.mean()  # fp32, as bitsandbytes computes it (the bits must match)
        # with allow_nonfinite the non-finite offset and nested statistics are kept, as
        # bitsandbytes keeps them (the affected blocks then decode to non-finite values)
        if not allow_nonfinite and not offset.is_meta and not bool(torch.isfinite(offset)):
            raise ValueError(
                "double quantization overflowed: the mean of the block absmax values is not finite in fp32 "
                f"(largest absmax {float(absmax.max()):.3e}); quantize with double_quant=False, or pass "
                "allow_nonfinite=True to keep the non-finite statistics as bitsandbytes does"
            )
        absmax_codes, nested = quantize_blockwise(
            absmax - offset, blocksize=NESTED_BLOCKSIZE, allow_nonfinite=allow_nonfinite
        )
        state.absmax = absmax_codes
        state.offset = offset
        state.state2 = nested
    return packed, state


def dequantize_4bit(
    packed: torch.Tensor,
    state: QuantState,
    out_dtype: torch.dtype | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode ``packed`` with ``state`` to a tensor of ``state.shape`` and ``out_dtype``
    (default ``state.dtype``, or ``out.dtype``). Double-quantized statistics are decoded
    in the same pass. With ``out`` the result is written there (and ``out`` returned):
    a reused buffer saves the page faults of a fresh allocation on CPU."""
    packed = _checks.packed_4bit(packed)
    _checks.state_4bit(state, packed)
    dtype = _result_dtype(out_dtype, out, state.dtype)
    _checks.out_dtype(dtype)
    if out is not None:
        _checks.out_tensor(out, state.shape, dtype, packed)
        inputs = [("packed", packed), ("state.absmax", state.absmax)]
        if state.nested:  # the double-quantization statistics are read while out is written too
            inputs += [
                ("state.state2.absmax", state.state2.absmax),
                ("state.state2.code", state.state2.code),
                ("state.offset", state.offset),
            ]
        _checks.no_overlap(out, *inputs)
    if state.nested:
        nested = (
            state.absmax,
            state.state2.absmax,
            state.state2.code,
            _offset32(state.offset),
        )
        quant = (state.blocksize, state.state2.blocksize, state.quant_type)
        if out is not None:
            torch.ops.qpeft.dequantize_4bit_nested_out(packed, *nested, *quant, out)
            return out
        return torch.ops.qpeft.dequantize_4bit_nested(packed, *nested, *quant, list(state.shape), dtype)
    if out is not None:
        torch.ops.qpeft.dequantize_4bit_out(packed, state.absmax, state.blocksize, state.quant_type, out)
        return out
    return torch.ops.qpeft.dequantize_4bit(
        packed, state.absmax, state.blocksize, state.quant_type, list(state.shape), dtype
    )


def _result_dtype(out_dtype, out, default) -> torch.dtype:
    if out is not None and out_dtype is not None and out.dtype != out_dtype:
        raise ValueError(f"out is {out.dtype} but out_dtype={out_dtype} was asked for")
    if out_dtype is not None:
        return out_dtype
    return out.dtype if out is not None else default


def quantize_blockwise(
    x: torch.Tensor,
    blocksize: int = 256,
    code: torch.Tensor | None = None,
    *,
    nested: bool = False,
    allow_nonfinite: bool = False,
) -> tuple[torch.Tensor, QuantState]:
    """8-bit blockwise quantization with a sorted 256-value map (default: the signed
    dynamic map). Returns ``(q, state)``: uint8 codes of ``x``'s shape and a state with
    one fp32 absmax per block. Bit-compatible with bitsandbytes' CPU quantize_blockwise.

    ``nested=True`` also quantizes the absmax, as bitsandbytes' ``nested=True`` does:
    offset = mean(absmax) in fp32, absmax - offset quantized blockwise (the same blocksize,
    the signed dynamic map) into uint8 ``state.absmax``, with ``state.offset`` and
    ``state.state2`` (the nested fp32 absmax and map)."""
    _checks.float_input(x, "input")
    if code is None:
        code = dynamic_map(signed=True, device=x.device)
    _checks.quantize_blockwise(x, _checks.tensor_arg(code, "code"), blocksize)
    q, absmax = torch.ops.qpeft.quantize_blockwise(x, code, blocksize)
    _check_finite(x, absmax, allow_nonfinite)
    if allow_nonfinite and not absmax.is_meta and bool(absmax.isnan().any()):
        # bitsandbytes' block maximum skips NaN (fmax; 0 for a block of NaN only), where the
        # native op's propagates it, and its binary search sends a NaN element to code 0:
        # quantize with the NaN elements zeroed (which leaves the maxima as bitsandbytes has
        # them) and give those elements code 0. Only input holding NaN takes this path.
        nan = torch.isnan(x)
        q, absmax = torch.ops.qpeft.quantize_blockwise(x.masked_fill(nan, 0), code, blocksize)
        q = q.masked_fill(nan, 0)
    if not nested:
        return q, QuantState(absmax=absmax, code=code, blocksize=blocksize, dtype=x.dtype, shape=x.shape)
    offset = absmax.mean()  # bitsandbytes' fp32 reduction, then the same subtraction
    codes, state2 = quantize_blockwise(absmax - offset, blocksize, allow_nonfinite=allow_nonfinite)
    state = QuantState(
        absmax=codes,
        code=code,
        blocksize=blocksize,
        dtype=x.dtype,
        shape=x.shape,
        offset=offset,
        state2=state2,
    )
    return q, state


def dequantize_blockwise(
    q: torch.Tensor,
    state: QuantState,
    out_dtype: torch.dtype | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode 8-bit blockwise codes: ``code[q] * absmax[block]`` cast to ``out_dtype``
    (default ``state.dtype``, fp32 when unset; or ``out.dtype``), into ``out`` if given.

    A nested state (``quantize_blockwise(..., nested=True)``, or bitsandbytes') decodes its
    uint8 absmax first, as bitsandbytes does: ``dequantize_blockwise(state.absmax,
    state.state2) + state.offset`` in fp32, then the codes with that absmax."""
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a qpeft.QuantState, got {type(state).__name__}")
    _checks.tensor_arg(q, "q")
    _checks.tensor_arg(state.absmax, "state.absmax")
    _checks.tensor_arg(state.code, "state.code")
    dtype = _result_dtype(out_dtype, out, state.dtype or torch.float32)
    absmax = _blockwise_absmax(state) if state.nested else state.absmax
    _checks.dequantize_blockwise(q, absmax, state.code, state.blocksize, dtype, out)
    if out is not None:
        _checks.no_overlap(out, ("q", q), ("state.absmax", state.absmax), ("state.code", state.code))
        torch.ops.qpeft.dequantize_blockwise_out(q, absmax, state.code, state.blocksize, out)
        return out
    return torch.ops.qpeft.dequantize_blockwise(q, absmax, state.code, state.blocksize, dtype)


def _blockwise_absmax(state: QuantState) -> torch.Tensor:
    """The fp32 absmax of a nested 8-bit state, decoded as bitsandbytes' dequantize_blockwise
    decodes it (the nested codes in the nested state's dtype, the offset added in place,
    then fp32), so the result is bit for bit bitsandbytes'."""
    if not isinstance(state.state2, QuantState):
        raise TypeError(f"state.state2 must be a qpeft.QuantState, got {type(state.state2).__name__}")
    if state.absmax.dtype != torch.uint8:
        raise TypeError(
            f"state.absmax of a nested state must hold uint8 codes, got {state.absmax.dtype}; "
            "a state with fp32 absmax has no state2 (set state.state2 = state.offset = None)"
        )
    offset = state.offset
    if not isinstance(offset, torch.Tensor) or not offset.is_floating_point() or offset.numel() != 1:
        what = (
            f"a {offset.dtype} tensor of {offset.numel()} elements"
            if isinstance(offset, torch.Tensor)
            else offset
        )
        raise TypeError(
            f"state.offset of a nested state must be one floating-point number as a tensor, got {what}"
        )
    absmax = dequantize_blockwise(state.absmax, state.state2)
    absmax += offset
    return absmax if absmax.dtype == torch.float32 else absmax.float()


def qlora_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    state: QuantState,
    lora_A: torch.Tensor | None,
    lora_B: torch.Tensor | None,
    scaling: float,
    bias: torch.Tensor | None = None,
    *,
    out_scale: torch.Tensor | None = None,
    rank_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """QLoRA linear over a 4-bit weight W [N, K] (``packed``, ``state`` from ``quantize_4bit``)::

        y = out_scale * (x @ W^T + bias + scaling * ((x @ lora_A^T) * rank_scale) @ lora_B^T)

    x: [..., K]; lora_A: [r, K]; lora_B: [N, r]; bias, out_scale: [N]; rank_scale: [r]
    (AdaLoRA's per-rank scale). ``out_scale`` is IA3's: it scales the whole output of the
    adapted layer, bias included, as PEFT's IA3 scales its base layer's output.
    Differentiable in x, lora_A, lora_B and bias (no gradient for W is ever formed);
    rank_scale and out_scale are constants (no gradient). Runs the fused Triton kernel
    on CUDA when available, else the reference. ``lora_A = lora_B = None``: no adapter;
    every backend skips the LoRA terms (``scaling`` is ignored), y = out_scale * (x @ W^T + bias).
    """
    packed = _checks.packed_4bit(packed)
    signature = _checks.qlora_linear(x, packed, state, lora_A, lora_B, bias, rank_scale, out_scale)
    absmax, na, nc, off, quant = _state_args(state, signature)
    args = (
        x,
        lora_A,
        lora_B,
        bias,
        packed,
        absmax,
        na,
        nc,
        off,
        quant,
        float(scaling),
        rank_scale,
        out_scale,
    )
    if torch.is_grad_enabled() and (
        x.requires_grad
        or (lora_A is not None and (lora_A.requires_grad or lora_B.requires_grad))
        or (bias is not None and bias.requires_grad)
    ):
        return_xa = lora_B is not None and lora_B.requires_grad  # dB's backward reads xa
        frozen = (packed, absmax, na, nc, off, quant, args[10], rank_scale, out_scale, return_xa)
        # the Function takes x as [M, K] and gives y as [M, N]: reshaped (and cast for
        # autocast) out here, autograd records it, so y is no view made inside the Function
        # (in-place ops on it work) and the x it saves keeps its graph (create_graph=True)
        x2 = _rows(x, quant[4])
        if _setup_context_form():
            y = QLoRAFunction.apply(x2, lora_A, lora_B, bias, frozen)[0]
        elif torch._C._get_tracing_state() is None:
            y = EagerQLoRAFunction.apply(x2, lora_A, lora_B, bias, frozen)[0]
        else:  # torch.jit.trace: the frozen tensors as arguments (TracedQLoRAFunction)
            consts = (quant, args[10], return_xa)
            y = TracedQLoRAFunction.apply(
                x2, lora_A, lora_B, bias, *frozen[:5], rank_scale, out_scale, consts
            )[0]
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], quant[3])
    # nothing needs a gradient: the same forward without an autograd node (its setup is a
    # fifth of a small layer's call; docs/design.md, "Per-call overhead")
    return qlora_forward(*args, False)[0]


def _setup_context_form() -> bool:
    """Whether the layers' autograd runs in its forward + setup_context form (QLoRAFunction,
    Linear4bitFunction): under a torch.func transform, which needs it, and while
    torch.compile traces (dynamo traces that form; its per-call argument binding costs
    nothing there). Otherwise the ctx-first twins (EagerQLoRAFunction,
    EagerLinear4bitFunction) skip that binding."""
    return torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling()


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """x as QLoRAFunction takes it: [M, K], in autocast's dtype inside an autocast region."""
    dev = x.device.type
    if autocast_enabled(dev):
        x = x.to(torch.get_autocast_dtype(dev))
    return x if x.dim() == 2 else x.reshape(-1, k)


# QuantState -> (the signature its check passed with, _quant_args(state)): what the ops
# take from a state, built once per checked state instead of per call (a reshape and two
# tuples, ~3 us of a small layer's call). Valid while ``_checks.state_4bit`` returns the
# same signature object: any change it detects makes a new one (docs/design.md,
# "Per-call overhead"). Only kept when the offset is fp32 already, so the argument is a
# view of it (a cast copy would miss an in-place change of its value); a hit checks that
# the view still shares the offset's storage (``.data =`` swaps it under the same signature).
_state_args_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _state_args(state: QuantState, signature: tuple | None) -> tuple:
    """``_quant_args(state)`` for a state ``_checks`` passed with ``signature``."""
    if signature is None:
        return _quant_args(state)
    hit = _state_args_cache.get(state)
    if hit is not None and hit[0] is signature:
        # the offset argument is a view of the state's offset: a `.data =` swap of the
        # offset's storage (same dtype and shape, so the signature holds) leaves the view
        # on the old storage, which the view keeps alive (its address is not reused)
        off = hit[1][3]
        if off is None or off.data_ptr() == state.offset.data_ptr():
            return hit[1]
    args = _quant_args(state)
    # not under a torch.func transform: the offset's reshape there is a wrapper of the
    # transform's level, dead (no storage) once it returns
    if (
        not state.nested or state.offset.dtype == torch.float32
    ) and not torch._C._are_functorch_transforms_active():
        _state_args_cache[state] = (signature, args)
    return args


def _quant_args(state: QuantState) -> tuple:
    """(absmax, nested_absmax, nested_code, offset, (blocksize, nested_blocksize, quant_type, n, k))."""
    n, k = state.shape
    if state.nested:
        nested = (state.state2.absmax, state.state2.code, _offset32(state.offset))
        nested_blocksize = state.state2.blocksize
    else:
        nested, nested_blocksize = (None, None, None), NESTED_BLOCKSIZE
    return (state.absmax, *nested, (state.blocksize, nested_blocksize, state.quant_type, n, k))


def linear_4bit(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    quant_state: QuantState,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W^T + bias`` for a 4-bit weight W [N, K] (``weight_packed``, ``quant_state`` from
    ``quantize_4bit``); x is [..., K] (any strides), the result [..., N] in x's dtype
    (autocast's inside an autocast region), accumulated in fp32 and rounded once.

    M = the product of x's leading dims picks the kernel: 1 <= M <= 8
    (``qpeft._formats.GEMV_MAX_ROWS``, token-by-token decoding) runs ``qpeft::gemv_4bit``,
    which reads the packed weight once; otherwise the 4-bit matmul (``qpeft::qlora_linear``
    without an adapter: W dequantized tile by tile). Differentiable in x and bias: the
    gradient of x goes through the dequantized weight, recomputed from the packed one; W
    gets none. See docs/design.md, "Decode path".
    """
    weight_packed = _checks.packed_4bit(weight_packed)
    signature = _checks.qlora_linear(x, weight_packed, quant_state, None, None, bias, None, None)
    absmax, na, nc, off, quant = _state_args(quant_state, signature)
    n, k = quant[3], quant[4]
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        # [M, K] in, [M, N] out, reshaped and cast for autocast out here (see qlora_linear)
        fn = Linear4bitFunction if _setup_context_form() else EagerLinear4bitFunction
        y = fn.apply(_rows(x, k), bias, weight_packed, absmax, na, nc, off, quant)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)
    # inference: the same forward without an autograd node (a decode step calls this per layer)
    dev = x.device.type
    if autocast_enabled(dev):
        x = x.to(torch.get_autocast_dtype(dev))
        with torch.autocast(dev, enabled=False):
            y = linear_4bit_forward(x.reshape(-1, k), bias, weight_packed, absmax, na, nc, off, quant)
    else:
        y = linear_4bit_forward(x.reshape(-1, k), bias, weight_packed, absmax, na, nc, off, quant)
    return y.reshape(*x.shape[:-1], n)


def gemv_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """``x @ W^T`` for a 4-bit weight W [N, K] (``packed``, ``state`` from ``quantize_4bit``)
    and a few rows of x: x is [..., K] with at most 8 rows in all (token-by-token
    decoding); returns [..., N] in x's dtype, accumulated in fp32. No autograd: this is
    the inference path (``qlora_linear`` trains)."""
    packed = _checks.packed_4bit(packed)
    _checks.gemv_4bit(x, packed, state)
    n, k = state.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if state.nested:
        nested = (state.state2.absmax, state.state2.code, _offset32(state.offset))
        nested_blocksize = state.state2.blocksize
    else:
        nested, nested_blocksize = (None, None, None), NESTED_BLOCKSIZE
    y = torch.ops.qpeft.gemv_4bit(
        x2, packed, state.absmax, *nested, state.blocksize, nested_blocksize, state.quant_type, n, k
    )
    return y.reshape(*lead, n)
