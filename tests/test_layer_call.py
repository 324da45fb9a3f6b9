"""A QLoRALinear's call served by qpeft._C_layer (docs/design.md, "Per-call overhead"): a
small layer's through the small kernels, a larger call's through the fused fp32 GEMM (at
the avx2 level, where the Python path takes it) or through W's decoded panels (the other
levels, and large M and W at avx2).

The fast path must give the same bits as the full Python path (forward, dx, dA, dB,
dbias), keep torch's autograd semantics (retain_graph, autograd.grad, create_graph,
in-place modification checks, no_grad, inference_mode), and hand every call it does not
serve to the full path: each excluded situation is checked to reach
``functional.qlora_linear``. The full-path reference runs under ``qpeft.use_backend("cpu")``
(a forced backend is one of the exclusions), so it runs the same CPU kernels.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import qpeft
import qpeft.functional as qf
from qpeft import autograd as qautograd
from qpeft.nn import QLoRALinear


def _layer(n=64, k=64, r=8, bias=True, quant_type="nf4", double_quant=True, blocksize=64, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) / k**0.5)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
    q = QLoRALinear.from_linear(
        lin, r=r, alpha=16, quant_type=quant_type, double_quant=double_quant, blocksize=blocksize, **kw
    )
    with torch.no_grad():
        q.lora_B.copy_(torch.randn(n, r, generator=g) * 0.1)
    return q


@pytest.fixture
def full_path_calls(monkeypatch):
    """Counts the calls that reach the full path's ops (the fused op; dropout's base term)."""
    calls = []

    def counted(real):
        def counting(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        return counting

    monkeypatch.setattr(qf, "qlora_linear", counted(qf.qlora_linear))
    monkeypatch.setattr(qf, "linear_4bit", counted(qf.linear_4bit))
    return calls


def _served_fast(q, x) -> bool:
    """Warm the plan with one call, then whether the next call is served by _C_layer."""
    q(x)
    return q._fast_plan is not None and qautograd.layer_call(q._fast_plan, q, x) not in (None, NotImplemented)


def _run(q, x, dy, grad_x=True):
    for p in q.parameters():
        p.grad = None
    xg = x.clone().requires_grad_(grad_x)
    y = q(xg)
    y.backward(dy)
    grads = [xg.grad] + [None if p is None else p.grad for p in (q.lora_A, q.lora_B, q.bias)]
    return y.detach(), grads, y.grad_fn


def test_module_is_built_for_this_torch():
    mod = qautograd.layer_module()
    assert mod is not None, "qpeft._C_layer is not built (or was built for another torch)"
    assert mod.torch_version == torch.__version__


LAYERS = [
    dict(n=64, k=64),
    dict(n=24, k=40, blocksize=32, quant_type="fp4"),  # odd sizes, partial block rows
    dict(n=7, k=40, blocksize=32, double_quant=False, bias=False),
    dict(n=33, k=64, r=3, train_bias=True),  # dbias through the fast path
    dict(n=128, k=128),
]


@pytest.mark.parametrize("spec", LAYERS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
@pytest.mark.parametrize("lead", [(1,), (5,), (16,), (2, 3)], ids=lambda s: "x".join(map(str, s)))
def test_same_bits_as_the_full_path(spec, lead, full_path_calls):
    q = _layer(**spec)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, q.in_features, generator=g)
    dy = torch.randn(*lead, q.out_features, generator=g)
    assert _served_fast(q, x)
    with qpeft.use_backend("cpu"):  # the full path, the same CPU kernels
        y_full, g_full, fn_full = _run(q, x, dy)
    before = len(full_path_calls)
    y_fast, g_fast, fn_fast = _run(q, x, dy)
    assert len(full_path_calls) == before, "the fast path did not serve the call"
    assert "SmallQLoRA" in fn_fast.name() and "SmallQLoRA" not in fn_full.name()
    assert y_fast.shape == y_full.shape == (*lead, q.out_features)
    assert torch.equal(y_fast, y_full)
    for a, b in zip(g_fast, g_full):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a, b)
    # no_grad, inference_mode and frozen adapters: no node, the same values
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            y = q(x)
        assert y.grad_fn is None and torch.equal(y, y_full)
    with torch.inference_mode():
        assert q(x).is_inference()
    # only x needs a gradient; only B does
    q.lora_A.requires_grad_(False)
    q.lora_B.requires_grad_(False)
    if q.bias is not None:
        q.bias.requires_grad_(False)
    xg = x.clone().requires_grad_()
    (dx,) = torch.autograd.grad(q(xg), xg, dy)
    with qpeft.use_backend("cpu"):
        (dx_full,) = torch.autograd.grad(q(xg), xg, dy)
    assert torch.equal(dx, dx_full)
    q.lora_B.requires_grad_(True)
    (db,) = torch.autograd.grad(q(x), q.lora_B, dy)
    with qpeft.use_backend("cpu"):
        (db_full,) = torch.autograd.grad(q(x), q.lora_B, dy)
    assert torch.equal(db, db_full)


def test_autograd_semantics_as_before():
    q = _layer()
    x = torch.randn(4, 64, requires_grad=True)
    dy = torch.randn(4, 64)
    assert _served_fast(q, x.detach())
    results = {}
    for name, ctx in (("fast", torch.enable_grad), ("full", lambda: qpeft.use_backend("cpu"))):
        with ctx():
            y = q(x)
            g1 = torch.autograd.grad(y, (x, q.lora_A), dy, retain_graph=True)
            g2 = torch.autograd.grad(y, (x, q.lora_A), dy)
            with pytest.raises(RuntimeError, match="backward through the graph a second time"):
                torch.autograd.grad(y, (x, q.lora_A), dy)
            # create_graph: the gradients are differentiable (tests/test_autograd_defects.py)
            dx = torch.autograd.grad(q(x), x, dy, create_graph=True)[0]
            # an in-place change of a saved tensor is caught by the backward
            y = q(x)
            with torch.no_grad():
                q.lora_A.add_(0.0)
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                y.backward(dy)
        results[name] = (g1, g2, dx.requires_grad)
    (f1, f2, fr), (u1, u2, ur) = results["fast"], results["full"]
    assert fr and ur
    for a, b in zip(f1 + f2, u1 + u2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("double_quant", [True, False], ids=["nested", "fp32-absmax"])
@pytest.mark.parametrize("kind", ["QLoRALinear", "Linear4bit"])
@pytest.mark.parametrize("path", ["fast", "full"])
@pytest.mark.parametrize("rows", [4, 40])
def test_weight_copy_between_forward_and_backward_is_caught(kind, path, double_quant, rows):
    # Weight4bit.copy_ writes the inner tensors the backward reads from inside
    # __torch_dispatch__ (where no version counter moves): it bumps them itself, so the
    # backward raises as nn.Linear's does, on the first call and on a planned later one
    if kind == "QLoRALinear":
        layer = _layer(double_quant=double_quant)
    else:
        layer = _base(n=64, k=64, double_quant=double_quant)
    base = layer.base_layer if kind == "QLoRALinear" else layer
    other = _base(n=64, k=64, double_quant=double_quant, seed=1)
    ctx = torch.enable_grad if path == "fast" else lambda: qpeft.use_backend("cpu")
    for call in ("first", "later"):
        if call == "first":
            layer = copy.deepcopy(layer)
            base = layer.base_layer if kind == "QLoRALinear" else layer
        else:
            layer(torch.randn(rows, 64))  # builds the plan the later call is served from
            assert kind != "QLoRALinear" or path != "fast" or layer._fast_plan is not None
        x = torch.randn(rows, 64, requires_grad=True)
        with ctx():
            y = layer(x)
        with torch.no_grad():
            base.weight.copy_(other.weight)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()
        # a new forward reads the new weight and its backward runs
        with ctx():
            y = layer(x)
        y.sum().backward()
        w = other.dequantize(torch.float32)
        assert torch.allclose(x.grad, torch.ones(rows, 64) @ w + _adapter_dx(layer, rows), atol=1e-4)
        other = _base(n=64, k=64, double_quant=double_quant, seed=2)


def _adapter_dx(layer, rows):
    if not isinstance(layer, QLoRALinear):
        return 0.0
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    return layer.scaling * (torch.ones(rows, 64) @ b) @ a


def _excluded_cases():
    def dropout_training(q, x):
        q2 = _layer(dropout=0.1)
        q2.train()
        # rows beyond the GEMV's: the base term itself then takes the full path too (a
        # Linear4bit's inference call of at most 8 rows has its own fast path)
        return q2, torch.randn(20, 64)

    def dora(q, x):
        return _layer(use_dora=True), x

    def bf16_x(q, x):
        return q, x.bfloat16()

    def noncontiguous_x(q, x):
        return q, torch.randn(64, x.shape[0]).t()

    def small_forward_composed_backward(q, x):
        return q, torch.randn(20, 64)  # the small forward, then not the small backward

    def gemv_rows(q, x):
        return _layer(n=512, k=512), torch.randn(4, 512)  # a W beyond the small kernels

    return {
        "dropout in training": dropout_training,
        "DoRA": dora,
        "bf16 x": bf16_x,
        "non-contiguous x": noncontiguous_x,
        "M beyond the small backward": small_forward_composed_backward,
        "GEMV rows of a large W": gemv_rows,
    }


@pytest.mark.parametrize("case", list(_excluded_cases()))
def test_excluded_inputs_take_the_full_path(case, full_path_calls):
    q, x = _excluded_cases()[case](_layer(), torch.randn(3, 64))
    q(x)
    q(x)
    assert len(full_path_calls) == 2


class _Mode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _DispatchMode(torch.utils._python_dispatch.TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


CONTEXTS = {
    "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    "use_backend": lambda: qpeft.use_backend("default"),
    "function mode": _Mode,
    "dispatch mode": _DispatchMode,
}


@pytest.mark.parametrize("name", list(CONTEXTS))
def test_excluded_contexts_take_the_full_path(name, full_path_calls):
    q = _layer()
    x = torch.randn(3, 64)
    assert _served_fast(q, x)
    before = len(full_path_calls)
    with CONTEXTS[name]():
        q(x)
    assert len(full_path_calls) == before + 1
    q(x)
    assert len(full_path_calls) == before + 1  # and the plan still serves afterwards


def test_profiler_still_sees_the_op():
    q = _layer()
    x = torch.randn(3, 64, requires_grad=True)
    assert _served_fast(q, x.detach())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        q(x).sum().backward()
    names = {e.name for e in prof.events()}
    assert "qpeft::qlora_linear" in names and "qpeft::qlora_linear_backward" in names


def test_vmap_and_jit_trace_take_the_full_path(full_path_calls):
    q = _layer()
    x = torch.randn(3, 64)
    assert _served_fast(q, x)
    # under vmap x is a batched wrapper: not served (the call is checked directly; vmap of
    # the layer itself, on the full path: tests/test_autograd_defects.py)
    seen = []

    def probe(xi):
        seen.append(qautograd.layer_call(q._fast_plan, q, xi))
        return xi

    with torch.no_grad():
        torch.func.vmap(probe)(x)
    assert seen == [None]
    before = len(full_path_calls)
    with torch.no_grad():  # (as tests/test_small_layer.py traces it)
        traced = torch.jit.trace(q, x, check_trace=False)
        assert len(full_path_calls) == before + 1
        assert "qpeft::qlora_linear" in str(traced.graph)
        assert torch.equal(traced(x), q(x))


def test_a_changed_layer_is_replanned(full_path_calls):
    q = _layer()
    x = torch.randn(2, 64)
    assert _served_fast(q, x)
    base_only = q.base_layer(x)

    def full(q):
        with qpeft.use_backend("cpu"):
            return q(x)

    # another adapter
    q.add_adapter("other", r=4)
    with torch.no_grad():
        q.adapters["other"].lora_B.normal_()
    q.set_adapter("other")
    assert torch.equal(q(x), full(q)) and not torch.equal(q(x), base_only)
    assert _served_fast(q, x)
    # a replaced parameter
    q.adapters["other"].lora_A = torch.nn.Parameter(torch.randn(4, 64))
    assert torch.equal(q(x), full(q))
    # disabled adapters: the base layer's output; enabled again: the adapter
    q.disable_adapters()
    assert torch.equal(q(x), base_only)
    q.enable_adapters()
    assert torch.equal(q(x), full(q))
    # merged: the base layer (with the adapter folded in), then unmerged
    q.merge()
    assert torch.equal(q(x), q.base_layer(x))
    q.unmerge()
    assert torch.equal(q(x), full(q))
    # a requantized weight
    q.base_layer.requantize_(torch.randn(64, 64))
    assert torch.equal(q(x), full(q))
    assert _served_fast(q, x)
    # a state field reassigned
    st = q.base_layer.quant_state
    st.state2.absmax = st.state2.absmax * 2
    assert torch.equal(q(x), full(q))
    # a bias changed in place (no replan needed: the plan holds the tensor)
    with torch.no_grad():
        q.base_layer.bias.add_(1.0)
    assert torch.equal(q(x), full(q))
    # a deep copy is its own layer: disabling its adapters does not touch the original
    c = copy.deepcopy(q)
    c.disable_adapters()
    assert torch.equal(c(x), c.base_layer(x))
    assert torch.equal(q(x), full(q))


@pytest.mark.parametrize("grad_x", [False, True])
def test_offset_storage_swapped_in_place_is_read(grad_x):
    # the plan held a [1] view of the double-quantization offset, which a `.data =` swap of
    # the offset's storage (same dtype and shape) does not move: the old offset was decoded
    q = _layer()
    x, dy = torch.randn(2, 64), torch.randn(2, 64)
    assert _served_fast(q, x)
    y_old = q(x)
    st = q.base_layer.quant_state
    st.offset.data = st.offset.data + 1.0
    assert _served_fast(q, x)  # the plan still serves, reading the new storage
    y, grads, _ = _run(q, x, dy, grad_x)
    with qpeft.use_backend("cpu"):
        y_ref, grads_ref, _ = _run(q, x, dy, grad_x)
    assert not torch.equal(y, y_old) and torch.equal(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert (g is None and g_ref is None) or torch.equal(g, g_ref)
    # another dtype through `.data =`: the plan is stale, the full path casts it
    st.offset.data = st.offset.data.double()
    with qpeft.use_backend("cpu"):
        y_ref = q(x)
    assert torch.equal(q(x), y_ref)


def test_bad_input_errors_unchanged():
    q = _layer()
    x = torch.randn(2, 64)
    assert _served_fast(q, x)
    with pytest.raises(ValueError, match="got an input with 32 features"):
        q(torch.randn(2, 32))
    with pytest.raises(TypeError, match="expects a tensor"):
        q([1.0] * 64)


def test_plan_is_not_built_where_the_fast_path_cannot_serve():
    q = _layer()
    q.base_layer.compute_dtype = torch.bfloat16
    q(torch.randn(1, 64))
    assert q._fast_plan is None


def test_bf16_compute_mode_takes_the_full_path(monkeypatch, full_path_calls):
    q = _layer()
    x = torch.randn(3, 64)
    assert _served_fast(q, x)
    before = len(full_path_calls)
    monkeypatch.setenv("QPEFT_CPU_COMPUTE", "bf16")
    q(x)
    assert len(full_path_calls) == before + 1
    monkeypatch.setenv("QPEFT_CPU_COMPUTE", " FP32 ")
    q(x)
    assert len(full_path_calls) == before + 1


def test_compile_traces_the_full_path():
    # a plan exists; dynamo must still trace the full path (fullgraph: an opaque C call
    # inside the graph would be an error), and the compiled call gives the same values
    q = _layer()
    x = torch.randn(3, 64)
    assert _served_fast(q, x)
    torch._dynamo.reset()
    compiled = torch.compile(q, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), q(x))
    torch._dynamo.reset()


def test_module_hooks_still_run():
    q = _layer()
    x = torch.randn(3, 64)
    assert _served_fast(q, x)
    want = q(2 * x) + 1
    pre = q.register_forward_pre_hook(lambda mod, args: (2 * args[0],))
    post = q.register_forward_hook(lambda mod, args, out: out + 1)
    assert torch.equal(q(x), want)
    pre.remove()
    post.remove()
    with qpeft.use_backend("cpu"):
        full = q(x)
    assert torch.equal(q(x), full)


def test_plan_makes_no_reference_cycle():
    # the plan lives in the layer's __dict__ and refers to the layer by id only: a layer
    # with a plan is freed by reference counting alone, as before
    import gc
    import weakref

    q = _layer()
    assert _served_fast(q, torch.randn(1, 64))
    ref = weakref.ref(q)
    gc.disable()
    try:
        del q
        assert ref() is None
    finally:
        gc.enable()


# --- the fused-GEMM route -----------------------------------------------------------------


@pytest.fixture
def at_avx2():
    """The avx2 level, where the Python path takes the fused fp32 GEMM (an AVX-512 CPU's
    own level keeps decoded panels): the route is tested on every CPU that has it."""
    from qpeft._native import cpu_module

    mod = cpu_module()
    info = mod.cpu_info()
    if "avx2" in info["missing"] or "avx2" not in info["built_levels"]:
        pytest.skip(f"the avx2 level: {info['missing'].get('avx2', 'not built')}")
    prev = mod.set_isa("avx2")
    yield mod
    mod.set_isa(prev)


# (layer, x's leading dims): the forward merges the LoRA term into W when K <= 2 M and dx
# when N <= 2 M (backends/cpu/qlora.py merges_lora), else adds it as a rank-r GEMM; so
# each of the four combinations, odd sizes and partial blocks, fp4, a plain absmax, no
# bias, a trained bias, r = 3, 3-D x
GEMM_CASES = [
    (dict(n=64, k=64), (40,)),  # both merged
    (dict(n=100, k=300, blocksize=32, quant_type="fp4"), (37,)),  # neither
    (dict(n=300, k=100, double_quant=False, bias=False), (2, 30)),  # forward merged, dx not
    (dict(n=40, k=136, r=3, train_bias=True), (3, 11)),  # dx merged, forward not
    (dict(n=256, k=704), (512,)),  # the demo's down projection
    (dict(n=48, k=48, r=260), (40,)),  # a rank above the fused GEMM's extra block, merged
    (dict(n=40, k=100, r=300), (40,)),  # and composed in the forward, merged in dx
]


@pytest.mark.parametrize(
    "spec,lead", GEMM_CASES, ids=lambda v: "-".join(map(str, v.values() if isinstance(v, dict) else v))
)
def test_gemm_route_same_bits_as_the_full_path(spec, lead, at_avx2, full_path_calls):
    q = _layer(**spec)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*lead, q.in_features, generator=g)
    dy = torch.randn(*lead, q.out_features, generator=g)
    assert _served_fast(q, x)
    with qpeft.use_backend("cpu"):
        y_full, g_full, fn_full = _run(q, x, dy)
    before = len(full_path_calls)
    y_fast, g_fast, fn_fast = _run(q, x, dy)
    assert len(full_path_calls) == before, "the fast path did not serve the call"
    assert fn_fast.name() == "GemmQLoRABackward" and "Gemm" not in fn_full.name()
    assert y_fast.shape == y_full.shape == (*lead, q.out_features) and torch.equal(y_fast, y_full)
    for a, b in zip(g_fast, g_full):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            y = q(x)
        assert y.grad_fn is None and torch.equal(y, y_full)
    # each gradient alone: the backward computes only what the graph asks for
    params = [q.lora_A, q.lora_B] + ([q.bias] if q.bias is not None and q.bias.requires_grad else [])
    xg = x.clone().requires_grad_()
    for wrt in [xg, *params]:
        (fast,) = torch.autograd.grad(q(xg), wrt, dy)
        with qpeft.use_backend("cpu"):
            (full,) = torch.autograd.grad(q(xg), wrt, dy)
        assert torch.equal(fast, full)
    # frozen adapters, x needing a gradient: dx alone
    for p in params:
        p.requires_grad_(False)
    (fast,) = torch.autograd.grad(q(xg), xg, dy)
    with qpeft.use_backend("cpu"):
        (full,) = torch.autograd.grad(q(xg), xg, dy)
    assert torch.equal(fast, full)


def test_gemm_route_autograd_semantics(at_avx2):
    q = _layer(n=64, k=64)
    x = torch.randn(40, 64, requires_grad=True)
    dy = torch.randn(40, 64)
    assert _served_fast(q, x.detach())
    y = q(x)
    assert y.grad_fn.name() == "GemmQLoRABackward"
    g1 = torch.autograd.grad(y, (x, q.lora_A), dy, retain_graph=True)
    g2 = torch.autograd.grad(y, (x, q.lora_A), dy)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(y, (x, q.lora_A), dy)
    y = q(x)
    with torch.no_grad():
        q.lora_B.add_(0.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(dy)
    # an undefined incoming gradient is zeros: y used only through a branch that is cut
    y = q(x)
    (ga,) = torch.autograd.grad((y * 0).sum() + q.lora_A.sum(), q.lora_A)
    assert torch.equal(ga, torch.ones_like(ga))


def test_gemm_route_follows_the_level_and_the_sizes(at_avx2, full_path_calls):
    """The GEMM route is taken exactly where the Python path takes the fused GEMM: at the
    avx2 level (another level decodes panels: the panel route), above the GEMV's rows, and
    not for M >= 256 rows of a W of 4M weights or more (decoded panels,
    backends/cpu/f32gemm.py)."""
    from qpeft.backends.cpu import f32gemm

    q = _layer(n=64, k=64)
    x = torch.randn(40, 64, requires_grad=True)
    assert _served_fast(q, x.detach())
    before = len(full_path_calls)
    assert q(x).grad_fn.name() == "GemmQLoRABackward"
    at_avx2.set_isa("scalar")
    try:
        assert not f32gemm.active()
        assert q(x).grad_fn.name() == "PanelQLoRABackward"
    finally:
        at_avx2.set_isa("avx2")
    assert q(x).grad_fn.name() == "GemmQLoRABackward"
    assert len(full_path_calls) == before  # one plan serves both routes
    big = _layer(n=2048, k=2048)
    assert not f32gemm.use_for(256, 2048, 2048) and f32gemm.use_for(255, 2048, 2048)
    for m, node in ((256, "PanelQLoRABackward"), (255, "GemmQLoRABackward")):
        x = torch.randn(m, 2048, requires_grad=True)
        assert _served_fast(big, x.detach()) and big(x).grad_fn.name() == node


def _random_case(m, n, k, r, bias, double_quant, quant_type, lead, seed):
    """A layer and (x, dy) of m rows (per leading index) that the small kernels do not take
    (rows are added where they would), for the routes' properties."""
    rows = m * (lead[0] if lead else 1)
    if rows <= 32 and rows * n * k <= 1 << 19 and n * k <= 1 << 16:
        m += 33  # not the small forward
    q = _layer(
        n=n,
        k=k,
        r=r,
        bias=bias,
        quant_type=quant_type,
        double_quant=double_quant,
        blocksize=32,
        seed=seed,
        train_bias=bias,
    )
    g = torch.Generator().manual_seed(seed + 1)
    return q, torch.randn(*lead, m, k, generator=g), torch.randn(*lead, m, n, generator=g)


@settings(max_examples=max(4, settings.default.max_examples // 4))
@given(
    m=st.integers(9, 120),
    n=st.integers(1, 90),
    k=st.sampled_from([32, 64, 96, 136, 200, 264]),
    r=st.integers(1, 17),
    bias=st.booleans(),
    double_quant=st.booleans(),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    lead=st.sampled_from([(), (3,)]),
    seed=st.integers(0, 2**16),
)
def test_gemm_route_same_bits_property(m, n, k, r, bias, double_quant, quant_type, lead, seed, at_avx2):
    """Random layers and rows the GEMM route serves (beyond the small kernels, above the
    GEMV's rows): y and every gradient equal the full path's bit for bit."""
    q, x, dy = _random_case(m, n, k, r, bias, double_quant, quant_type, lead, seed)
    assert _served_fast(q, x)
    with qpeft.use_backend("cpu"):
        y_full, g_full, _ = _run(q, x, dy)
    y_fast, g_fast, fn = _run(q, x, dy)
    assert fn.name() == "GemmQLoRABackward"
    assert torch.equal(y_fast, y_full)
    for a, b in zip(g_fast, g_full):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


# --- the panel route ------------------------------------------------------------------------


def _panel_levels():
    """The levels where the Python path decodes panels for torch's fp32 GEMM: scalar, and
    every level above avx2 this CPU runs (avx2 itself only for large M and W, below)."""
    from qpeft._native import cpu_module

    info = cpu_module().cpu_info()
    above = [lvl for lvl in ("avx512", "avx512_bf16", "amx") if lvl in info["built_levels"]]
    return ["scalar"] + [
        lvl if lvl not in info["missing"] else pytest.param(lvl, marks=pytest.mark.skip(info["missing"][lvl]))
        for lvl in above
    ]


@pytest.fixture(params=_panel_levels())
def panel_level(request):
    from qpeft._native import cpu_module

    mod = cpu_module()
    prev = mod.set_isa(request.param)
    yield request.param
    mod.set_isa(prev)


# the GEMM route's cases (the four merge combinations, ...) plus Ws of several panels: a
# plain absmax (panels of 32 rows), and a double-quantized one whose panels start on nested
# blocks (256 x 64 weights: panels of 256, 256 and 88 rows, the last nested block partial)
PANEL_CASES = GEMM_CASES + [
    (dict(n=200, k=96, blocksize=32, double_quant=False, panel_elems=3072), (45,)),
    (dict(n=600, k=64, panel_elems=256 * 64), (2, 20)),
]


def _same_bits_both_ways(q, x, dy, node):
    with qpeft.use_backend("cpu"):
        y_full, g_full, fn_full = _run(q, x, dy)
    y_fast, g_fast, fn_fast = _run(q, x, dy)
    if x.dim() != 2:  # the full path reshapes QLoRAFunction's [M, N] output outside it
        assert fn_full.name() == "ViewBackward0"
        fn_full = fn_full.next_functions[0][0]
    assert fn_fast.name() == node and fn_full.name() == "EagerQLoRAFunctionBackward"
    assert y_fast.shape == y_full.shape and torch.equal(y_fast, y_full)
    for a, b in zip(g_fast, g_full):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return y_full


@pytest.mark.parametrize(
    "spec,lead", PANEL_CASES, ids=lambda v: "-".join(map(str, v.values() if isinstance(v, dict) else v))
)
def test_panel_route_same_bits_as_the_full_path(spec, lead, panel_level, monkeypatch, full_path_calls):
    from qpeft.backends.cpu import qlora as cpu_qlora

    spec = dict(spec)
    monkeypatch.setattr(cpu_qlora, "PANEL_ELEMS", spec.pop("panel_elems", None))
    q = _layer(**spec)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*lead, q.in_features, generator=g)
    dy = torch.randn(*lead, q.out_features, generator=g)
    assert _served_fast(q, x)
    before = len(full_path_calls)
    y_full = _same_bits_both_ways(q, x, dy, "PanelQLoRABackward")
    assert len(full_path_calls) == before + 1  # the use_backend("cpu") call only
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            y = q(x)
        assert y.grad_fn is None and torch.equal(y, y_full)
    params = [q.lora_A, q.lora_B] + ([q.bias] if q.bias is not None and q.bias.requires_grad else [])
    xg = x.clone().requires_grad_()
    for wrt in [xg, *params]:  # each gradient alone
        (fast,) = torch.autograd.grad(q(xg), wrt, dy)
        with qpeft.use_backend("cpu"):
            (full,) = torch.autograd.grad(q(xg), wrt, dy)
        assert torch.equal(fast, full)
    for p in params:  # frozen adapters: dx alone
        p.requires_grad_(False)
    (fast,) = torch.autograd.grad(q(xg), xg, dy)
    with qpeft.use_backend("cpu"):
        (full,) = torch.autograd.grad(q(xg), xg, dy)
    assert torch.equal(fast, full)


def test_panel_route_for_large_m_and_w_at_avx2(at_avx2, monkeypatch):
    """At avx2 the Python path decodes panels for M >= PANELS_MIN_ROWS rows of a W of at
    least PANELS_MIN_WEIGHTS weights (lowered here, as the plan reads them when built)."""
    from qpeft.backends.cpu import f32gemm
    from qpeft.backends.cpu import qlora as cpu_qlora

    monkeypatch.setattr(f32gemm, "PANELS_MIN_ROWS", 48)
    monkeypatch.setattr(f32gemm, "PANELS_MIN_WEIGHTS", 96 * 128)
    monkeypatch.setattr(cpu_qlora, "PANEL_ELEMS", 32 * 128)
    q = _layer(n=96, k=128, train_bias=True)
    g = torch.Generator().manual_seed(4)
    x, dy = torch.randn(48, 128, generator=g), torch.randn(48, 96, generator=g)
    assert _served_fast(q, x)
    _same_bits_both_ways(q, x, dy, "PanelQLoRABackward")
    x, dy = torch.randn(40, 128, generator=g), torch.randn(40, 96, generator=g)  # fewer rows: the GEMM
    _same_bits_both_ways(q, x, dy, "GemmQLoRABackward")


def test_panel_route_follows_panel_elems(panel_level, monkeypatch):
    """A new PANEL_ELEMS makes the plan stale: the next plan decodes the new panels."""
    from qpeft.backends.cpu import qlora as cpu_qlora

    q = _layer(n=128, k=64)
    x, dy = torch.randn(40, 64), torch.randn(40, 128)
    assert _served_fast(q, x)
    plan = q._fast_plan
    for elems in (64 * 64, 16 * 64, None):
        monkeypatch.setattr(cpu_qlora, "PANEL_ELEMS", elems)
        assert qautograd.layer_call(plan, q, x) is NotImplemented
        q(x)  # the stale plan dropped: the full path, which plans again on its next call
        assert _served_fast(q, x) and q._fast_plan is not plan
        plan = q._fast_plan
        _same_bits_both_ways(q, x, dy, "PanelQLoRABackward")


def test_route_leaves_fp32_calls_that_compute_in_bf16(panel_level, monkeypatch, full_path_calls):
    """Where fp32 x of a large shape computes in bf16 (a CPU with bf16 dot products and
    torch's fp32 matmul setting allowing bf16: patched in here), the route hands the call
    to the full path (its bf16 mode); smaller calls stay fp32 and are served."""
    from qpeft.backends.cpu import capability
    from qpeft.backends.cpu import qlora as cpu_qlora

    q = _layer(n=256, k=256)
    small, large = torch.randn(40, 256), torch.randn(128, 256)
    assert 40 * 256 * 256 < cpu_qlora.FP32_BF16_MIN_WORK <= 128 * 256 * 256
    assert _served_fast(q, small) and _served_fast(q, large)
    monkeypatch.setattr(capability, "bf16_dot_products", lambda: True)
    monkeypatch.setattr(capability, "fp32_matmul_allows_bf16", lambda: True)
    assert cpu_qlora.fp32_takes_bf16(128, 256, 256) and not cpu_qlora.fp32_takes_bf16(40, 256, 256)
    before = len(full_path_calls)
    q(small)
    assert len(full_path_calls) == before
    q(large)
    assert len(full_path_calls) == before + 1


@settings(max_examples=max(4, settings.default.max_examples // 4))
@given(
    m=st.integers(9, 120),
    n=st.integers(1, 90),
    k=st.sampled_from([32, 64, 96, 136, 200, 264]),
    r=st.integers(1, 17),
    bias=st.booleans(),
    double_quant=st.booleans(),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    lead=st.sampled_from([(), (3,)]),
    panel_rows=st.sampled_from([None, 1, 3, 8]),
    seed=st.integers(0, 2**16),
)
# N = 1: torch's GEMM summed dB in another order for the full path's transposed xa
@example(
    m=9, n=1, k=32, r=2, bias=False, double_quant=False, quant_type="nf4", lead=(), panel_rows=None, seed=1
)
def test_panel_route_same_bits_property(m, n, k, r, bias, double_quant, quant_type, lead, panel_rows, seed):
    """Random layers, rows and panel sizes at the scalar level: y and every gradient equal
    the full path's bit for bit."""
    from qpeft._native import cpu_module
    from qpeft.backends.cpu import qlora as cpu_qlora

    q, x, dy = _random_case(m, n, k, r, bias, double_quant, quant_type, lead, seed)
    mod = cpu_module()
    prev_level, prev_elems = mod.set_isa("scalar"), cpu_qlora.PANEL_ELEMS
    cpu_qlora.PANEL_ELEMS = None if panel_rows is None else panel_rows * k
    try:
        assert _served_fast(q, x)
        _same_bits_both_ways(q, x, dy, "PanelQLoRABackward")
    finally:
        mod.set_isa(prev_level)
        cpu_qlora.PANEL_ELEMS = prev_elems


# --- Linear4bit's inference calls (linear_call) --------------------------------------------


def _base(n=96, k=128, bias=True, quant_type="nf4", double_quant=True, blocksize=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g))
    return qpeft.nn.Linear4bit.from_linear(lin, quant_type, blocksize, double_quant)


def _linear_served(lin, x) -> bool:
    lin(x)
    return lin._fast_plan is not None and qautograd.linear_call(lin._fast_plan, lin, x) not in (
        None,
        NotImplemented,
    )


BASES = [
    dict(),
    dict(n=33, k=96, bias=False, quant_type="fp4", blocksize=32),
    dict(n=7, k=64, double_quant=False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("spec", BASES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()) or "default")
@pytest.mark.parametrize("lead", [(1,), (3,), (8,), (2, 4)], ids=lambda s: "x".join(map(str, s)))
def test_linear4bit_inference_same_bits_as_the_full_path(spec, lead, dtype, full_path_calls):
    lin = _base(**spec)
    x = torch.randn(*lead, lin.in_features, generator=torch.Generator().manual_seed(3)).to(dtype)
    assert _linear_served(lin, x)
    with qpeft.use_backend("cpu"):
        want = lin(x)
    before = len(full_path_calls)
    got = lin(x)
    assert len(full_path_calls) == before, "the fast path did not serve the call"
    assert got.shape == want.shape == (*lead, lin.out_features) and got.dtype == want.dtype == dtype
    assert torch.equal(got, want)
    lin.compute_dtype = torch.float32  # x cast to fp32 first, y back: the same values
    assert torch.equal(lin(x), want) and lin._fast_plan is not None
    with torch.inference_mode():
        assert torch.equal(lin(x), want) and lin(x).is_inference()


def test_linear4bit_calls_the_fast_path_does_not_serve(full_path_calls):
    lin = _base()
    x = torch.randn(2, 128)
    assert _linear_served(lin, x)
    cases = {
        "x needs a gradient": lambda: lin(x.clone().requires_grad_()),
        "rows beyond the GEMV": lambda: lin(torch.randn(9, 128)),
        "fp64 x": lambda: lin(x.double()),
        "non-contiguous x": lambda: lin(torch.randn(128, 2).t()),
        "autocast": lambda: _under(torch.autocast("cpu", dtype=torch.bfloat16), lambda: lin(x)),
        "use_backend": lambda: _under(qpeft.use_backend("default"), lambda: lin(x)),
    }
    for name, call in cases.items():
        before = len(full_path_calls)
        call()
        assert len(full_path_calls) == before + 1, name
    before = len(full_path_calls)
    lin(x)
    assert len(full_path_calls) == before  # the plan still serves


def _under(ctx, fn):
    with ctx:
        return fn()


def test_linear4bit_a_changed_layer_is_replanned():
    lin = _base()
    x = torch.randn(3, 128)
    assert _linear_served(lin, x)

    def full():
        with qpeft.use_backend("cpu"):
            return lin(x)

    lin.requantize_(torch.randn(96, 128))
    assert torch.equal(lin(x), full())
    assert _linear_served(lin, x)
    with torch.no_grad():
        lin.bias.add_(1.0)  # in place: the plan holds the tensor
    assert torch.equal(lin(x), full())
    lin.bias = torch.nn.Parameter(torch.randn(96), requires_grad=False)
    assert torch.equal(lin(x), full())
    st = lin.quant_state
    st.state2.absmax = st.state2.absmax * 2
    assert torch.equal(lin(x), full())
    # the offset's storage swapped (same dtype and shape): the plan holds the offset itself,
    # not a [1] view that would keep decoding the old value
    y_old = lin(x)
    st.offset.data = st.offset.data + 1.0
    assert not torch.equal(lin(x), y_old) and torch.equal(lin(x), full())
    torch.testing.assert_close(lin(x), x @ lin.dequantize(torch.float32).t() + lin.bias, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="got an input with 64 features"):
        lin(torch.randn(2, 64))


@pytest.mark.parametrize("kind", ["QLoRALinear", "Linear4bit"])
def test_activation_checkpointing_recomputes_the_same_saved_tensors(kind):
    # torch.utils.checkpoint (non-reentrant) compares the tensors the recomputation saves with
    # the forward's: the first call (the full path, before a plan exists) and the recomputed
    # one (planned) must save the same double-quantization offset (a [1] view on one path and
    # the 0-d offset itself on the other failed every backward after the first)
    from torch.utils.checkpoint import checkpoint

    from qpeft.nn import Linear4bit, QLoRALinear

    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 32)
    layer = QLoRALinear.from_linear(dense, r=4) if kind == "QLoRALinear" else Linear4bit.from_linear(dense)
    x = torch.randn(5, 64, requires_grad=True)
    for _ in range(3):
        x.grad = None
        checkpoint(layer, x, use_reentrant=False).sum().backward()
        want = x.grad.clone()
        x.grad = None
        layer(x).sum().backward()
        assert torch.equal(x.grad, want)
