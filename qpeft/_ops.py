"""Every qpeft op: its schema (low-level ``torch.library`` API) and its fake impl.

The real implementation of each op only picks a kernel (``qpeft._registry``):
the backends in ``qpeft/backends/*/ops.py`` register them. Ops take and return
plain tensors; ``qpeft.functional`` wraps them with validation and QuantState.

Shapes (n = numel of the quantized tensor):
  packed 4-bit codes: uint8 [(n + 1) // 2, 1]; absmax: fp32 [ceil(n / blocksize)];
  8-bit codes: uint8, the input's shape; code maps: fp32 [256].
"""

from __future__ import annotations

import torch

from ._registry import kernel_for


def _blocks(n: int, blocksize: int) -> int:
    return -(n // -blocksize)


# Every op is defined with the low-level torch.library API (schema string, one
# CompositeExplicitAutograd impl that picks the kernel, a fake impl), not custom_op:
# custom_op's Python wrappers cost 35-60 us per call (a dequantize into a reused buffer
# took 64 us on a 64x64 weight against ~15 us here), as much as the kernel on small
# tensors. What those wrappers do for a mutating op is done here: the version counter of
# `out` is bumped. These ops are not differentiable: their outputs never require grad
# (the packed weight is a constant of QLoRA training; QLoRAFunction in qpeft/autograd.py
# is the autograd of the layer ops).
_lib = torch.library.Library("qpeft", "FRAGMENT")


def _define(schema: str, impl, fake, mutated: tuple[int, ...] = ()) -> None:
    name = schema.split("(", 1)[0]
    _lib.define(schema)
    if mutated:
        kernel = impl

        def impl(*args):
            kernel(*args)
            for i in mutated:
                torch.autograd.graph.increment_version(args[i])

    impl.__name__ = name
    _lib.impl(name, impl, "CompositeExplicitAutograd")
    # Not differentiable: autograd falls through, so the outputs are constants that
    # never require grad (without this, torch would record a node that warns and
    # silently drops the gradient on backward).
    _lib.impl(name, torch.library.fallthrough_kernel, "Autograd")
    torch.library.register_fake(f"qpeft::{name}", fake, lib=_lib)


# --- 4-bit blockwise quantization ----------------------------------------------------------


def _quantize_4bit(x, blocksize, quant_type):
    """(packed codes, fp32 absmax per block)."""
    return kernel_for("quantize_4bit", x.device)(x, blocksize, quant_type)


def _quantize_4bit_fake(x, blocksize, quant_type):
    n = x.numel()
    return x.new_empty(((n + 1) // 2, 1), dtype=torch.uint8), x.new_empty(
        (_blocks(n, blocksize),), dtype=torch.float32
    )


_define(
    "quantize_4bit(Tensor x, SymInt blocksize, str quant_type) -> (Tensor, Tensor)",
    _quantize_4bit,
    _quantize_4bit_fake,
)


def _dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype):
    """Packed 4-bit codes with fp32 absmax -> a ``shape``/``dtype`` tensor."""
    return kernel_for("dequantize_4bit", packed.device)(packed, absmax, blocksize, quant_type, shape, dtype)


def _dequantize_4bit_fake(packed, absmax, blocksize, quant_type, shape, dtype):
    return packed.new_empty(tuple(shape), dtype=dtype)


_define(
    "dequantize_4bit(Tensor packed, Tensor absmax, SymInt blocksize, str quant_type, SymInt[] shape, "
    "ScalarType dtype) -> Tensor",
    _dequantize_4bit,
    _dequantize_4bit_fake,
)


def _dequantize_4bit_nested(
    packed,
    absmax_codes,
    nested_absmax,
    nested_code,
    offset,
    blocksize,
    nested_blocksize,
    quant_type,
    shape,
    dtype,
):
    """Packed 4-bit codes whose absmax is double-quantized, decoded in one pass:
    absmax[b] = nested_code[absmax_codes[b]] * nested_absmax[b // nested_blocksize] + offset."""
    return kernel_for("dequantize_4bit_nested", packed.device)(
        packed,
        absmax_codes,
        nested_absmax,
        nested_code,
        offset,
        blocksize,
        nested_blocksize,
        quant_type,
        shape,
        dtype,
    )


def _dequantize_4bit_nested_fake(
    packed,
    absmax_codes,
    nested_absmax,
    nested_code,
    offset,
    blocksize,
    nested_blocksize,
    quant_type,
    shape,
    dtype,
):
    return packed.new_empty(tuple(shape), dtype=dtype)


_NESTED_ARGS = (
    "Tensor packed, Tensor absmax_codes, Tensor nested_absmax, Tensor nested_code, Tensor offset, "
    "SymInt blocksize, SymInt nested_blocksize, str quant_type"
)
_define(
    f"dequantize_4bit_nested({_NESTED_ARGS}, SymInt[] shape, ScalarType dtype) -> Tensor",
    _dequantize_4bit_nested,
    _dequantize_4bit_nested_fake,
)


# --- 8-bit blockwise quantization ----------------------------------------------------------


def _quantize_blockwise(x, code, blocksize):
    """8-bit blockwise quantization with a sorted 256-value map: (uint8 codes, fp32 absmax)."""
    return kernel_for("quantize_blockwise", x.device)(x, code, blocksize)


def _quantize_blockwise_fake(x, code, blocksize):
    return x.new_empty(x.shape, dtype=torch.uint8), x.new_empty(
        (_blocks(x.numel(), blocksize),), dtype=torch.float32
    )


_define(
    "quantize_blockwise(Tensor x, Tensor code, SymInt blocksize) -> (Tensor, Tensor)",
    _quantize_blockwise,
    _quantize_blockwise_fake,
)


def _dequantize_blockwise(q, absmax, code, blocksize, dtype):
    """8-bit blockwise codes -> code[q] * absmax[block], cast to ``dtype``."""
    return kernel_for("dequantize_blockwise", q.device)(q, absmax, code, blocksize, dtype)


def _dequantize_blockwise_fake(q, absmax, code, blocksize, dtype):
    return q.new_empty(q.shape, dtype=dtype)


_define(
    "dequantize_blockwise(Tensor q, Tensor absmax, Tensor code, SymInt blocksize, ScalarType dtype) -> Tensor",
    _dequantize_blockwise,
    _dequantize_blockwise_fake,
)


# --- out= variants of the dequantize ops: write into a caller's tensor ------------------
# On CPU a fresh 32 MiB output costs more in first-touch page faults than the decode
# itself (4096x4096 bf16: torch.empty + fill 8.1 ms vs fill of a reused tensor 0.66 ms on
# the dev box), so a caller that dequantizes repeatedly reuses one buffer. (MADV_HUGEPAGE
# on fresh outputs was tried: 3.1 ms when it works, but with the kernel's "defrag=madvise"
# setting a fault may compact memory synchronously, and medians of 53 ms were seen;
# MADV_POPULATE_WRITE faults the pages in no faster.) The result's shape and dtype are out's.


def _dequantize_4bit_out(packed, absmax, blocksize, quant_type, out):
    kernel_for("dequantize_4bit", packed.device)(
        packed, absmax, blocksize, quant_type, list(out.shape), out.dtype, out=out
    )


def _dequantize_4bit_nested_out(
    packed, absmax_codes, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, out
):
    kernel_for("dequantize_4bit_nested", packed.device)(
        packed,
        absmax_codes,
        nested_absmax,
        nested_code,
        offset,
        blocksize,
        nested_blocksize,
        quant_type,
        list(out.shape),
        out.dtype,
        out=out,
    )


def _dequantize_blockwise_out(q, absmax, code, blocksize, out):
    kernel_for("dequantize_blockwise", q.device)(q, absmax, code, blocksize, out.dtype, out=out)


def _no_result(*args):
    return None


_define(
    "dequantize_4bit_out(Tensor packed, Tensor absmax, SymInt blocksize, str quant_type, Tensor(a!) out) -> ()",
    _dequantize_4bit_out,
    _no_result,
    mutated=(4,),
)
_define(
    f"dequantize_4bit_nested_out({_NESTED_ARGS}, Tensor(a!) out) -> ()",
    _dequantize_4bit_nested_out,
    _no_result,
    mutated=(8,),
)
_define(
    "dequantize_blockwise_out(Tensor q, Tensor absmax, Tensor code, SymInt blocksize, Tensor(a!) out) -> ()",
    _dequantize_blockwise_out,
    _no_result,
    mutated=(4,),
)


# --- Fused 4-bit dequant + LoRA linear (QLoRA) -------------------------------------------
# W [out_features, in_features] travels packed with its state: absmax (fp32, or uint8
# codes when nested_absmax/nested_code/offset are given: double quantization).
#   y  = out_scale * (x @ W^T + bias + (scaling * (x @ A^T) * rank_scale) @ B^T)
# out_scale (IA3) scales the whole output of the adapted layer, bias included, as PEFT's
# IA3 scales its base layer's output; rank_scale is AdaLoRA's per-rank scale.


# Defined with the low-level torch.library API, not custom_op: the layer calls these once
# per linear per step, and custom_op's Python wrappers cost ~116 us per call at 18
# arguments on the dev box (measured: 219 us for the op against 103 us for its kernel on
# a 64x64 layer), more than a small layer's whole forward. No autograd formula is
# registered: QLoRAFunction (qpeft/autograd.py) is their autograd.
_qlora_lib = torch.library.Library("qpeft", "FRAGMENT")

_QUANT_ARGS = (
    "Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, "
    "int blocksize, int nested_blocksize, str quant_type, int out_features, int in_features"
)
_qlora_lib.define(
    f"qlora_linear(Tensor x, {_QUANT_ARGS}, Tensor lora_A, Tensor lora_B, float scaling, Tensor? bias, "
    "Tensor? rank_scale, Tensor? out_scale, bool return_xa) -> (Tensor, Tensor)"
)
_qlora_lib.define(
    f"qlora_linear_backward(Tensor grad_y, Tensor x, {_QUANT_ARGS}, Tensor lora_A, Tensor lora_B, Tensor xa, "
    "float scaling, Tensor? rank_scale, Tensor? out_scale, bool need_dx, bool need_dA, bool need_dB, "
    "bool need_dbias) -> (Tensor, Tensor, Tensor, Tensor)"
)


def qlora_linear(*args):
    """x [M, K], A [r, K], B [N, r] -> (y [M, N], xa = x @ A^T [M, r] or empty), both in x's dtype."""
    return kernel_for("qlora_linear", args[0].device)(*args)


def qlora_linear_backward(*args):
    """(dx, dA, dB, dbias) of ``qlora_linear``; the ones not asked for are empty tensors.

    xa is the forward's x @ A^T (needed only for dB; may be empty otherwise). No
    gradient for W is formed. dx/dA/dB/dbias take the dtypes of x/A/B/grad_y.
    """
    return kernel_for("qlora_linear_backward", args[0].device)(*args)


def _qlora_linear_fake(
    x,
    packed,
    absmax,
    nested_absmax,
    nested_code,
    offset,
    blocksize,
    nested_blocksize,
    quant_type,
    out_features,
    in_features,
    lora_A,
    lora_B,
    scaling,
    bias,
    rank_scale,
    out_scale,
    return_xa,
):
    y = x.new_empty((x.shape[0], out_features))
    xa = x.new_empty((x.shape[0], lora_A.shape[0]) if return_xa else (0,))
    return y, xa


def _qlora_linear_backward_fake(
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
    out_features,
    in_features,
    lora_A,
    lora_B,
    xa,
    scaling,
    rank_scale,
    out_scale,
    need_dx,
    need_dA,
    need_dB,
    need_dbias,
):
    dx = x.new_empty(x.shape if need_dx else (0,))
    da = lora_A.new_empty(lora_A.shape if need_dA else (0,))
    db = lora_B.new_empty(lora_B.shape if need_dB else (0,))
    dbias = grad_y.new_empty((out_features,) if need_dbias else (0,))
    return dx, da, db, dbias


_qlora_lib.impl("qlora_linear", qlora_linear, "CompositeExplicitAutograd")
_qlora_lib.impl("qlora_linear_backward", qlora_linear_backward, "CompositeExplicitAutograd")
torch.library.register_fake("qpeft::qlora_linear", _qlora_linear_fake, lib=_qlora_lib)
torch.library.register_fake("qpeft::qlora_linear_backward", _qlora_linear_backward_fake, lib=_qlora_lib)


# --- Optimizer steps ---------------------------------------------------------------------
# Fused in-place updates of one parameter and its state (csrc/include/qpeft/optim.h holds
# the per-element math every backend shares). grad is read in any layout; param and the
# state tensors must be contiguous. 8-bit state: uint8 codes (one per element) into the
# sorted 256-value maps (qpeft._formats.dynamic_map: signed for the first moment, unsigned
# for the second) and fp32 absmax per block of 256 elements. step is the count after this
# update (>= 1); the bias corrections are computed from it on the host.
#
# Defined with the low-level torch.library API rather than custom_op: an optimizer calls
# these once per parameter per step, and custom_op's Python autograd/ADInplaceOrView
# wrappers cost ~125 us per call at 14 arguments against ~9 us here (measured on the
# 2-core dev box), more than the whole step of a 64K-element tensor. What those wrappers
# would do for a mutating op is done below: the version counters of the mutated tensors
# are bumped after the update. The ops have no autograd formula (optimizers run them
# under torch.no_grad()).

_optim_lib = torch.library.Library("qpeft", "FRAGMENT")

_OPTIM_OPS = {
    "adamw32_step_": (
        "Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
        "float lr, float beta1, float beta2, float eps, float weight_decay, int step",
        (0, 2, 3),
    ),
    "adamw8bit_step_": (
        "Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg_q, Tensor(c!) exp_avg_absmax, "
        "Tensor(d!) exp_avg_sq_q, Tensor(e!) exp_avg_sq_absmax, Tensor qmap_signed, Tensor qmap_unsigned, "
        "float lr, float beta1, float beta2, float eps, float weight_decay, int step",
        (0, 2, 3, 4, 5),
    ),
    "lion32_step_": (
        "Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, float lr, float beta1, float beta2, float weight_decay",
        (0, 2),
    ),
    "lion8bit_step_": (
        "Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg_q, Tensor(c!) exp_avg_absmax, Tensor qmap_signed, "
        "float lr, float beta1, float beta2, float weight_decay",
        (0, 2, 3),
    ),
    # The same steps over lists of parameters (one param group's worth): equal to
    # calling the single-tensor op on each, but one native call and, on CPU, one
    # parallel region for the whole list. steps[i] is the step count of params[i].
    "adamw32_multi_step_": (
        "Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "float lr, float beta1, float beta2, float eps, float weight_decay, int[] steps",
        (0, 2, 3),
    ),
    "adamw8bit_multi_step_": (
        "Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg_qs, Tensor(c!)[] exp_avg_absmaxes, "
        "Tensor(d!)[] exp_avg_sq_qs, Tensor(e!)[] exp_avg_sq_absmaxes, Tensor qmap_signed, Tensor qmap_unsigned, "
        "float lr, float beta1, float beta2, float eps, float weight_decay, int[] steps",
        (0, 2, 3, 4, 5),
    ),
    "lion32_multi_step_": (
        "Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, float lr, float beta1, float beta2, "
        "float weight_decay",
        (0, 2),
    ),
    "lion8bit_multi_step_": (
        "Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg_qs, Tensor(c!)[] exp_avg_absmaxes, "
        "Tensor qmap_signed, float lr, float beta1, float beta2, float weight_decay",
        (0, 2, 3),
    ),
}


def _define_step_op(name: str, schema: str, mutated: tuple[int, ...]) -> None:
    _optim_lib.define(f"{name}({schema}) -> ()")

    def impl(*args):
        first = args[0]
        if isinstance(first, (list, tuple)):  # multi-tensor op
            if not first:
                return
            kernel_for(name, first[0].device)(*args)
            for i in mutated:
                torch.autograd.graph.increment_version(args[i])  # one call per list
            return
        kernel_for(name, first.device)(*args)
        for i in mutated:
            torch.autograd.graph.increment_version(args[i])

    def fake(*args):
        return None

    _optim_lib.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"qpeft::{name}", fake, lib=_optim_lib)


for _name, (_schema, _mutated) in _OPTIM_OPS.items():
    _define_step_op(_name, _schema, _mutated)

# --- 4-bit GEMV for decoding --------------------------------------------------------------
# y = x @ W^T for a few rows of x (M <= 8: token-by-token decoding), W [out_features,
# in_features] packed 4-bit with its state as in qlora_linear. Accumulates in fp32 and
# rounds once to x's dtype; larger M belongs to qlora_linear (a GEMM).


def _gemv_4bit(
    x,
    packed,
    absmax,
    nested_absmax,
    nested_code,
    offset,
    blocksize,
    nested_blocksize,
    quant_type,
    out_features,
    in_features,
):
    """x [M, K] with 1 <= M <= 8 -> x @ W^T [M, N] in x's dtype."""
    return kernel_for("gemv_4bit", x.device)(
        x,
        packed,
        absmax,
        nested_absmax,
        nested_code,
        offset,
        blocksize,
        nested_blocksize,
        quant_type,
        out_features,
        in_features,
    )


def _gemv_4bit_fake(
    x,
    packed,
    absmax,
    nested_absmax,
    nested_code,
    offset,
    blocksize,
    nested_blocksize,
    quant_type,
    out_features,
    in_features,
):
    return x.new_empty((x.shape[0], out_features))


_define(
    "gemv_4bit(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
    "Tensor? offset, SymInt blocksize, SymInt nested_blocksize, str quant_type, SymInt out_features, "
    "SymInt in_features) -> Tensor",
    _gemv_4bit,
    _gemv_4bit_fake,
)
