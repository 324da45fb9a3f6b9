"""Every Python argument check of qpeft, in one place.

Each public call checks its arguments exactly once, at its boundary:
``qpeft.functional`` (and the modules through it) for the quantization, GEMV and QLoRA
ops, which then trust their inputs; the optimizer step ops for their tensors (the step
ops are the optimizers' boundary, and check every tensor before updating any). A
direct ``torch.ops.qpeft.*`` call is checked by the router before any backend's kernel
(the ``op_*`` checks at the end: dtypes, element counts, ranks, devices), and the native
code re-checks every size before it touches memory (csrc/include/qpeft/host_checks.h):
an inconsistent call gets an error naming the argument, never a crash.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from math import prod

import torch

from ._formats import BLOCKSIZES_4BIT, FLOAT_DTYPES, QUANT_TYPES
from ._optim_math import state_blocks
from .weight4bit import Weight4bit


def _blocks(n: int, blocksize: int) -> int:
    return -(n // -blocksize)


def float_input(x: torch.Tensor, what: str) -> None:
    tensor_arg(x, what)
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
    if isinstance(bs, bool) or not isinstance(bs, int) or bs <= 0:
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
    if tuple(out.shape) != tuple([int(s) for s in shape]) or out.dtype != dtype:
        raise ValueError(
            f"out is {tuple(out.shape)} {out.dtype} but the result is {tuple([int(s) for s in shape])} {dtype}"
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
    if any([int(s) < 0 for s in shape]):
        raise ValueError(f"shape must be non-negative, got {tuple(shape)}")
    n = prod([int(s) for s in shape])
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
    n = prod([int(s) for s in shape])
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


# --- the public boundary: qpeft.functional ------------------------------------------------


def tensor_arg(t, name: str) -> torch.Tensor:
    """``t`` must be a tensor (not a list, a number or None)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    return t


def packed_4bit(packed, name: str = "packed") -> torch.Tensor:
    """The packed codes as uint8: bitsandbytes' quant_storage may hold the same bytes in
    another dtype (viewed, never converted); bool storage has no byte meaning. A
    :class:`qpeft.Weight4bit` stands for its packed codes."""
    if isinstance(packed, Weight4bit):
        return packed.packed
    tensor_arg(packed, name)
    if packed.dtype == torch.bool:
        raise TypeError(
            f"{name} is a bool tensor: packed 4-bit codes are bytes (uint8, or bitsandbytes' quant_storage "
            "dtypes holding the same bytes); bool values cannot hold them"
        )
    if packed.dtype != torch.uint8:
        if packed.is_complex():
            raise TypeError(f"{name} must hold bytes (uint8), got {packed.dtype}")
        packed = packed.contiguous().view(torch.uint8)
    return packed


# QuantState -> (signature, tensors) of its last successful state_4bit check. The check reads
# only metadata (types, dtypes, sizes, devices, layouts, the scalar fields), never values, so
# a call whose signature equals the stored one would pass it again and skips it: a layer's
# forward checks its frozen state once, not per call (docs/design.md, "Per-call overhead").
# The signature holds the id of every tensor it covers and the entry keeps those tensors
# alive, so an id cannot be reused by a replacement while the entry exists; a replaced
# tensor or nested state, a field reassigned, or a tensor changed in place through
# ``.data =`` / ``resize_`` / ``set_`` (new dtype or shape) changes the signature and
# the full check runs again.
_checked_states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _state_signature(state, packed: torch.Tensor, matrix: bool):
    """(signature, tensors) of what ``state_4bit`` checks, or None when a field is not even
    a tensor (then the full check runs and names the problem)."""
    from .quant_state import QuantState

    s2, shape, bs, qt = state.state2, state.shape, state.blocksize, state.quant_type
    # only immutable scalar fields enter the signature (a list shape could change in place)
    if type(shape) is not torch.Size or type(bs) is not int or type(qt) is not str:
        return None
    if s2 is None:
        tensors = (packed, state.absmax)
        extra = None
    elif type(s2) is QuantState and type(s2.blocksize) is int:
        tensors = (packed, state.absmax, state.offset, s2.absmax, s2.code)
        extra = (id(s2), s2.blocksize)
    else:
        return None
    sig = [shape, bs, qt, matrix, extra]
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            return None
        # device and layout cannot change under one tensor object (``.data =`` refuses another
        # device or layout); dtype and shape can (``.data =``, ``resize_``, ``set_``)
        sig.append((id(t), t.dtype, t.shape))
    return tuple(sig), (tensors, s2)  # the objects whose ids it holds, kept alive with it


def state_4bit(state, packed: torch.Tensor, *, matrix: bool = False) -> tuple | None:
    """``state`` is a consistent 4-bit QuantState for ``packed`` (sizes, dtypes, devices);
    ``matrix``: it describes a 2-D [out_features, in_features] weight. A state that passed
    with the same tensors and metadata is not checked again (``_checked_states``).

    Returns the signature the state passed with (the very object stored, so a caller can
    key what it derives from the state on its identity: a changed state gets a new one),
    or None when the state cannot be cached (then nothing derived may be kept)."""
    from .quant_state import QuantState

    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a qpeft.QuantState, got {type(state).__name__}")
    # Traced by torch.compile: no cache. Dynamo would guard on the weak dictionary's keys,
    # and an entry collected between calls made its guard raise (StopIteration) instead of
    # recompiling; the compiled graph runs no Python checks per call anyway.
    if torch.compiler.is_compiling():
        _state_4bit_full(state, packed, matrix)
        return None
    signature = _state_signature(state, packed, matrix)
    if signature is not None:
        done = _checked_states.get(state)
        if done is not None and done[0] == signature[0]:
            return done[0]
    _state_4bit_full(state, packed, matrix)
    if signature is not None:
        _checked_states[state] = signature
        return signature[0]
    return None


def _state_4bit_full(state, packed: torch.Tensor, matrix: bool) -> None:
    if state.quant_type is None or state.shape is None:
        raise ValueError("state is not a 4-bit quantization state (no quant_type/shape)")
    if matrix and len(state.shape) != 2:
        raise ValueError(
            f"state must describe a 4-bit [out_features, in_features] weight, got shape {tuple(state.shape)}"
        )
    tensor_arg(state.absmax, "state.absmax")
    shape = [int(s) for s in state.shape]
    if not state.nested:
        dequantize_4bit(packed, state.absmax, state.blocksize, state.quant_type, shape, torch.float32)
        return
    if not isinstance(state.offset, torch.Tensor):
        raise TypeError(
            f"state.offset must be a 0-d float32 tensor (double quantization), got {type(state.offset).__name__}"
        )
    tensor_arg(state.state2.absmax, "state.state2.absmax")
    tensor_arg(state.state2.code, "state.state2.code")
    dequantize_4bit_nested(
        packed,
        state.absmax,
        state.state2.absmax,
        state.state2.code,
        state.offset.reshape(-1).float(),  # any float dtype: the ops get it as fp32
        state.blocksize,
        state.state2.blocksize,
        state.quant_type,
        shape,
        torch.float32,
    )


def no_overlap(out: torch.Tensor, *inputs: tuple[str, torch.Tensor | None]) -> None:
    """``out`` shares no memory with an input: the kernels read the inputs while they
    write ``out``, so an overlap would decode partly overwritten codes."""
    lo, hi = _extent(out)
    for name, t in inputs:
        if t is None or t.device != out.device or t.numel() == 0:
            continue
        a, b = _extent(t)
        if a < hi and lo < b:
            raise ValueError(f"out overlaps {name} in memory; pass a separate output tensor")


def _extent(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    span = 1 + sum([(size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()) if size > 0])
    return start, start + span * t.element_size()


_LORA_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


_LORA_FLOAT_SET = frozenset(_LORA_FLOATS)
_Tensor = torch.Tensor


def _qlora_fast_ok(x, packed, n, k, absmax, lora_a, lora_b, bias) -> bool:
    """What the full qlora_linear check below asks of the common call (an adapter, no
    rank_scale or out_scale, an optional bias), in one expression: True means the full
    check would pass; False runs it (it names the problem). About half the cost of the
    full check of these arguments (3.8 vs ~7 us, 64x64 layer, AMX Xeon VM; docs/design.md,
    "Per-call overhead")."""
    if not (isinstance(x, _Tensor) and isinstance(lora_a, _Tensor) and isinstance(lora_b, _Tensor)):
        return False
    dev = x.device
    ok = (
        x.layout is _STRIDED
        and lora_a.layout is _STRIDED
        and lora_b.layout is _STRIDED
        and x.dtype in _LORA_FLOAT_SET
        and lora_a.dtype in _LORA_FLOAT_SET
        and lora_b.dtype in _LORA_FLOAT_SET
        and x.dim() >= 1
        and x.shape[-1] == k
        and lora_a.dim() == 2
        and lora_b.dim() == 2
        and lora_a.shape[1] == k
        and lora_b.shape[0] == n
        and lora_a.shape[0] == lora_b.shape[1]
        and lora_a.shape[0] >= 1
        and lora_a.device == dev
        and lora_b.device == dev
        and packed.device == dev
        and absmax.device == dev
    )
    if not ok or bias is None:
        return ok
    return (
        isinstance(bias, _Tensor)
        and bias.layout is _STRIDED
        and bias.dtype in _LORA_FLOAT_SET
        and bias.dim() == 1
        and bias.shape[0] == n
        and bias.device == dev
    )


def qlora_linear(x, packed, state, lora_a, lora_b, bias, rank_scale, out_scale) -> tuple | None:
    """The arguments of ``qpeft.functional.qlora_linear`` (x [..., K]; float64 x/A/B are
    accepted so gradcheck can run through the reference). lora_A and lora_B both None:
    no adapter (then rank_scale must be None too). Returns ``state_4bit``'s signature."""
    signature = state_4bit(state, packed, matrix=True)
    n, k = int(state.shape[0]), int(state.shape[1])
    if (
        rank_scale is None
        and out_scale is None
        and _qlora_fast_ok(x, packed, n, k, state.absmax, lora_a, lora_b, bias)
    ):
        return signature
    if (lora_a is None) != (lora_b is None):
        raise ValueError(
            "lora_A and lora_B must be given together (or both None for no adapter); got "
            f"lora_A={'None' if lora_a is None else 'a tensor'}, lora_B={'None' if lora_b is None else 'a tensor'}"
        )
    has_lora = lora_a is not None
    if not has_lora and rank_scale is not None:
        raise ValueError("rank_scale scales the LoRA ranks; it needs lora_A and lora_B")
    named = [("x", x)] + ([("lora_A", lora_a), ("lora_B", lora_b)] if has_lora else [])
    named += [
        (nm, t)
        for nm, t in (("bias", bias), ("out_scale", out_scale), ("rank_scale", rank_scale))
        if t is not None
    ]
    for name, t in named:
        tensor_arg(t, name)
        if t.dtype not in _LORA_FLOATS:
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(
            f"x has {x.shape[-1] if x.dim() else 0} input features (shape {tuple(x.shape)}) but the quantized "
            f"weight is [out_features={n}, in_features={k}]"
        )
    if has_lora:
        if lora_a.dim() != 2 or lora_a.shape[1] != k or lora_a.shape[0] < 1:
            raise ValueError(f"lora_A must be [r, in_features={k}] with r >= 1, got {tuple(lora_a.shape)}")
        if lora_b.dim() != 2 or lora_b.shape[0] != n:
            raise ValueError(f"lora_B must be [out_features={n}, r], got {tuple(lora_b.shape)}")
        if lora_a.shape[0] != lora_b.shape[1]:
            raise ValueError(
                f"LoRA rank mismatch: lora_A {tuple(lora_a.shape)} has r={lora_a.shape[0]} but lora_B "
                f"{tuple(lora_b.shape)} has r={lora_b.shape[1]}"
            )
    r = lora_a.shape[0] if has_lora else 0
    for name, t, size in (("bias", bias, n), ("out_scale", out_scale, n), ("rank_scale", rank_scale, r)):
        if t is not None and tuple(t.shape) != (size,):
            raise ValueError(f"{name} must have shape ({size},), got {tuple(t.shape)}")
    for name, t in (("out_scale", out_scale), ("rank_scale", rank_scale)):
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError(
                f"qlora_linear has no gradient for {name}; pass {name}.detach() (or train it with a separate op)"
            )
    for name, t in [("packed", packed), ("state.absmax", state.absmax)] + named[1:]:
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them to one device")
    return signature


def gemv_4bit(x, packed, state) -> None:
    """The arguments of ``qpeft.functional.gemv_4bit`` (x [..., K], at most GEMV_MAX_ROWS rows)."""
    from ._formats import GEMV_MAX_ROWS

    state_4bit(state, packed, matrix=True)
    n, k = int(state.shape[0]), int(state.shape[1])
    tensor_arg(x, "x")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(
            f"x has shape {tuple(x.shape)} but the quantized weight is [out_features={n}, in_features={k}]"
        )
    m = x.numel() // k if k else 0
    if not 1 <= m <= GEMV_MAX_ROWS:
        raise ValueError(
            f"gemv_4bit takes 1 to {GEMV_MAX_ROWS} rows of x (decoding), got {m}; use qlora_linear or "
            "dequantize_4bit + a matmul for more rows"
        )
    same_device(("x", x), ("packed", packed), ("state.absmax", state.absmax))


# --- the optimizer step ops ------------------------------------------------------------
# They update param and the state tensors in place, so those must be contiguous and of
# the exact dtype and size the kernels write; the gradient is only read (any layout).

_FLOAT_IDS = frozenset(FLOAT_DTYPES)


def _param_and_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    if param.is_complex() or grad.is_complex():
        raise TypeError(
            "qpeft optimizers do not support complex parameters or gradients "
            f"(got param {param.dtype}, grad {grad.dtype}); use torch.view_as_real to optimize the real view"
        )
    if param.dtype not in FLOAT_DTYPES:
        raise TypeError(f"param must be float32, float16 or bfloat16, got {param.dtype}")
    if grad.layout != torch.strided:
        raise TypeError(
            f"grad must be a dense tensor, got layout {grad.layout} (sparse gradients are not supported)"
        )
    if grad.dtype != param.dtype:
        raise TypeError(f"grad dtype {grad.dtype} differs from param dtype {param.dtype}")
    if grad.shape != param.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} differs from param shape {tuple(param.shape)}")
    if grad.device != param.device:
        raise ValueError(f"grad is on {grad.device} but param is on {param.device}")
    if not param.is_contiguous():
        raise ValueError("param must be contiguous: the step updates it in place")


def _state(t: torch.Tensor, name: str, dtype: torch.dtype, numel: int, device: torch.device) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if t.numel() != numel:
        raise ValueError(f"{name} has {t.numel()} elements but {numel} are needed (state and param disagree)")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but param is on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous: the step updates it in place")


def _qmap(code: torch.Tensor, name: str, device: torch.device) -> None:
    if code.dtype != torch.float32 or code.numel() != 256:
        raise ValueError(
            f"{name} must be a float32 tensor of 256 values, got {code.dtype} with {code.numel()}"
        )
    if code.device != device:
        raise ValueError(f"{name} is on {code.device} but param is on {device}")
    # Sortedness is checked where it is cheap: by the reference (qmap_sorted) and by
    # the CPU kernels when they build their cached encoder table (not per step here).


def qmap_sorted(code: torch.Tensor, name: str) -> None:
    flat = code.reshape(-1)
    if not bool(torch.isfinite(flat).all()) or not bool((flat[1:] >= flat[:-1]).all()):
        raise ValueError(f"{name} must be finite and sorted ascending (the encoder searches its midpoints)")


def adamw32(param, grad, exp_avg, exp_avg_sq) -> None:
    _param_and_grad(param, grad)
    n = param.numel()
    _state(exp_avg, "exp_avg", torch.float32, n, param.device)
    _state(exp_avg_sq, "exp_avg_sq", torch.float32, n, param.device)


def adamw8bit(
    param, grad, exp_avg_q, exp_avg_absmax, exp_avg_sq_q, exp_avg_sq_absmax, qmap_signed, qmap_unsigned
):
    _param_and_grad(param, grad)
    n = param.numel()
    _state(exp_avg_q, "exp_avg_q", torch.uint8, n, param.device)
    _state(exp_avg_absmax, "exp_avg_absmax", torch.float32, state_blocks(n), param.device)
    _state(exp_avg_sq_q, "exp_avg_sq_q", torch.uint8, n, param.device)
    _state(exp_avg_sq_absmax, "exp_avg_sq_absmax", torch.float32, state_blocks(n), param.device)
    _qmap(qmap_signed, "qmap_signed", param.device)
    _qmap(qmap_unsigned, "qmap_unsigned", param.device)


def lion32(param, grad, exp_avg) -> None:
    _param_and_grad(param, grad)
    _state(exp_avg, "exp_avg", torch.float32, param.numel(), param.device)


def lion8bit(param, grad, exp_avg_q, exp_avg_absmax, qmap_signed) -> None:
    _param_and_grad(param, grad)
    n = param.numel()
    _state(exp_avg_q, "exp_avg_q", torch.uint8, n, param.device)
    _state(exp_avg_absmax, "exp_avg_absmax", torch.float32, state_blocks(n), param.device)
    _qmap(qmap_signed, "qmap_signed", param.device)


def adamw8bit_maps(qmap_signed, qmap_unsigned, device: torch.device) -> None:
    _qmap(qmap_signed, "qmap_signed", device)
    _qmap(qmap_unsigned, "qmap_unsigned", device)


def lion8bit_map(qmap_signed, device: torch.device) -> None:
    _qmap(qmap_signed, "qmap_signed", device)


def lists(*named: tuple[str, list]) -> None:
    """The lists of a multi-tensor op have equal lengths."""
    n = len(named[0][1])
    for name, lst in named:
        if len(lst) != n:
            raise ValueError(f"{name} holds {len(lst)} tensors but {named[0][0]} holds {n}")


def one_device(*lists: list[torch.Tensor]) -> None:
    """Every tensor of a multi-tensor op is on one device."""
    devices = {t.device for lst in lists for t in lst}
    if len(devices) > 1:
        raise ValueError(
            f"a multi-tensor step needs all tensors on one device, got {sorted(map(str, devices))}"
        )


_STRIDED = torch.strided


def cpu_step_ok(param, grad, n, s1, dtype1, n1, s2, dtype2, n2) -> bool:
    """The fast check of one tensor of a CPU multi-tensor step: what the full checks
    (adamw32 / adamw8bit / lion32 / lion8bit above) ask, for two state tensors of
    the given dtypes and sizes, plus all on the CPU. False means: run the full
    checks, which name the problem."""
    dt = param.dtype
    return (
        dt in _FLOAT_IDS
        and grad.dtype is dt
        and s1.dtype is dtype1
        and s2.dtype is dtype2
        and grad.shape == param.shape
        and s1.numel() == n1
        and s2.numel() == n2
        and grad.layout is _STRIDED
        and param.is_cpu
        and grad.is_cpu
        and s1.is_cpu
        and s2.is_cpu
        and param.is_contiguous()
        and s1.is_contiguous()
        and s2.is_contiguous()
    )


# --- direct op calls: torch.ops.qpeft.* ------------------------------------------------
# qpeft.functional checks everything above before it calls an op, but a direct call of
# torch.ops.qpeft.* reaches the kernels with whatever it was given. The native ABI passes
# each buffer as a pointer and an element count, the element type fixed by the argument
# (uint8 codes, fp32 absmax, fp32 maps of 256 values, one fp32 offset), so host_checks.h
# can check counts but not dtypes, and the map's length not at all. These checks of the
# op's own arguments run in the router (qpeft._dispatch) before any backend's kernel, and
# before the out= compositions of qpeft._ops: dtypes, element counts, ranks and devices
# (metadata only, no values read), so a direct call with a wrong dtype or a short buffer
# raises an error naming the argument on every backend. Calls that skip the dispatcher
# (kernels composing kernels, the layer's bypass in autograd._op) come after
# qpeft.functional's checks.


def _op_blocks(n: int, bs: int, name: str) -> int:
    if bs <= 0:
        raise ValueError(f"{name} must be positive, got {bs}")
    return -(n // -bs)


def _op_tensor(t: torch.Tensor, name: str, dtype: torch.dtype, numel: int) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if t.numel() != numel:
        raise ValueError(f"{name} has {t.numel()} elements but the op's other arguments need {numel}")


def _op_float(t: torch.Tensor, name: str, dtypes=FLOAT_DTYPES) -> None:
    if t.dtype not in dtypes:
        kinds = "float32, float16 or bfloat16" if dtypes is FLOAT_DTYPES else "a floating-point tensor"
        raise TypeError(f"{name} must be {kinds}, got {t.dtype}")


_U8, _F32 = torch.uint8, torch.float32
_BS4 = frozenset(BLOCKSIZES_4BIT)


def _op_weight_ok(packed, absmax, nested_absmax, nested_code, offset, bs, nested_bs, n: int) -> bool:
    """What ``_op_weight`` asks, in one expression (a third of its cost): True means it
    would pass; False runs it, and it names the problem."""
    if bs <= 0 or packed.dtype is not _U8 or packed.numel() != (n + 1) // 2:
        return False
    if bs not in _BS4:
        return False
    nb = -(n // -bs)
    dev = packed.device
    if nested_absmax is None:
        return (
            nested_code is None
            and offset is None
            and absmax.dtype is _F32
            and absmax.numel() == nb
            and absmax.device == dev
        )
    return (
        nested_code is not None
        and offset is not None
        and nested_bs > 0
        and absmax.dtype is _U8
        and nested_absmax.dtype is _F32
        and nested_code.dtype is _F32
        and offset.dtype is _F32
        and absmax.numel() == nb
        and nested_absmax.numel() == -(nb // -nested_bs)
        and nested_code.numel() == 256
        and offset.numel() == 1
        and absmax.device == dev
        and nested_absmax.device == dev
        and nested_code.device == dev
        and offset.device == dev
    )


def _op_weight(packed, absmax, nested_absmax, nested_code, offset, bs, nested_bs, n: int) -> None:
    """The packed codes of n elements and their statistics: fp32 absmax, or (double
    quantization) uint8 absmax codes with nested_absmax, nested_code and offset."""
    if _op_weight_ok(packed, absmax, nested_absmax, nested_code, offset, bs, nested_bs, n):
        return
    blocksize(bs)
    nb = _op_blocks(n, bs, "blocksize")
    _op_tensor(packed, "packed", torch.uint8, (n + 1) // 2)
    if nested_absmax is None and nested_code is None and offset is None:
        _op_tensor(absmax, "absmax", torch.float32, nb)
        same_device(("packed", packed), ("absmax", absmax))
        return
    if nested_absmax is None or nested_code is None or offset is None:
        raise ValueError("nested_absmax, nested_code and offset (double quantization) must be given together")
    _op_tensor(absmax, "absmax (double-quantized codes)", torch.uint8, nb)
    _op_tensor(nested_absmax, "nested_absmax", torch.float32, _op_blocks(nb, nested_bs, "nested_blocksize"))
    _op_tensor(nested_code, "nested_code", torch.float32, 256)
    _op_tensor(offset, "offset", torch.float32, 1)
    same_device(
        ("packed", packed),
        ("absmax", absmax),
        ("nested_absmax", nested_absmax),
        ("nested_code", nested_code),
        ("offset", offset),
    )


def _op_shape(shape, dtype) -> int:
    out_dtype(dtype)
    if min(shape, default=0) < 0:
        raise ValueError(f"shape must be non-negative, got {tuple(shape)}")
    return prod(shape)


def op_quantize_4bit(x, bs, qt) -> None:
    _op_float(x, "x")
    blocksize(bs)


def op_dequantize_4bit(packed, absmax, bs, qt, shape, dtype) -> None:
    _op_weight(packed, absmax, None, None, None, bs, 0, _op_shape(shape, dtype))


def op_dequantize_4bit_nested(
    packed, absmax_codes, nested_absmax, nested_code, offset, bs, nbs, qt, shape, dtype
):
    n = _op_shape(shape, dtype)
    _op_weight(packed, absmax_codes, nested_absmax, nested_code, offset, bs, nbs, n)


def op_quantize_blockwise(x, code, bs) -> None:
    _op_float(x, "x")
    _op_tensor(code, "code", torch.float32, 256)
    same_device(("x", x), ("code", code))


def op_dequantize_blockwise(q, absmax, code, bs, dtype) -> None:
    out_dtype(dtype)
    if q.dtype != torch.uint8:
        raise TypeError(f"q must be torch.uint8, got {q.dtype}")
    _op_tensor(absmax, "absmax", torch.float32, _op_blocks(q.numel(), bs, "blocksize"))
    _op_tensor(code, "code", torch.float32, 256)
    same_device(("q", q), ("absmax", absmax), ("code", code))


def op_dequantize_4bit_out(packed, absmax, bs, qt, out) -> None:
    op_dequantize_4bit(packed, absmax, bs, qt, out.shape, out.dtype)
    same_device(("packed", packed), ("out", out))


def op_dequantize_4bit_nested_out(packed, absmax_codes, nested_absmax, nested_code, offset, bs, nbs, qt, out):
    op_dequantize_4bit_nested(
        packed, absmax_codes, nested_absmax, nested_code, offset, bs, nbs, qt, out.shape, out.dtype
    )
    same_device(("packed", packed), ("out", out))


def op_dequantize_blockwise_out(q, absmax, code, bs, out) -> None:
    op_dequantize_blockwise(q, absmax, code, bs, out.dtype)
    if out.shape != q.shape:
        raise ValueError(f"out is {tuple(out.shape)} but q is {tuple(q.shape)}")
    same_device(("q", q), ("out", out))


def _op_matrix(t, name: str, rows: int | None, cols: int, dtypes, any_rows: str = "M") -> None:
    """t is a 2-D [rows, cols] floating-point tensor (rows None: any, named ``any_rows``)."""
    _op_float(t, name, dtypes)
    if t.dim() != 2 or t.shape[1] != cols or (rows is not None and t.shape[0] != rows):
        want = f"[{any_rows if rows is None else rows}, {cols}]"
        why = " (flatten x's leading dimensions first, as qpeft.functional does)" if name == "x" else ""
        raise ValueError(f"{name} must be 2-D {want}, got shape {tuple(t.shape)}{why}")


def _op_layer(x, packed, absmax, nested_absmax, nested_code, offset, bs, nbs, n, k, lora_a, lora_b, extra):
    """x [M, k] and the weight [n, k] of the layer ops; lora_A [r, k] and lora_B [n, r]
    (both or neither); ``extra``: the optional per-feature tensors (name, tensor, size)."""
    _op_weight(packed, absmax, nested_absmax, nested_code, offset, bs, nbs, n * k)
    dev = x.device
    if (  # the common call, in one expression: x and the adapter as they should be
        x.dtype in _LORA_FLOAT_SET
        and x.dim() == 2
        and x.shape[1] == k
        and packed.device == dev
        and (
            lora_a is None
            and lora_b is None
            or lora_a is not None
            and lora_b is not None
            and lora_a.dtype in _LORA_FLOAT_SET
            and lora_b.dtype in _LORA_FLOAT_SET
            and lora_a.dim() == 2
            and lora_b.dim() == 2
            and lora_a.shape[1] == k
            and lora_b.shape[0] == n
            and lora_b.shape[1] == lora_a.shape[0]
            and lora_a.device == dev
            and lora_b.device == dev
        )
        and all([t is None for _, t, _ in extra])
    ):
        return
    _op_matrix(x, "x", None, k, _LORA_FLOATS)
    named = [("x", x), ("packed", packed)]
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_A and lora_B must be given together (or both None for no adapter)")
    r = 0
    if lora_a is not None:
        _op_matrix(lora_a, "lora_A", None, k, _LORA_FLOATS, any_rows="r")
        r = lora_a.shape[0]
        _op_matrix(lora_b, "lora_B", n, r, _LORA_FLOATS)
        named += [("lora_A", lora_a), ("lora_B", lora_b)]
    for name, t, size in extra:
        if t is not None:
            _op_float(t, name, _LORA_FLOATS)
            if tuple(t.shape) != (size if size is not None else r,):
                raise ValueError(
                    f"{name} must have shape ({size if size is not None else r},), got {tuple(t.shape)}"
                )
            named.append((name, t))
    same_device(*named)


def _op_scaling(scaling) -> None:
    # every backend the same answer (the native kernels refused, the others returned NaN)
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be finite, got {scaling}")


def op_qlora_linear(
    x, packed, absmax, nested_absmax, nested_code, offset, bs, nbs, qt, n, k,
    lora_a, lora_b, scaling, bias, rank_scale, out_scale, return_xa,
) -> None:  # fmt: skip
    extra = (("bias", bias, n), ("rank_scale", rank_scale, None), ("out_scale", out_scale, n))
    _op_layer(x, packed, absmax, nested_absmax, nested_code, offset, bs, nbs, n, k, lora_a, lora_b, extra)
    _op_scaling(scaling)


def op_qlora_linear_backward(
    grad_y, x, packed, absmax, nested_absmax, nested_code, offset, bs, nbs, qt, n, k,
    lora_a, lora_b, xa, scaling, rank_scale, out_scale, need_dx, need_da, need_db, need_dbias,
) -> None:  # fmt: skip
    extra = (("rank_scale", rank_scale, None), ("out_scale", out_scale, n))
    _op_layer(x, packed, absmax, nested_absmax, nested_code, offset, bs, nbs, n, k, lora_a, lora_b, extra)
    _op_scaling(scaling)
    _op_matrix(grad_y, "grad_y", x.shape[0], n, _LORA_FLOATS)
    if need_db and lora_a is not None:
        _op_matrix(xa, "xa", x.shape[0], lora_a.shape[0], _LORA_FLOATS)
    same_device(("x", x), ("grad_y", grad_y), ("xa", xa))


def op_gemv_4bit(x, packed, absmax, nested_absmax, nested_code, offset, bs, nbs, qt, n, k) -> None:
    _op_matrix(x, "x", None, k, FLOAT_DTYPES)
    _op_weight(packed, absmax, nested_absmax, nested_code, offset, bs, nbs, n * k)
    same_device(("x", x), ("packed", packed))
