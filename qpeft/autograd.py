"""autograd Functions over the registered ops (they call only ``torch.ops.qpeft.*``, or
on a plain CPU call the kernel the op routes to: ``_op``)."""

from __future__ import annotations

import contextlib

import torch

from . import _ops  # noqa: F401  (defines torch.ops.qpeft.*)
from ._dispatch import kernel_backend, kernel_for
from ._formats import FLOAT_DTYPES, GEMV_MAX_ROWS

__all__ = [
    "QLoRAFunction",
    "Linear4bitFunction",
    "layer_call",
    "linear_4bit_forward",
    "qlora_forward",
    "small_layer_plan",
]


# One shared instance: nullcontext is reusable, so a call outside autocast allocates nothing.
_NO_AUTOCAST = contextlib.nullcontext()


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, False for a device type autocast does not
    know (``meta``: a meta input gives a meta output, as ``F.linear`` does, not an error)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # "unknown device type for autocast"
        return False


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast disabled for ``device_type`` around the ops: a real ``torch.autocast`` context
    only when autocast is on there (entering one costs ~10 us, a tenth of a small layer's
    forward; docs/design.md, "Per-call overhead"), else a shared no-op."""
    if autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return _NO_AUTOCAST


_Tensor = torch.Tensor
_profiler = torch.autograd.profiler
_is_compiling = torch.compiler.is_compiling
_dispatch_stack = torch._C._len_torch_dispatch_stack
_functorch_active = torch._C._are_functorch_transforms_active
_jit_tracing = torch._C._get_tracing_state
_function_mode = torch._C._is_torch_function_mode_enabled


def _op(name: str, x: torch.Tensor):
    """``torch.ops.qpeft.<name>``, or on a plain CPU call the very kernel torch's dispatcher
    would route it to (``_dispatch.kernel_for``: the forced or default backend), called
    directly: boxing ~18 arguments through the dispatcher into the Python router costs
    ~10 us, a tenth of a small layer's forward (docs/design.md, "Per-call overhead").
    Only where nothing could observe the difference: not while a profiler records (it
    then shows the qpeft:: op as always), not under torch.compile / export or
    torch.jit.trace tracing, a TorchDispatchMode or TorchFunctionMode or a functorch
    transform, and only for a plain tensor x."""
    if (
        type(x) is _Tensor
        and x.is_cpu
        and not _profiler._is_profiler_enabled
        and not _is_compiling()
        and _dispatch_stack() == 0
        and not _functorch_active()
        and _jit_tracing() is None
        and not _function_mode()
    ):
        return kernel_for(name, "cpu")
    return getattr(torch.ops.qpeft, name)


def qlora_forward(
    x,
    lora_a,
    lora_b,
    bias,
    packed,
    absmax,
    nested_absmax,
    nested_code,
    offset,
    quant,
    scaling,
    rank_scale,
    out_scale,
    return_xa,
):
    """The forward of QLoRAFunction without an autograd node: (y [..., N], x2 [M, K], xa).
    ``functional.qlora_linear`` calls it directly when nothing needs a gradient."""
    blocksize, nested_blocksize, quant_type, n, k = quant
    dev = x.device.type
    if autocast_enabled(dev):
        x = x.to(torch.get_autocast_dtype(dev))
        ctx = torch.autocast(dev, enabled=False)
    else:
        ctx = _NO_AUTOCAST
    flat = x.dim() == 2  # x already [M, K]: no reshapes (each costs ~3 us on a small layer)
    x2 = x if flat else x.reshape(-1, k)
    with ctx:
        y, xa = _op("qlora_linear", x2)(
            x2,
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
        )
    return (y if flat else y.reshape(*x.shape[:-1], n)), x2, xa


class QLoRAFunction(torch.autograd.Function):
    """y = out_scale * (x @ dequant(W)^T + bias + (scaling * (x @ A^T) * rank_scale) @ B^T).

    ``forward(x, lora_A, lora_B, bias, frozen) -> (y, xa)`` with ``frozen = (packed, absmax,
    nested_absmax, nested_code, offset, quant, scaling, rank_scale, out_scale, return_xa)`` and
    ``quant = (blocksize, nested_blocksize, quant_type, out_features, in_features)``; x
    is [M, K] and y [M, N]: ``functional.qlora_linear`` reshapes (and casts for autocast)
    outside ``apply``, so y is no view made inside the Function (in-place ops on it work,
    as Falcon's ``mlp_output += attention_output``) and the saved x keeps its graph for a
    backward with ``create_graph=True``. Gradients flow to x, lora_A, lora_B and bias. Saved for the backward: x, A, B, the packed
    weight and its quantization state (never a dequantized W) and xa = x @ A^T (only
    when B needs a gradient). rank_scale and out_scale are constants here.

    Autocast: inside an autocast region x is cast to the region's dtype, as autocast
    casts the input of ``F.linear``, so y comes out in that dtype; the ops themselves
    then run with autocast off, forward and backward. Their kernels choose their
    own compute precision (fp32 accumulation; on CPU fp32 throughout, since the
    reference's fp32 ``F.linear`` would otherwise be autocast to bf16, which CPUs
    without bf16 dot products run about 5x slower than fp32). Gradients flow back
    through the cast, so x.grad has x's original dtype.
    """

    # torch.func (grad, vjp, jacrev, vmap, functional_call under them) runs an
    # autograd.Function only in this form (forward without ctx, setup_context) and vmaps
    # the forward and backward themselves (the qpeft ops' batching fallback: correct, a loop)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, lora_a, lora_b, bias, frozen):
        # frozen = (packed, absmax, nested_absmax, nested_code, offset, quant, scaling,
        # rank_scale, out_scale, return_xa): what gets no gradient, one argument instead of
        # ten. Function.apply works per argument: a no-op Function of 13 arguments cost
        # 21.9 us per apply, of 5 arguments 11.8 us (AMX Xeon VM; docs/design.md, "Per-call
        # overhead"). The frozen tensors are still saved with save_for_backward (their
        # version counters checked in the backward). return_xa: whether lora_B needs a
        # gradient (its backward reads xa = x @ A^T, a by-product of the forward kernels),
        # decided by the caller since this forward has no ctx. Returns (y, xa), xa not
        # differentiable (empty without return_xa).
        (
            packed,
            absmax,
            nested_absmax,
            nested_code,
            offset,
            quant,
            scaling,
            rank_scale,
            out_scale,
            return_xa,
        ) = frozen
        y, _, xa = qlora_forward(
            x,
            lora_a,
            lora_b,
            bias,
            packed,
            absmax,
            nested_absmax,
            nested_code,
            offset,
            quant,
            scaling,
            rank_scale,
            out_scale,
            return_xa,
        )
        return y, xa

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, lora_a, lora_b, bias, frozen = inputs
        packed, absmax, nested_absmax, nested_code, offset, quant, scaling, rank_scale, out_scale, _ = frozen
        xa = output[1]
        ctx.mark_non_differentiable(xa)
        # x is [M, K] in the dtype the ops ran in (functional._rows casts it for autocast)
        ctx.save_for_backward(
            x, lora_a, lora_b, packed, absmax, nested_absmax, nested_code, offset, xa, rank_scale, out_scale
        )
        ctx.quant = quant
        ctx.scaling = scaling
        ctx.bias_dtype = bias.dtype if bias is not None else None

    @staticmethod
    def backward(ctx, grad_y, _grad_xa):
        x2, lora_a, lora_b, packed, absmax, nested_absmax, nested_code, offset, xa, rank_scale, out_scale = (
            ctx.saved_tensors
        )
        blocksize, nested_blocksize, quant_type, n, k = ctx.quant
        need_dx, need_da, need_db, need_dbias = ctx.needs_input_grad[:4]
        with _autocast_off(x2.device.type):  # CPU backward runs on the caller's thread
            if torch.is_grad_enabled():  # create_graph=True: the op's gradients would be constants
                weight = (packed, absmax, nested_absmax, nested_code, offset)
                needs = (need_dx, need_da, need_db, need_dbias)
                dx, da, db, dbias = graph_backward(
                    grad_y, x2, lora_a, lora_b, weight, ctx.quant, ctx.scaling, rank_scale, out_scale, needs
                )
                return dx, da, db, dbias.to(ctx.bias_dtype) if need_dbias else None, None
            dx, da, db, dbias = _op("qlora_linear_backward", x2)(
                grad_y.reshape(-1, n),
                x2,
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
                ctx.scaling,
                rank_scale,
                out_scale,
                need_dx,
                need_da,
                need_db,
                need_dbias,
            )
        return (
            dx if need_dx else None,
            da if need_da else None,
            db if need_db else None,
            dbias.to(ctx.bias_dtype) if need_dbias else None,
            None,
        )


class EagerQLoRAFunction(torch.autograd.Function):
    """QLoRAFunction in the ctx-first form, for every call outside a torch.func transform:
    ``Function.apply`` binds a setup_context-form forward's arguments with
    ``inspect.signature`` on every call, which added 40-60 us to a small layer's forward +
    backward on its Python path (64x64, M = 16, r = 8, 1 thread, AVX2 EPYC VM, min of 7 x
    300 calls: 377-401 us against 319-341 us in the ctx-first form). The same forward, saved
    tensors and backward."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, bias, frozen):
        out = QLoRAFunction.forward(x, lora_a, lora_b, bias, frozen)
        QLoRAFunction.setup_context(ctx, (x, lora_a, lora_b, bias, frozen), out)
        return out

    @staticmethod
    def backward(ctx, grad_y, grad_xa):
        return QLoRAFunction.backward(ctx, grad_y, grad_xa)


class TracedQLoRAFunction(torch.autograd.Function):
    """QLoRAFunction with the frozen tensors as arguments of their own, for
    ``torch.jit.trace``: its tracer cannot save for the backward a tensor that is no
    argument of the Function and was made during the trace (the quantization state's
    offset view), and failed with a bare C++ ``unordered_map::at``. The same forward,
    saved tensors and backward; only traces take it (the per-argument cost of ``apply``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x,
        lora_a,
        lora_b,
        bias,
        packed,
        absmax,
        nested_absmax,
        nested_code,
        offset,
        rank_scale,
        out_scale,
        consts,
    ):
        return QLoRAFunction.forward(
            x,
            lora_a,
            lora_b,
            bias,
            _frozen_of(packed, absmax, nested_absmax, nested_code, offset, rank_scale, out_scale, consts),
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        frozen = _frozen_of(*inputs[4:])
        QLoRAFunction.setup_context(ctx, (*inputs[:4], frozen), output)

    @staticmethod
    def backward(ctx, grad_y, grad_xa):
        return (*QLoRAFunction.backward(ctx, grad_y, grad_xa)[:4], *([None] * 8))


def _frozen_of(packed, absmax, nested_absmax, nested_code, offset, rank_scale, out_scale, consts):
    """QLoRAFunction's ``frozen`` from TracedQLoRAFunction's arguments (consts = (quant,
    scaling, return_xa))."""
    quant, scaling, return_xa = consts
    return (
        packed,
        absmax,
        nested_absmax,
        nested_code,
        offset,
        quant,
        scaling,
        rank_scale,
        out_scale,
        return_xa,
    )


def graph_backward(grad_y, x2, lora_a, lora_b, weight, quant, scaling, rank_scale, out_scale, needs):
    """(dx [M, K], dA, dB, dbias) of ``qlora_linear`` (None where ``needs`` asks for none) in
    differentiable torch ops, for a backward that records a graph (``create_graph=True``:
    gradient penalties, Hessian-vector products), where ``qlora_linear_backward``'s kernels
    would return constants and so silently drop every second-order term. The reference's
    formulas (``backends/default/qlora.py``: fp32, fp64 for fp64 x; within the ops'
    tolerance of their results) on W dequantized whole from ``weight`` = (packed, absmax,
    nested_absmax, nested_code, offset), with xa = x A^T recomputed from x and A so that dB
    depends on them. Without an adapter (lora_a None) only dx and dbias; x2 may then be a
    stand-in of x's shape and dtype."""
    from .backends.default.qlora import backward_from, dequantize_weight

    blocksize, nested_blocksize, quant_type, n, k = quant
    w = dequantize_weight(*weight, blocksize, nested_blocksize, quant_type, n, k)
    xa = None
    if needs[2]:
        cdt = torch.float64 if x2.dtype == torch.float64 else torch.float32
        xa = torch.nn.functional.linear(x2.to(cdt), lora_a.to(cdt))

    def add_dy_w(dy, acc):  # acc += dy @ W, recorded by autograd
        acc.addmm_(dy, w.to(acc.dtype))

    grads = backward_from(
        add_dy_w, grad_y.reshape(-1, n), x2, lora_a, lora_b, xa, scaling, rank_scale, out_scale, *needs
    )
    return tuple(g if need else None for g, need in zip(grads, needs))


def layer_graph_backward(
    grad_y,
    x2,
    lora_a,
    lora_b,
    packed,
    absmax,
    nested_absmax,
    nested_code,
    offset,
    blocksize,
    nested_blocksize,
    quant_type_id,
    n,
    k,
    scaling,
    *needs,
):
    """``graph_backward`` for the autograd nodes of ``qpeft._C_layer`` (their calls have no
    rank_scale or out_scale; the quant type comes as its id): they call it when the backward
    records a graph, so the C++ path's gradients are differentiable as the Python path's."""
    from ._formats import QUANT_TYPE_IDS

    quant_type = next(name for name, i in QUANT_TYPE_IDS.items() if i == quant_type_id)
    weight = (packed, absmax, nested_absmax, nested_code, offset)
    quant = (blocksize, nested_blocksize, quant_type, n, k)
    return graph_backward(grad_y, x2, lora_a, lora_b, weight, quant, scaling, None, None, needs)


def _use_gemv(x2: torch.Tensor) -> bool:
    """Decode-sized x (1 <= M <= GEMV_MAX_ROWS, fp32/fp16/bf16) takes ``qpeft::gemv_4bit``
    wherever a kernel other than the whole-W reference serves it (or the reference serves
    the matmul path too); else the 4-bit matmul path (docs/design.md, "Decode path")."""
    if not (1 <= x2.shape[0] <= GEMV_MAX_ROWS and x2.dtype in FLOAT_DTYPES):
        return False
    return _gemv_serves(x2.device.type)


def _gemv_serves(device_type: str) -> bool:
    """Whether the GEMV path serves decode-sized x on ``device_type`` (see ``_use_gemv``)."""
    gemv = kernel_backend("gemv_4bit", device_type)
    if gemv is None:
        return False
    return gemv != "default" or kernel_backend("qlora_linear", device_type) in ("default", None)


# torch.compile cannot trace the ContextVar read of use_backend (kernel_backend): under it
# the choice is a constant taken when the graph is traced (under the backend in force then;
# the ops in the graph still route per call), so fullgraph=True traces the GEMV's rows too.
# The mark torch.compiler.assume_constant_result sets, set here without it: it would import
# torch._dynamo (and triton) with qpeft (tests/test_lean_import.py; the fullgraph tests of
# tests/test_autograd_defects.py fail if torch stops reading this mark).
_gemv_serves._dynamo_marked_constant = True


def linear_4bit_forward(x2, bias, packed, absmax, nested_absmax, nested_code, offset, quant):
    """y = x2 @ dequant(W)^T + bias for x2 [M, K] (no autograd): the GEMV at M <= 8, else
    the 4-bit matmul (``qlora_linear`` without an adapter). Both accumulate in fp32 and round
    once to x2's dtype: with a bias the GEMV runs on fp32 x (the same values, so the same
    products) and the bias is added in fp32 before the one rounding, as the matmul path does."""
    blocksize, nested_blocksize, quant_type, n, k = quant
    if _use_gemv(x2):
        xg = x2 if bias is None else x2.float()
        y = _op("gemv_4bit", xg)(
            xg,
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
        return y if bias is None else y.add_(bias.float()).to(x2.dtype)
    y, _ = _op("qlora_linear", x2)(
        x2,
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
        None,
        None,
        0.0,
        bias,
        None,
        None,
        False,
    )
    return y


class Linear4bitFunction(torch.autograd.Function):
    """y = x @ dequant(W)^T + bias, W frozen in 4 bits: ``qpeft.functional.linear_4bit``.

    ``forward(x, bias, packed, absmax, nested_absmax, nested_code, offset, quant)`` with
    ``quant`` as in QLoRAFunction, x [M, K] and y [M, N] (``functional.linear_4bit``
    reshapes and casts for autocast outside ``apply``, as for QLoRAFunction). The forward is ``linear_4bit_forward`` (GEMV at M <= 8);
    the backward is ``qlora_linear_backward`` without an adapter: dx = dy @ dequant(W)
    (recomputed from the packed weight), dbias = sum(dy). x itself is not saved (the
    no-adapter backward reads only its shape and dtype), so a frozen layer keeps no
    activation alive for the backward. Autocast as in QLoRAFunction.
    """

    generate_vmap_rule = True  # torch.func support, as QLoRAFunction's

    @staticmethod
    def forward(x, bias, packed, absmax, nested_absmax, nested_code, offset, quant):
        with _autocast_off(x.device.type):
            return linear_4bit_forward(x, bias, packed, absmax, nested_absmax, nested_code, offset, quant)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, bias, packed, absmax, nested_absmax, nested_code, offset, quant = inputs
        ctx.save_for_backward(packed, absmax, nested_absmax, nested_code, offset)
        ctx.quant = quant
        ctx.x_meta = (x.shape, x.dtype)
        ctx.bias_dtype = bias.dtype if bias is not None else None

    @staticmethod
    def backward(ctx, grad_y):
        packed, absmax, nested_absmax, nested_code, offset = ctx.saved_tensors
        blocksize, nested_blocksize, quant_type, n, k = ctx.quant
        x_shape, x_dtype = ctx.x_meta
        need_dx, need_dbias = ctx.needs_input_grad[:2]
        g2 = grad_y.reshape(-1, n)
        m = g2.shape[0]
        # the op reads only x's shape and dtype here: a zero-stride stand-in costs no memory
        x_like = torch.empty((), dtype=x_dtype, device=grad_y.device).expand(m, k)
        with _autocast_off(grad_y.device.type):
            if torch.is_grad_enabled():  # create_graph=True: the op's gradients would be constants
                weight = (packed, absmax, nested_absmax, nested_code, offset)
                needs = (need_dx, False, False, need_dbias)
                dx, _, _, dbias = graph_backward(
                    g2, x_like, None, None, weight, ctx.quant, 0.0, None, None, needs
                )
                return (
                    dx.reshape(x_shape) if need_dx else None,
                    dbias.to(ctx.bias_dtype) if need_dbias else None,
                    *([None] * 6),
                )
            dx, _, _, dbias = _op("qlora_linear_backward", g2)(
                g2,
                x_like,
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
                None,
                None,
                g2.new_empty((0,)),
                0.0,
                None,
                None,
                need_dx,
                False,
                False,
                need_dbias,
            )
        return (
            dx.reshape(x_shape) if need_dx else None,
            dbias.to(ctx.bias_dtype) if need_dbias else None,
            *([None] * 6),
        )


class EagerLinear4bitFunction(torch.autograd.Function):
    """Linear4bitFunction in the ctx-first form, for calls outside torch.func (see
    EagerQLoRAFunction: no per-call ``inspect.signature`` binding)."""

    @staticmethod
    def forward(ctx, x, bias, packed, absmax, nested_absmax, nested_code, offset, quant):
        y = Linear4bitFunction.forward(x, bias, packed, absmax, nested_absmax, nested_code, offset, quant)
        Linear4bitFunction.setup_context(
            ctx, (x, bias, packed, absmax, nested_absmax, nested_code, offset, quant), y
        )
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return Linear4bitFunction.backward(ctx, grad_y)


# --- a small layer's whole call in C++ ----------------------------------------------------
#
# qpeft._C_layer (csrc/torch/small_layer.cpp; docs/design.md, "Per-call overhead") serves a
# plain CPU call of a small fp32 QLoRALinear in one C++ call: the checks, the kernel and a
# C++ autograd node (torch.autograd.Function.apply alone costs 12-23 us, the goal for the
# whole call is 25). It runs the kernels the Python path runs for that call
# (qlora_small_forward / qlora_small_backward, dbias by torch's sum), so it gives the same
# bits. It is the one module linked against libtorch, built for one torch version: used
# only under that version, else (or when not built) every call takes the Python path.

_layer = None  # qpeft._C_layer, initialized; False: not available in this process


def _load_layer():
    try:
        from . import _C_layer
    except ImportError:
        return False
    if getattr(_C_layer, "torch_version", None) != torch.__version__:
        return False  # built for another torch: its libtorch ABI is not this one's
    from . import _dispatch, _native

    try:
        abi = _native.cpu_module()._small_layer_abi
    except (ImportError, AttributeError):
        return False
    from .backends.cpu import qlora as cpu_qlora

    try:
        _C_layer.init(abi, torch.autograd.profiler, _dispatch._forced, cpu_qlora, layer_graph_backward)
    except TypeError:
        return False  # built from older sources (another init): rebuild qpeft to use it
    return _C_layer


def layer_module():
    """qpeft._C_layer ready to call, or None where it is not built or was built for another torch."""
    global _layer
    if _layer is None:
        _layer = _load_layer()
    return _layer or None


def linear_call(plan: tuple, module, x):
    """``qpeft._C_layer.linear_call``: a ``Linear4bit``'s y, None or NotImplemented, as
    ``layer_call``."""
    return _layer.linear_call(plan, module, x)


def layer_call(plan: tuple, module, x):
    """``qpeft._C_layer.call``: y, None (the plan holds but this call takes the Python path:
    x's dtype, device, layout or rows, autocast, a profiler, a tracer, a mode or transform,
    a forced backend) or NotImplemented (the plan is stale: drop it). Bound at the first
    plan, so a process without the module never calls it."""
    return _layer.call(plan, module, x)


def _plan_common(owner, guards: tuple, packed, state, bias):
    """What every layer plan holds: (n, k, absmax, nested_absmax, nested_code, offset,
    quant, guards + the quantization state's fields), or None where no plan can serve: no
    module, not a plain CPU uint8 weight of nf4/fp4 codes with a 2-D shape, an empty W, a
    bias that is not fp32 on the CPU, an offset that would be a cast copy, or a guard that
    does not hold now."""
    mod = layer_module()
    if mod is None or type(packed) is not _Tensor:
        return None
    from .functional import _quant_args

    shape = state.shape
    if shape is None or len(shape) != 2 or state.quant_type not in ("nf4", "fp4"):
        return None
    n, k = int(shape[0]), int(shape[1])
    if n * k == 0 or packed.dtype != torch.uint8 or not packed.is_cpu:
        return None
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_cpu):
        return None
    absmax, na, nc, off, quant = _quant_args(state)
    st2 = state.state2
    if st2 is not None:
        if state.offset.dtype != torch.float32:
            return None  # the offset argument would be a cast copy (functional._state_args)
        # the plan holds the offset itself, not _quant_args' [1] view of it: as for absmax, a
        # `.data =` swap of its storage is then read by the next call (a view would keep the
        # old one), and a swap to another dtype or size fails the call's check (stale plan)
        off = state.offset
    fields = [
        (state, key, getattr(state, key))
        for key in ("absmax", "offset", "state2", "shape", "blocksize", "quant_type")
    ]
    if st2 is not None:
        fields += [(st2, key, getattr(st2, key)) for key in ("absmax", "code", "blocksize")]
    all_guards = tuple(guards) + tuple(item for triple in fields for item in triple)
    for i in range(0, len(all_guards), 3):
        container, key, expected = all_guards[i : i + 3]
        if container is None:
            container = owner
        d = container if type(container) is dict else getattr(container, "__dict__", None)
        if d is None or d.get(key, _MISSING) is not expected:
            return None
    if not all(t is None or t.is_cpu for t in (absmax, na, nc, off)):
        return None
    return n, k, absmax, na, nc, off, quant, all_guards


def linear_plan(owner, guards: tuple, packed, state, bias):
    """The plan ``qpeft._C_layer.linear_call`` serves a ``Linear4bit``'s inference calls
    from (x needing no gradient, at most GEMV_MAX_ROWS rows: the 4-bit GEMV and the bias),
    or None where it cannot (see ``_plan_common``; also when the GEMV is not the CPU
    kernel's). Guards and checks as ``small_layer_plan``'s."""
    from ._formats import GEMV_MAX_ROWS, QUANT_TYPE_IDS

    if kernel_backend("gemv_4bit", "cpu") != "cpu":
        return None
    common = _plan_common(owner, guards, packed, state, bias)
    if common is None:
        return None
    n, k, absmax, na, nc, off, quant, all_guards = common
    blocksize, nested_blocksize, quant_type = quant[0], quant[1], quant[2]
    ints = (
        n,
        k,
        int(blocksize),
        int(nested_blocksize),
        QUANT_TYPE_IDS[quant_type],
        packed.numel(),
        absmax.numel(),
        0 if na is None else na.numel(),
        GEMV_MAX_ROWS,
    )
    return (id(owner), all_guards, (packed, absmax, na, nc, off, bias), ints)


def small_layer_plan(owner, guards: tuple, packed, state, lora_a, lora_b, bias, scaling):
    """The plan ``qpeft._C_layer.call`` serves ``owner``'s calls from, or None where it
    cannot: no module, an empty weight, or anything other than fp32 CPU adapters and bias
    and a plain packed uint8 weight. Each call then takes the route the Python path would
    take for its rows (the small kernels, the fused fp32 GEMM, W's decoded panels) or,
    where that is none of them (the GEMV's rows, fp32 x computing in bf16), the full path. ``guards`` is a flat tuple
    of (container, key, expected) triples, ``container`` a dict, an object whose instance
    ``__dict__`` is read, or None for ``owner`` itself (the plan lives in ``owner``'s
    ``__dict__``: holding no reference to it, it makes no reference cycle): every call
    checks ``container[key] is expected`` for each, and this adds the quantization
    state's fields. A guard that does not hold now gives None.
    The caller has just served a call with these objects on the full path (so every
    argument check passed); each later call re-checks in C++ what a check could see
    change: the guards' identities, and each held tensor's dtype, size, layout, device."""
    from ._formats import GEMV_MAX_ROWS, QUANT_TYPE_IDS
    from .backends.cpu import f32gemm
    from .backends.cpu import qlora as cpu_qlora

    f32 = torch.float32
    if not (
        lora_a is not None
        and lora_b is not None
        and lora_a.dtype == f32
        and lora_b.dtype == f32
        and lora_a.is_cpu
        and lora_b.is_cpu
    ):
        return None
    if (
        kernel_backend("qlora_linear", "cpu") != "cpu"
        or kernel_backend("qlora_linear_backward", "cpu") != "cpu"
    ):
        return None
    common = _plan_common(owner, guards, packed, state, bias)
    if common is None:
        return None
    n, k, absmax, na, nc, off, quant, all_guards = common
    blocksize, nested_blocksize, quant_type = quant[0], quant[1], quant[2]
    nested_len = 0 if na is None else na.numel()
    ints = (
        n,
        k,
        int(lora_a.shape[0]),
        int(blocksize),
        int(nested_blocksize),
        QUANT_TYPE_IDS[quant_type],
        cpu_qlora.SMALL_MAX_ROWS,
        cpu_qlora.SMALL_MAX_WORK,
        cpu_qlora.SMALL_BACKWARD_MAX_ROWS,
        cpu_qlora.SMALL_BACKWARD_MAX_WORK,
        packed.numel(),  # as the check passed them: each call requires these exact sizes
        absmax.numel(),
        nested_len,
        cpu_qlora.SMALL_MAX_ELEMS,
        GEMV_MAX_ROWS,
        f32gemm.PANELS_MIN_ROWS,
        f32gemm.PANELS_MIN_WEIGHTS,
        cpu_qlora.MERGE_RATIO,
        cpu_qlora._panel_rows(n, k, int(blocksize), int(nested_blocksize) if na is not None else None),
        2 * cpu_qlora.panel_elems(4),
        # PANEL_ELEMS as planned: the C++ call finds the plan stale when tests change it
        -1 if cpu_qlora.PANEL_ELEMS is None else int(cpu_qlora.PANEL_ELEMS),
        cpu_qlora.FP32_BF16_MIN_WORK,
        f32gemm.MAX_EXTRA_COLS,
    )
    if lora_a.dim() != 2 or tuple(lora_a.shape) != (ints[2], k) or tuple(lora_b.shape) != (n, ints[2]):
        return None
    return (id(owner), all_guards, (packed, absmax, na, nc, off, lora_a, lora_b, bias), ints, float(scaling))


_MISSING = object()
