"""Every qpeft op: its schema, its fake (meta) implementation and the check of a direct call.

Kernels are registered per device key by the backends (``qpeft/backends/<b>/ops.py``
through ``qpeft._dispatch``); ``qpeft.functional`` and the modules validate arguments
before calling these ops. A direct call is checked by the router before any backend's
kernel runs (``qpeft._checks.op_<name>``: dtypes, element counts, ranks, devices, so no
kernel reads a buffer as the wrong type or past its end), and native code re-checks
every size before touching memory. Ops take and return plain tensors.

Shapes (n = numel of the quantized tensor):
  packed 4-bit codes: uint8 [(n + 1) // 2, 1]; absmax: fp32 [ceil(n / blocksize)];
  8-bit codes: uint8, the input's shape; code maps: fp32 [256].

The low-level ``torch.library`` API is used rather than ``custom_op``: custom_op's Python
wrappers cost 35-125 us per call (a dequantize into a reused 64x64 buffer took 64 us
against ~15 us; an optimizer step op ~125 us against ~9 us), as much as the kernels on
small tensors. What those wrappers do for a mutating op is done by the dispatcher's
router: the version counters of the mutated arguments are bumped. No op is
differentiable (autograd falls through, so outputs never require grad):
``qpeft.autograd.QLoRAFunction`` is the autograd of the layer ops.
"""

from __future__ import annotations

import torch

from . import _checks
from ._dispatch import DISPATCH_KEYS, declare_check, declare_mutations, kernel_for, route_other_keys

_lib = torch.library.Library("qpeft", "DEF")
OPS: list[str] = []  # every op's name, in definition order


def _blocks(n: int, blocksize: int) -> int:
    return -(n // -blocksize)


def _define(schema: str, fake, mutated: tuple[int, ...] = ()) -> str:
    name = schema.split("(", 1)[0]
    _lib.define(schema)
    OPS.append(name)
    # Not differentiable: without the fallthrough torch would record a node that warns
    # and silently drops the gradient on backward.
    _lib.impl(name, torch.library.fallthrough_kernel, "Autograd")
    torch.library.register_fake(f"qpeft::{name}", fake, lib=_lib)
    if mutated:
        declare_mutations(name, mutated)
    # a direct call is checked before any backend's kernel (_checks, "direct op calls");
    # the optimizer step ops check their tensors themselves
    check = getattr(_checks, f"op_{name}", None)
    if check is not None:
        declare_check(name, check)
    return name


def _none(*args):
    return None


# --- 4-bit blockwise quantization ----------------------------------------------------------

_define(
    "quantize_4bit(Tensor x, SymInt blocksize, str quant_type) -> (Tensor, Tensor)",
    lambda x, blocksize, quant_type: (
        x.new_empty(((x.numel() + 1) // 2, 1), dtype=torch.uint8),
        x.new_empty((_blocks(x.numel(), blocksize),), dtype=torch.float32),
    ),
)
_define(
    "dequantize_4bit(Tensor packed, Tensor absmax, SymInt blocksize, str quant_type, SymInt[] shape, "
    "ScalarType dtype) -> Tensor",
    lambda packed, absmax, blocksize, quant_type, shape, dtype: packed.new_empty(tuple(shape), dtype=dtype),
)
# Double quantization: absmax[b] = nested_code[absmax_codes[b]] * nested_absmax[b // nested_blocksize]
# + offset, decoded in the same pass as the 4-bit codes.
_NESTED_ARGS = (
    "Tensor packed, Tensor absmax_codes, Tensor nested_absmax, Tensor nested_code, Tensor offset, "
    "SymInt blocksize, SymInt nested_blocksize, str quant_type"
)
_define(
    f"dequantize_4bit_nested({_NESTED_ARGS}, SymInt[] shape, ScalarType dtype) -> Tensor",
    lambda packed, *args: packed.new_empty(tuple(args[-2]), dtype=args[-1]),
)

# --- 8-bit blockwise quantization (sorted 256-value map) -----------------------------------

_define(
    "quantize_blockwise(Tensor x, Tensor code, SymInt blocksize) -> (Tensor, Tensor)",
    lambda x, code, blocksize: (
        x.new_empty(x.shape, dtype=torch.uint8),
        x.new_empty((_blocks(x.numel(), blocksize),), dtype=torch.float32),
    ),
)
_define(
    "dequantize_blockwise(Tensor q, Tensor absmax, Tensor code, SymInt blocksize, ScalarType dtype) -> Tensor",
    lambda q, absmax, code, blocksize, dtype: q.new_empty(q.shape, dtype=dtype),
)

# --- out= variants of the dequantize ops: write into a caller's tensor ------------------
# On CPU a fresh 32 MiB output costs more in first-touch page faults than the decode
# itself (4096x4096 bf16: torch.empty + fill 8.1 ms vs fill of a reused tensor 0.66 ms),
# so a caller that dequantizes repeatedly reuses one buffer. (MADV_HUGEPAGE on fresh
# outputs was tried: 3.1 ms when it works, but with the kernel's "defrag=madvise" setting
# a fault may compact memory synchronously, and medians of 53 ms were seen.) The result's
# shape and dtype are out's. These are compositions, not backend kernels: each calls the
# chosen backend's dequantize kernel with ``out=``; a non-contiguous ``out`` goes through
# a temporary because the kernels write dense memory.


def _into(out: torch.Tensor, run) -> None:
    if out.is_contiguous():
        run(out)
    else:
        out.copy_(run(None))


def _dequantize_4bit_out(packed, absmax, blocksize, quant_type, out):
    kernel = kernel_for("dequantize_4bit", packed.device)
    _into(out, lambda t: kernel(packed, absmax, blocksize, quant_type, list(out.shape), out.dtype, out=t))


def _dequantize_4bit_nested_out(packed, absmax_codes, nested_absmax, nested_code, offset, bs, nbs, qt, out):
    kernel = kernel_for("dequantize_4bit_nested", packed.device)
    nested = (absmax_codes, nested_absmax, nested_code, offset, bs, nbs, qt)
    _into(out, lambda t: kernel(packed, *nested, list(out.shape), out.dtype, out=t))


def _dequantize_blockwise_out(q, absmax, code, blocksize, out):
    kernel = kernel_for("dequantize_blockwise", q.device)
    _into(out, lambda t: kernel(q, absmax, code, blocksize, out.dtype, out=t))


for _name, _impl, _mutated in (
    (
        "dequantize_4bit_out(Tensor packed, Tensor absmax, SymInt blocksize, str quant_type, Tensor(a!) out) -> ()",
        _dequantize_4bit_out,
        4,
    ),
    (f"dequantize_4bit_nested_out({_NESTED_ARGS}, Tensor(a!) out) -> ()", _dequantize_4bit_nested_out, 8),
    (
        "dequantize_blockwise_out(Tensor q, Tensor absmax, Tensor code, SymInt blocksize, Tensor(a!) out) -> ()",
        _dequantize_blockwise_out,
        4,
    ),
):
    _op = _define(_name, _none)
    _check = getattr(_checks, f"op_{_op}")  # the router's check, for this composition

    def _composed(*args, _impl=_impl, _i=_mutated, _check=_check):
        _check(*args)
        _impl(*args)
        torch.autograd.graph.increment_version(args[_i])

    for _key in DISPATCH_KEYS.values():
        _lib.impl(_op, _composed, _key)

# --- Fused 4-bit dequant + LoRA linear (QLoRA) -------------------------------------------
# W [out_features, in_features] travels packed with its state: absmax (fp32, or uint8
# codes when nested_absmax/nested_code/offset are given: double quantization).
#   y  = out_scale * (x @ W^T + bias + (scaling * (x @ A^T) * rank_scale) @ B^T)
# out_scale (IA3) scales the whole output of the adapted layer, bias included, as PEFT's
# IA3 scales its base layer's output; rank_scale is AdaLoRA's per-rank scale.
# qlora_linear: x [M, K], A [r, K], B [N, r] -> (y [M, N], xa = x @ A^T [M, r] or empty),
# both in x's dtype. qlora_linear_backward: (dx, dA, dB, dbias), those not asked for
# empty; xa is the forward's x @ A^T (needed only for dB). No gradient for W is formed.
# lora_A and lora_B are optional (both None: no adapter): every backend then skips the
# LoRA terms entirely (no zero-rank adapter is built; Triton compiles them out), so
#   y = out_scale * (x @ W^T + bias),  xa empty,  dA/dB never asked for.

_QUANT_ARGS = (
    "Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, "
    "int blocksize, int nested_blocksize, str quant_type, int out_features, int in_features"
)
_define(
    f"qlora_linear(Tensor x, {_QUANT_ARGS}, Tensor? lora_A, Tensor? lora_B, float scaling, Tensor? bias, "
    "Tensor? rank_scale, Tensor? out_scale, bool return_xa) -> (Tensor, Tensor)",
    lambda x, *a: (
        x.new_empty((x.shape[0], a[8])),
        x.new_empty((x.shape[0], a[10].shape[0]) if a[-1] and a[10] is not None else (0,)),
    ),
)


def _qlora_linear_backward_fake(grad_y, x, *a):
    lora_a, lora_b = a[10], a[11]
    need_dx, need_da, need_db, need_dbias = a[-4:]
    return (
        x.new_empty(x.shape if need_dx else (0,)),
        x.new_empty(lora_a.shape, dtype=lora_a.dtype)
        if need_da and lora_a is not None
        else x.new_empty((0,)),
        x.new_empty(lora_b.shape, dtype=lora_b.dtype)
        if need_db and lora_b is not None
        else x.new_empty((0,)),
        grad_y.new_empty((a[8],) if need_dbias else (0,)),
    )


_define(
    f"qlora_linear_backward(Tensor grad_y, Tensor x, {_QUANT_ARGS}, Tensor? lora_A, Tensor? lora_B, Tensor xa, "
    "float scaling, Tensor? rank_scale, Tensor? out_scale, bool need_dx, bool need_dA, bool need_dB, "
    "bool need_dbias) -> (Tensor, Tensor, Tensor, Tensor)",
    _qlora_linear_backward_fake,
)

# --- 4-bit GEMV for decoding --------------------------------------------------------------
# y = x @ W^T for a few rows of x (1 <= M <= GEMV_MAX_ROWS: token-by-token decoding), W
# packed as in qlora_linear. Accumulates in fp32 and rounds once to x's dtype.

_define(
    "gemv_4bit(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
    "Tensor? offset, SymInt blocksize, SymInt nested_blocksize, str quant_type, SymInt out_features, "
    "SymInt in_features) -> Tensor",
    lambda x, *a: x.new_empty((x.shape[0], a[-2])),
)

# --- Optimizer steps ---------------------------------------------------------------------
# Fused in-place updates of one parameter and its state (csrc/include/qpeft/optim.h holds
# the per-element math every backend shares). grad is read in any layout; param and the
# state tensors must be contiguous. 8-bit state: uint8 codes (one per element) into the
# sorted 256-value maps (qpeft._formats.dynamic_map: signed for the first moment, unsigned
# for the second) and fp32 absmax per block of 256 elements. step is the count after this
# update (>= 1); the bias corrections are computed from it on the host. The multi-tensor
# ops update lists of parameters (one param group's worth) in one native call; steps[i]
# is the step count of params[i]. An empty list is a no-op. Unlike the ops above, the
# step ops check their tensors themselves (qpeft._checks, once per tensor, before any is
# updated): the optimizer step is their only caller and they are its boundary.

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

for _name, (_schema, _mutated) in _OPTIM_OPS.items():
    _define(f"{_name}({_schema}) -> ()", _none, _mutated)
    # a sparse gradient reaches no device key: route it to the kernel, whose check says
    # sparse gradients are unsupported (and empty lists to a no-op)
    route_other_keys(_name)
