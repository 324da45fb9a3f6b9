"""Regression tests for autograd and tracing defects of the layers (found by outside tests).

- A backward with ``create_graph=True`` (gradient penalties, Hessian-vector products) gave
  first-order gradients that were constants, so every second-order term was silently zero:
  ``QLoRAFunction`` / ``Linear4bitFunction`` and the C++ layer call now compute such a
  backward in differentiable torch ops. Checked against fp64 autograd on the dequantized
  weight, and by ``gradgradcheck`` in fp64.
- ``torch.compile(fullgraph=True)`` failed at M <= 8 rows (the GEMV-or-matmul choice read
  ``use_backend``'s ContextVar, which Dynamo cannot trace).
- A 0-d input to a QLoRALinear over a 16-bit base raised IndexError.
- An in-place op on a layer's output for x with >= 3 dims raised "is a view and is being
  modified inplace" (the Functions returned a view): Falcon's ``mlp_output += attention_output``.
- torch.func transforms (grad, jacrev, vmap, functional_call) raised torch's "must override
  the setup_context staticmethod"; torch.jit.trace with an adapter needing a gradient failed
  with a bare "unordered_map::at"; torch.jit.script with "Unknown type annotation".
"""

from __future__ import annotations

import pytest
import torch

import qpeft.functional as qf
from qpeft.nn import IA3Linear, Linear4bit, QLoRALinear


def _linear(k=16, n=12, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(k, n)


def _qlora(use_dora=False, **kw):
    q = QLoRALinear.from_linear(_linear(), r=4, alpha=8, use_dora=use_dora, **kw)
    with torch.no_grad():
        q.lora_B.normal_(0, 0.1)
    return q


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


# --- A: create_graph=True --------------------------------------------------------------------
def _penalty_reference(q, x0, use_dora):
    """lora_A's gradient of f + ||df/dx||^2 (f = ||y||^2), in fp64 on the dequantized weight."""
    w = q.base_layer.weight.dequantize().double()
    b = q.base_layer.bias.double()
    a = q.lora_A.detach().double().requires_grad_()
    bb = q.lora_B.detach().double()
    x = x0.double().requires_grad_()
    y = x @ w.t() + q.scaling * (x @ a.t()) @ bb.t()
    if use_dora:
        norm = torch.linalg.vector_norm(w + q.scaling * bb @ a, dim=1).detach()
        y = y * (q.adapters["default"].magnitude.detach().double() / norm)
    y = y + b
    f = y.pow(2).sum()
    (gx,) = torch.autograd.grad(f, x, create_graph=True)
    (f + gx.pow(2).sum()).backward()
    return a.grad


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("lead", [(3,), (2, 5)], ids=["2d", "3d"])
def test_gradient_penalty_through_qlora_linear(use_dora, lead):
    q = _qlora(use_dora)
    x0 = torch.randn(*lead, 16)
    expected = _penalty_reference(q, x0, use_dora)
    for call in range(3):  # the first call plans the C++ layer call, which serves the next ones
        q.zero_grad()
        x = x0.clone().requires_grad_()
        f = q(x).pow(2).sum()
        (gx,) = torch.autograd.grad(f, x, create_graph=True)
        assert gx.requires_grad, f"call {call}: the first-order gradient is a constant"
        (f + gx.pow(2).sum()).backward()
        assert _rel(q.lora_A.grad, expected) < 1e-5, f"call {call}"


def test_create_graph_through_the_c_layer_call():
    """The C++ nodes take the differentiable route too (when the module is built)."""
    q = _qlora()
    x0 = torch.randn(4, 16)
    q(x0)  # plans
    x = x0.clone().requires_grad_()
    y = q(x)
    if q._fast_plan is None or "QLoRABackward" not in y.grad_fn.name():
        pytest.skip("qpeft._C_layer does not serve this call here")
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    assert gx.requires_grad
    gx.pow(2).sum().backward()
    expected = _penalty_reference(q, x0, False)
    q.zero_grad()
    x = x0.clone().requires_grad_()
    f = q(x).pow(2).sum()
    (gx,) = torch.autograd.grad(f, x, create_graph=True)
    (f + gx.pow(2).sum()).backward()
    assert _rel(q.lora_A.grad, expected) < 1e-5


@pytest.mark.parametrize("rows", [3, 12], ids=["gemv", "matmul"])
def test_hvp_through_frozen_linear4bit(rows):
    layer = Linear4bit.from_linear(_linear())
    x = torch.randn(rows, 16)
    v = torch.randn(rows, 16)
    _, hvp = torch.autograd.functional.hvp(lambda t: torch.tanh(layer(t)).pow(2).sum(), x, v)
    w, b = layer.weight.dequantize().double(), layer.bias.double()
    _, ref = torch.autograd.functional.hvp(
        lambda t: torch.tanh(t @ w.t() + b).pow(2).sum(), x.double(), v.double()
    )
    assert _rel(hvp, ref) < 1e-5


def test_gradient_penalty_through_ia3_linear():
    layer = IA3Linear.from_linear(_linear())
    with torch.no_grad():
        layer.ia3_l.uniform_(0.5, 1.5)
    x0 = torch.randn(2, 3, 16)
    x = x0.clone().requires_grad_()
    f = torch.tanh(layer(x)).pow(2).sum()
    (gx,) = torch.autograd.grad(f, x, create_graph=True)
    gx.pow(2).sum().backward()
    w, b = layer.weight.dequantize().double(), layer.bias.double()
    l64 = layer.ia3_l.detach().double().requires_grad_()
    x = x0.double().requires_grad_()
    f = torch.tanh((x @ w.t() + b) * l64).pow(2).sum()
    (gx,) = torch.autograd.grad(f, x, create_graph=True)
    gx.pow(2).sum().backward()
    assert _rel(layer.ia3_l.grad, l64.grad) < 1e-5


def test_gradgradcheck_fp64():
    torch.manual_seed(0)
    w = torch.randn(12, 16)
    packed, state = qf.quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True)
    f64 = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 16, **f64)
    a, b, bias = torch.randn(4, 16, **f64), torch.randn(12, 4, **f64), torch.randn(12, **f64)
    rank_scale, out_scale = torch.rand(4, dtype=torch.float64), torch.rand(12, dtype=torch.float64)

    def qlora(x, a, b, bias):
        return qf.qlora_linear(x, packed, state, a, b, 2.0, bias, rank_scale=rank_scale, out_scale=out_scale)

    assert torch.autograd.gradgradcheck(qlora, (x, a, b, bias), eps=1e-6, atol=1e-5)
    for rows in (x[0], x):  # the GEMV's rows and the matmul's
        assert torch.autograd.gradgradcheck(
            lambda x, bias: torch.tanh(qf.linear_4bit(x, packed, state, bias)),
            (rows, bias),
            eps=1e-6,
            atol=1e-5,
        )


# --- B: torch.compile(fullgraph=True) at the GEMV's rows ---------------------------------------
def _compile_layers():
    return {
        "Linear4bit": lambda: Linear4bit.from_linear(_linear(64, 96)),
        "IA3Linear": lambda: IA3Linear.from_linear(_linear(64, 96)),
        "QLoRALinear-dropout": lambda: QLoRALinear.from_linear(_linear(64, 96), dropout=0.05).train(),
        "QLoRALinear-disabled": lambda: _disabled(QLoRALinear.from_linear(_linear(64, 96))),
    }


def _disabled(q):
    q.disable_adapters()
    return q


@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("name", list(_compile_layers()))
def test_fullgraph_compile_at_gemv_rows(name, rows):
    torch._dynamo.reset()
    layer = _compile_layers()[name]()
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm.print_readable(print_output=False))  # with the Functions' subgraphs
        return gm.forward

    x = torch.randn(rows, 64, requires_grad=True)
    torch.manual_seed(1)
    y = torch.compile(layer, backend=backend, fullgraph=True)(x)
    assert len(graphs) == 1 and "gemv_4bit" in graphs[0]  # the GEMV, as eager takes it
    y.sum().backward()
    grads = [x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]
    layer.zero_grad()
    x.grad = None
    torch.manual_seed(1)
    y_ref = layer(x)
    y_ref.sum().backward()
    grads_ref = [x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]
    assert torch.equal(y, y_ref)
    assert all(g is r is None or torch.equal(g, r) for g, r in zip(grads, grads_ref))


@pytest.mark.parametrize("rows", [1, 8])
def test_fullgraph_compile_qlora_linear_backward(rows):
    torch._dynamo.reset()
    q = _qlora()
    x = torch.randn(rows, 16, requires_grad=True)
    y = torch.compile(q, backend="aot_eager", fullgraph=True)(x)
    y.pow(2).sum().backward()
    grads = [x.grad.clone(), q.lora_A.grad.clone(), q.lora_B.grad.clone()]
    q.zero_grad()
    x.grad = None
    q(x).pow(2).sum().backward()
    for g, r in zip(grads, [x.grad, q.lora_A.grad, q.lora_B.grad]):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


# --- C: a 0-d input --------------------------------------------------------------------------
@pytest.mark.parametrize("quantize", [True, False], ids=["4bit", "16bit"])
def test_zero_dim_input_is_a_clear_error(quantize):
    q = QLoRALinear.from_linear(_linear(64, 48), r=4, quantize=quantize)
    with pytest.raises(ValueError, match=r"in_features=64.*no feature dimension \(a 0-d tensor\)"):
        q(torch.tensor(1.0))


# --- D: in-place ops on the output -----------------------------------------------------------
def _inplace_layers():
    return {
        "QLoRALinear": lambda: _qlora(),
        "QLoRALinear-dora": lambda: _qlora(use_dora=True),
        "Linear4bit": lambda: Linear4bit.from_linear(_linear()),
        "Linear4bit-bias": lambda: _train_bias(Linear4bit.from_linear(_linear())),
        "IA3Linear": lambda: IA3Linear.from_linear(_linear()),
    }


def _train_bias(layer):
    layer.bias.requires_grad_(True)
    return layer


def _grads(layer, x, inplace):
    layer.zero_grad()
    x = x.clone().requires_grad_()
    y = layer(x)
    if inplace:
        y += 1.0
        y.mul_(x[..., :1].tanh() + 2)
    else:
        y = (y + 1.0) * (x[..., :1].tanh() + 2)
    y.pow(2).sum().backward()
    return [x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]


@pytest.mark.parametrize("lead", [(2, 5), (2, 1, 3)], ids=["3d", "4d"])
@pytest.mark.parametrize("name", list(_inplace_layers()))
def test_inplace_op_on_the_output(name, lead):
    layer = _inplace_layers()[name]()
    x = torch.randn(*lead, 16)
    for _ in range(2):  # QLoRALinear: the full path, then the C++ layer call
        expected = _grads(layer, x, inplace=False)
        got = _grads(layer, x, inplace=True)
        assert len(got) == len(expected)
        assert all(torch.equal(g, e) for g, e in zip(got, expected))


# --- torch.func transforms, torch.jit.trace with a gradient, torch.jit.script ---------------
# torch.func raised torch's "must override the setup_context staticmethod" (old-style
# Functions); torch.jit.trace with an adapter needing a gradient failed with a bare C++
# "unordered_map::at"; torch.jit.script with "Unknown type annotation".
def _func_layers():
    def l4():
        lin = Linear4bit.from_linear(_linear())
        lin.bias.requires_grad_(True)
        return lin

    return {
        "qlora": lambda: _qlora(),
        "qlora-nobias": _qlora_nobias,
        "dora": lambda: _qlora(use_dora=True),
        "linear4bit": l4,
        "ia3": lambda: IA3Linear.from_linear(_linear()),
    }


def _qlora_nobias():
    q = QLoRALinear.from_linear(torch.nn.Linear(16, 12, bias=False), r=4, alpha=8)
    with torch.no_grad():
        q.lora_B.normal_(0, 0.1)
    return q


def _oracle64(layer, params, x):
    """The layer's output in fp64 on the dequantized weight, as a function of ``params``
    (the names of its trainable parameters) and x."""
    base = layer.base_layer if hasattr(layer, "base_layer") else layer
    w = base.weight.dequantize().double()
    b = params.get("bias", base.bias)  # a Linear4bit's bias is trained here
    y = x @ w.t()
    if isinstance(layer, QLoRALinear):
        ad = layer.adapters["default"]
        a, bb = params["adapters.default.lora_A"], params["adapters.default.lora_B"]
        delta = layer.scaling * (x @ a.t()) @ bb.t()
        if ad.use_dora:
            norm = torch.linalg.vector_norm(w + layer.scaling * bb @ a, dim=1).detach()
            y = (y + delta) * (params["adapters.default.magnitude"] / norm)
        else:
            y = y + delta
    if b is not None:
        y = y + b.detach().double() if b is base.bias else y + b
    if isinstance(layer, IA3Linear):
        y = y * params["ia3_l"]
    return y


@pytest.mark.parametrize("name", list(_func_layers()))
def test_torch_func_grad_and_functional_call(name):
    layer = _func_layers()[name]()
    x = torch.randn(5, 16)
    params = {k: p.detach() for k, p in layer.named_parameters() if p.requires_grad}

    def loss(p, x):
        return torch.func.functional_call(layer, p, (x,)).pow(2).sum()

    gp, gx = torch.func.grad(loss, argnums=(0, 1))(params, x)
    p64 = {k: v.double().requires_grad_() for k, v in params.items()}
    x64 = x.double().requires_grad_()
    _oracle64(layer, p64, x64).pow(2).sum().backward()
    assert _rel(gx, x64.grad) < 1e-4
    for k in params:
        assert _rel(gp[k], p64[k].grad) < 1e-4, k
    # the eager layer still works afterwards (nothing cached from inside the transform)
    y = layer(x)
    assert _rel(y, _oracle64(layer, p64, x.double()).detach()) < 1e-4


@pytest.mark.parametrize("name", list(_func_layers()))
def test_torch_func_jacrev_and_vmap(name):
    layer = _func_layers()[name]()
    x = torch.randn(16)
    params = {k: p.detach().double() for k, p in layer.named_parameters() if p.requires_grad}
    want = torch.autograd.functional.jacobian(lambda x: _oracle64(layer, params, x), x.double())
    jac = torch.func.jacrev(layer)(x)
    assert _rel(jac, want) < 1e-4
    xs = torch.randn(3, 4, 16)
    torch.testing.assert_close(torch.func.vmap(layer)(xs), layer(xs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [4, 20])
def test_jit_trace_with_a_gradient(rows):
    q = _qlora()
    x = torch.randn(rows, 16)
    traced = torch.jit.trace(q, x, check_trace=False)
    results = []
    for fn in (traced, q):
        q.zero_grad()
        xg = x.clone().requires_grad_()
        y = fn(xg)
        y.pow(2).sum().backward()
        results.append((y.detach(), xg.grad, q.lora_A.grad.clone(), q.lora_B.grad.clone()))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    x2 = torch.randn(rows + 1, 16)
    assert torch.equal(traced(x2), q(x2))


@pytest.mark.parametrize(
    "make", [_qlora, lambda: Linear4bit.from_linear(_linear()), lambda: IA3Linear.from_linear(_linear())]
)
def test_jit_script_is_a_clear_error(make):
    with pytest.raises(RuntimeError, match="torch.jit.script cannot compile .*torch.compile"):
        torch.jit.script(make())
    with pytest.raises(RuntimeError, match="torch.jit.script cannot compile"):
        torch.jit.script(torch.nn.Sequential(make()))
