"""qpeft.nn modules: Linear4bit (bitsandbytes state-dict interop), QLoRALinear (LoRA, rsLoRA,
dropout, DoRA, merge, BitFit, named adapters), IA3Linear; gradients against the fp64 oracle of
tests/_helpers.py on every backend that runs the fused op on CPU.

Backends: "default" (the pure-torch reference), "auto" (no backend forced: what users get; the
fastest registered CPU kernel), and conftest.QLORA_BACKENDS: "cpu" (the native CPU kernel) and
"triton" under the interpreter.
"""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qpeft
from qpeft.functional import dequantize_4bit
from qpeft.nn import IA3Linear, Linear4bit, QLoRALinear
from qpeft.nn.weight_rows import row_norms, weight_rows

from ._helpers import U32, assert_within, backend_oracle, bnb_linear
from ._helpers import oracle as _oracle
from .conftest import QLORA_BACKENDS

# every backend with a qlora_linear kernel (test_backends.py checks the list), and "auto"
BACKENDS = ["auto", *QLORA_BACKENDS]


def _backend(name: str):
    return contextlib.nullcontext() if name == "auto" else qpeft.use_backend(name)


def _linear(k: int, n: int, bias: bool = True, seed: int = 0, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.5)
        if bias:
            lin.bias.normal_()
    return lin.to(dtype)


def _randomize_b(layer: QLoRALinear, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))


def _fp32_bound(*products: torch.Tensor, k: int) -> torch.Tensor:
    """Worst-case fp32 error of a sum of dot products of length <= k whose |a|.|b| sums are
    given: (k + 2) roundings of 2^-24 each (one per product and per add, plus the final adds)."""
    return sum((k + 2) * U32 * p for p in products)


# --- gradients of the fused op through QLoRALinear against the fp64 oracle -------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_qlora_linear_grads_match_fp64_oracle(backend, dtype):
    """x [2, 5, 83] (K not a multiple of the blocksize), N = 45, r = 4, bias trained (BitFit):
    y, dx, dA, dB, dbias within the oracle's derived worst-case bounds."""
    k, n, r = 83, 45, 4
    layer = QLoRALinear.from_linear(_linear(k, n, seed=3), r=r, alpha=8, train_bias=True)
    _randomize_b(layer)
    if dtype == torch.bfloat16:
        # The Triton kernel multiplies in x's dtype: with bf16-representable fp32 adapters the
        # cast is exact and the oracle's bf16 bounds hold unchanged (as in test_qlora_triton).
        with torch.no_grad():
            for t in (layer.lora_A, layer.lora_B, layer.base_layer.bias):
                t.copy_(t.bfloat16().float())
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, k, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(2, 5, n, generator=g).to(dtype)
    with _backend(backend):
        y = layer(x)
        y.backward(dy)
    assert y.dtype == dtype and y.shape == (2, 5, n)
    base = layer.base_layer
    p = {
        "x": x.detach().reshape(-1, k),
        "a": layer.lora_A.detach(),
        "b": layer.lora_B.detach(),
        "bias": base.bias.detach(),
        "rank_scale": None,
        "out_scale": None,
        "dy": dy.reshape(-1, n),
        "scaling": layer.scaling,
        "w": dequantize_4bit(base.weight, base.quant_state, torch.float32).double(),
        "state": base.quant_state,
    }
    ref = backend_oracle(p, backend)
    assert_within(y.detach().reshape(-1, n), *ref["y"], "y")
    assert_within(x.grad.reshape(-1, k), *ref["dx"], "dx")
    assert_within(layer.lora_A.grad, *ref["dA"], "dA")
    assert_within(layer.lora_B.grad, *ref["dB"], "dB")
    assert_within(base.bias.grad, *ref["dbias"], "dbias")


@settings(max_examples=25)
@given(
    m=st.integers(1, 9),
    k=st.integers(1, 140),
    n=st.integers(1, 70),
    r=st.integers(1, 9),
    blocksize=st.sampled_from([32, 64, 128]),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    double_quant=st.booleans(),
    bias=st.booleans(),
    rslora=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_qlora_linear_random_shapes_match_oracle(
    m, k, n, r, blocksize, quant_type, double_quant, bias, rslora, seed
):
    """Random shapes (odd K and N, K below one block, r = 1) through QLoRALinear on the CPU path
    users get ("auto"): forward and all gradients within the fp64 oracle's bounds."""
    lin = _linear(k, n, bias=bias, seed=seed)
    layer = QLoRALinear.from_linear(
        lin,
        r=r,
        alpha=2 * r,
        quant_type=quant_type,
        blocksize=blocksize,
        double_quant=double_quant,
        use_rslora=rslora,
        train_bias=bias,
    )
    _randomize_b(layer, seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(m, k, generator=g, requires_grad=True)
    dy = torch.randn(m, n, generator=g)
    y = layer(x)
    y.backward(dy)
    base = layer.base_layer
    p = {
        "x": x.detach(),
        "a": layer.lora_A.detach(),
        "b": layer.lora_B.detach(),
        "bias": base.bias.detach() if bias else None,
        "rank_scale": None,
        "out_scale": None,
        "dy": dy,
        "scaling": layer.scaling,
        "w": base.dequantize(torch.float32).double(),
    }
    ref = _oracle(p, torch.float32, rounds_operands=False)
    assert_within(y.detach(), *ref["y"], "y")
    assert_within(x.grad, *ref["dx"], "dx")
    assert_within(layer.lora_A.grad, *ref["dA"], "dA")
    assert_within(layer.lora_B.grad, *ref["dB"], "dB")
    if bias:
        assert_within(base.bias.grad, *ref["dbias"], "dbias")


def _gradcheck_module(module: nn.Module, x: torch.Tensor, skip: tuple[str, ...] = ()) -> bool:
    """gradcheck of module(x) in x and every trainable parameter not in ``skip`` (via functional_call)."""
    names = [n for n, p in module.named_parameters() if p.requires_grad and not n.endswith(skip)]
    values = [module.get_parameter(n).detach().clone().requires_grad_() for n in names]

    def f(x, *ps):
        return torch.func.functional_call(module, dict(zip(names, ps)), (x,))

    return torch.autograd.gradcheck(f, (x, *values))


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_gradcheck_fp64_modules(kind):
    """torch.autograd.gradcheck in fp64 through the reference-backed op: LoRA (x, A, B, BitFit
    bias), DoRA (x, magnitude, bias: A and B are left out because DoRA detaches the weight norm
    from the graph, as PEFT and the paper do, so its gradient in A and B is deliberately not
    the finite-difference one) and IA3 (x and the scale vector)."""
    lin = _linear(7, 5, seed=2).double()
    if kind == "ia3":
        layer = IA3Linear.from_linear(lin).double()
        with torch.no_grad():
            layer.ia3_l.uniform_(0.5, 1.5)
    else:
        layer = QLoRALinear.from_linear(lin, r=2, alpha=3, use_dora=kind == "dora", train_bias=True).double()
        _randomize_b(layer)
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    with qpeft.use_backend("default"):
        assert _gradcheck_module(layer, x, skip=("lora_A", "lora_B") if kind == "dora" else ())


def test_autocast_equals_explicit_bf16_input():
    """Under CPU autocast(bf16) the layer computes what an explicit bf16 input gives (autocast
    casts F.linear's input); x.grad comes back in x's dtype, LoRA grads in fp32."""
    layer = QLoRALinear.from_linear(_linear(64, 32, seed=4), r=4)
    _randomize_b(layer)
    x = torch.randn(6, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    ga, gx = layer.lora_A.grad.clone(), x.grad.clone()
    layer.zero_grad()
    xb = x.detach().bfloat16().requires_grad_()
    y2 = layer(xb)
    y2.float().sum().backward()
    assert torch.equal(y, y2)
    assert gx.dtype == torch.float32 and torch.equal(gx, xb.grad.float())
    assert layer.lora_A.grad.dtype == torch.float32 and torch.equal(ga, layer.lora_A.grad)


@pytest.mark.parametrize("compute_dtype", [None, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_autocast_output_dtype_is_one_rule(compute_dtype):
    # autocast's dtype under autocast, as F.linear's, on every path: Linear4bit with
    # compute_dtype cast y back to x's fp32 (and so did QLoRALinear in eval, not in training
    # with dropout, whose path honoured autocast)
    lin = _linear(64, 48, seed=16)
    layers = {
        "Linear4bit": Linear4bit.from_linear(lin, compute_dtype=compute_dtype),
        "QLoRALinear": QLoRALinear.from_linear(lin, r=4, dropout=0.1, compute_dtype=compute_dtype),
        "DoRA": QLoRALinear.from_linear(lin, r=4, dropout=0.1, use_dora=True, compute_dtype=compute_dtype),
        "IA3Linear": IA3Linear.from_linear(lin, compute_dtype=compute_dtype),
    }
    for x_dtype in (torch.float32, torch.float16):
        x = torch.randn(20, 64, dtype=x_dtype)
        for name, layer in layers.items():
            for training in (False, True):
                layer.train(training)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    want = F.linear(x, lin.weight).dtype
                    assert layer(x).dtype == want == torch.bfloat16, (name, training, x_dtype)
                    assert layer(x[:2]).dtype == want, (name, training, "GEMV rows")
                # outside autocast: x's dtype, as before
                assert layer(x).dtype == x_dtype, (name, training)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_matches_eager(compiler):
    """The layer traces under torch.compile (fake impls of the ops, no graph break with
    fullgraph=True); the compiled forward and backward run the same kernels around nothing
    inductor could reorder, so they are bit-identical to eager (inductor: ~5 s of C++ build)."""
    layer = QLoRALinear.from_linear(_linear(64, 48, seed=6), r=4)
    _randomize_b(layer)
    x = torch.randn(5, 64, requires_grad=True)
    compiled = torch.compile(layer, backend=compiler, fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    ga, gx = layer.lora_A.grad.clone(), x.grad.clone()
    layer.zero_grad()
    x.grad = None
    y_ref = layer(x)
    y_ref.sum().backward()
    assert torch.equal(y, y_ref) and torch.equal(ga, layer.lora_A.grad) and torch.equal(gx, x.grad)


# --- Linear4bit and bitsandbytes -------------------------------------------------------------
@pytest.fixture
def bnb():
    """bitsandbytes, for the tests that compare with it (the others run without it)."""
    return pytest.importorskip("bitsandbytes")


def _state_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    "quant_type,double_quant,blocksize", [("nf4", True, 64), ("fp4", False, 128), ("nf4", False, 32)]
)
def test_linear4bit_same_bytes_as_bitsandbytes(bnb, quant_type, double_quant, blocksize):
    """Quantizing one weight with both libraries gives identical packed bytes and state dicts."""
    lin = _linear(83, 45, seed=7)
    ours = Linear4bit.from_linear(lin, quant_type, blocksize, double_quant)
    theirs = bnb_linear(lin, quant_type, double_quant, blocksize)
    _state_equal(ours.state_dict(), theirs.state_dict())


def test_bitsandbytes_state_dict_loads_into_linear4bit_and_back(bnb, tmp_path):
    """bitsandbytes -> qpeft with load_state_dict (strict), qpeft -> bitsandbytes with
    Params4bit.from_prequantized (how transformers loads 4-bit checkpoints), both through a
    safetensors file; the outputs agree within fp32 rounding of the same dequantized W."""
    st = pytest.importorskip("safetensors.torch")
    lin = _linear(128, 40, seed=8)
    theirs = bnb_linear(lin)
    st.save_file(theirs.state_dict(), tmp_path / "bnb.safetensors")
    ours = Linear4bit(128, 40)
    ours.load_state_dict(st.load_file(tmp_path / "bnb.safetensors"))
    x = torch.randn(9, 128)
    w = ours.dequantize(torch.float32)
    tol = _fp32_bound(x.abs() @ w.abs().T + ours.bias.abs(), k=128)
    assert torch.equal(ours.weight.packed, theirs.weight.data)  # the same codes (Weight4bit.packed)
    assert bool(((ours(x) - theirs(x)).abs() <= 2 * tol).all())  # each within tol of the exact value

    ours2 = Linear4bit.from_linear(_linear(128, 40, seed=9))
    st.save_file(ours2.state_dict(), tmp_path / "qpeft.safetensors")
    sd = st.load_file(tmp_path / "qpeft.safetensors")
    back = bnb.nn.Linear4bit(128, 40, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    back.weight = bnb.nn.Params4bit.from_prequantized(
        data=sd["weight"],
        quantized_stats={k: v for k, v in sd.items() if k.startswith("weight.")},
        requires_grad=False,
        device="cpu",
        module=back,
    )
    back.bias = nn.Parameter(sd["bias"], requires_grad=False)
    w2 = ours2.dequantize(torch.float32)
    assert torch.equal(bnb.functional.dequantize_4bit(back.weight.data, back.weight.quant_state), w2)
    tol = _fp32_bound(x.abs() @ w2.abs().T + ours2.bias.abs(), k=128)
    assert bool(((ours2(x) - back(x)).abs() <= 2 * tol).all())


def test_linear4bit_forward_dtype_moves_and_plain_state_dict():
    lin = _linear(64, 16, seed=10)
    layer = Linear4bit.from_linear(lin)
    x = torch.randn(3, 64)
    w = layer.dequantize(torch.float32)
    ref = x.double() @ w.double().T + lin.bias.double()
    tol = _fp32_bound(x.abs() @ w.abs().T + lin.bias.abs(), k=64)
    assert_within(layer(x), ref, tol.double(), "Linear4bit forward")
    # .to(bf16) casts the bias, never the packed codes or the fp32 statistics
    half = copy.deepcopy(layer).to(torch.bfloat16)
    # the Weight4bit's dtype is relabelled (what it dequantizes to); the codes and statistics stay
    assert half.weight.dtype == torch.bfloat16 and half.weight.packed.dtype == torch.uint8
    assert half.quant_state.absmax.dtype == torch.uint8
    assert half.quant_state.state2.absmax.dtype == torch.float32 and half.bias.dtype == torch.bfloat16
    assert half(x.bfloat16()).dtype == torch.bfloat16
    # a plain nn.Linear state dict is quantized on load
    fresh = Linear4bit(64, 16)
    fresh.load_state_dict(lin.state_dict())
    assert torch.equal(fresh.weight, layer.weight) and torch.equal(fresh(x), layer(x))
    assert not any(p.requires_grad for p in layer.parameters())


def test_linear4bit_bad_inputs():
    layer = Linear4bit.from_linear(_linear(64, 16))
    with pytest.raises(ValueError, match=r"in_features=64.*got an input with 63 features"):
        layer(torch.randn(2, 63))
    with pytest.raises(TypeError, match="nn.Linear"):
        Linear4bit.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="quant_type"):
        Linear4bit.from_linear(_linear(64, 16), quant_type="int4")
    other = Linear4bit.from_linear(_linear(32, 16))
    with pytest.raises(RuntimeError, match=r"has shape \(16, 32\) but this layer is \(16, 64\)"):
        layer.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="non-finite"):
        bad = _linear(64, 16)
        bad.weight.data[3, 5] = float("nan")
        Linear4bit.from_linear(bad)


# --- QLoRALinear -----------------------------------------------------------------------------
def test_init_scaling_and_zero_start():
    lin = _linear(256, 48, seed=11)
    layer = QLoRALinear.from_linear(lin, r=8, alpha=16)
    x = torch.randn(4, 256)
    assert layer.lora_A.shape == (8, 256) and layer.lora_B.shape == (48, 8)
    assert layer.lora_A.dtype == torch.float32
    assert float(layer.lora_A.detach().abs().max()) <= 1 / math.sqrt(256)  # Kaiming-uniform(a=sqrt(5)) bound
    assert torch.equal(layer.lora_B, torch.zeros(48, 8))
    assert torch.equal(layer(x), layer.base_layer(x))  # B = 0 contributes exact zeros
    assert layer.scaling == 2.0
    assert QLoRALinear.from_linear(lin, r=16, alpha=16, use_rslora=True).scaling == 4.0  # alpha / sqrt(r)
    gauss = QLoRALinear.from_linear(lin, r=4, init="gaussian")
    # N(0, 1/r): 1024 samples, the sample std lies within 10% of 0.25 with overwhelming odds
    assert 0.9 * 0.25 < float(gauss.lora_A.detach().std()) < 1.1 * 0.25
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"adapters.default.lora_A", "adapters.default.lora_B"}


def _ref_lora(layer: QLoRALinear, x: torch.Tensor, xl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 x W^T + bias + s B A xl and an fp32 error bound."""
    w = layer.base_layer.dequantize(torch.float32) if layer.quantized else layer.base_layer.weight.float()
    a, b, s = layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling
    bias = layer.bias.detach() if layer.bias is not None else torch.zeros(w.shape[0])
    ref = x.double() @ w.double().T + bias.double() + s * (xl.double() @ a.double().T) @ b.double().T
    k, r = w.shape[1], a.shape[0]
    lora_mag = s * (xl.abs() @ a.abs().T) @ b.abs().T
    tol = _fp32_bound(x.abs() @ w.abs().T + bias.abs(), lora_mag, k=k + r)
    return ref, tol.double()


def test_dropout_applies_to_the_lora_branch_only():
    layer = QLoRALinear.from_linear(_linear(96, 40, seed=12), r=4, dropout=0.5)
    _randomize_b(layer)
    x = torch.randn(6, 96)
    layer.train()
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    xd = F.dropout(x, 0.5, training=True)
    assert not torch.equal(xd, x)
    assert_within(y, *_ref_lora(layer, x, xd), "train-mode dropout")
    layer.eval()
    assert_within(layer(x), *_ref_lora(layer, x, x), "eval mode")


def test_lora_over_16bit_base_matches_peft():
    peft = pytest.importorskip("peft")
    lin = _linear(64, 24, seed=13)
    layer = QLoRALinear.from_linear(lin, r=4, alpha=8, quantize=False)
    _randomize_b(layer)
    x = torch.randn(5, 64)
    assert_within(layer(x), *_ref_lora(layer, x, x), "16-bit base")
    host = nn.Sequential()
    host.add_module("lin", copy.deepcopy(lin))
    pm = peft.get_peft_model(host, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"]))
    with torch.no_grad():
        pm.base_model.model.lin.lora_A["default"].weight.copy_(layer.lora_A)
        pm.base_model.model.lin.lora_B["default"].weight.copy_(layer.lora_B)
    assert_within(pm(x), *_ref_lora(layer, x, x), "PEFT")


@pytest.mark.parametrize("quantize", [True, False], ids=["4bit", "16bit"])
@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_non_float_input_is_refused_over_any_base(kind, quantize):
    # the 16-bit base cast the result back to x's dtype: an int x gave the output truncated,
    # a bool x "!= 0", a list an AttributeError; the 4-bit base refused them
    lin = _linear(4, 3, seed=15)
    if kind == "ia3":
        layer = IA3Linear.from_linear(lin, quantize=quantize)
    else:
        layer = QLoRALinear.from_linear(lin, r=2, quantize=quantize, use_dora=kind == "dora")
    for x in (
        torch.tensor([[1, 2, 3, 4]]),
        torch.ones(1, 4, dtype=torch.bool),
        torch.ones(1, 4, dtype=torch.cfloat),
    ):
        with pytest.raises(TypeError, match="x must be a floating-point tensor"):
            layer(x)
    with pytest.raises(TypeError, match="expects a tensor"):
        layer([[1.0, 2.0, 3.0, 4.0]])
    layer.disable_adapters()
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        layer(torch.tensor([[1, 2, 3, 4]]))


@pytest.mark.parametrize("quantize", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dora_matches_peft(quantize, dropout):
    """DoRA (with and without dropout, train mode) against PEFT's DoRA over an nn.Linear holding
    the dequantized weight, same A, B, magnitude and dropout mask (same RNG draws)."""
    peft = pytest.importorskip("peft")
    lin = _linear(70, 36, seed=14)
    layer = QLoRALinear.from_linear(lin, r=4, alpha=8, dropout=dropout, use_dora=True, quantize=quantize)
    base_w = layer.base_layer.dequantize(torch.float32) if quantize else lin.weight.detach()
    # magnitude starts at the row norms of W (B = 0): the output is unchanged
    expect = torch.linalg.vector_norm(base_w.double(), dim=1)
    assert_within(
        layer.adapters["default"].magnitude.detach(), expect, 71 * U32 * expect, "initial magnitude"
    )
    _randomize_b(layer)
    with torch.no_grad():
        layer.adapters["default"].magnitude.mul_(torch.linspace(0.8, 1.2, 36))
    host = nn.Sequential()
    host.add_module("lin", nn.Linear(70, 36))
    with torch.no_grad():
        host.lin.weight.copy_(base_w)
        host.lin.bias.copy_(lin.bias)
    pm = peft.get_peft_model(
        host, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], use_dora=True, lora_dropout=dropout)
    )
    pl = pm.base_model.model.lin
    with torch.no_grad():
        pl.lora_A["default"].weight.copy_(layer.lora_A)
        pl.lora_B["default"].weight.copy_(layer.lora_B)
        pl.lora_magnitude_vector["default"].weight.copy_(layer.adapters["default"].magnitude)
    x = torch.randn(2, 4, 70)
    layer.train(), pm.train()
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    y_peft = pm(x)
    # Both sides are fp32 evaluations of y = base(x) + (q - 1) * xd W^T + q * s * B A xd with
    # q = m / ||W + s B A||_row (without dropout: q * (x W^T + s B A x) + bias). Each is within
    # (K + r + 4) u32 of the magnitudes of its terms (dots of K = 70 and r = 4 terms, the adds),
    # plus the norm's relative error ((K + 4) u32: a sum of 70 squares and a sqrt) times q * |z|;
    # |xd| <= |x| / (1 - p). The two differ by at most twice that.
    q = (
        layer.adapters["default"].magnitude.detach()
        / row_norms(layer.base_layer, layer.lora_A, layer.lora_B, layer.scaling)
    ).abs()
    xa = x.abs().reshape(-1, 70)
    xd = xa / (1 - dropout)
    z = (
        xd @ base_w.abs().T
        + layer.scaling * (xd @ layer.lora_A.detach().abs().T) @ layer.lora_B.detach().abs().T
    )
    total = xa @ base_w.abs().T + lin.bias.abs() + (q + (q - 1).abs()) * z
    tol = (70 + 4 + 4) * U32 * total + (70 + 4) * U32 * q * z
    diff = (y - y_peft).abs().reshape(-1, 36)
    assert bool((diff <= 2 * tol).all()), float((diff / tol).max())
    y.sum().backward()
    assert layer.adapters["default"].magnitude.grad is not None and layer.lora_A.grad is not None


def test_row_norms_chunked_equals_whole():
    """Row chunks (K = 83, blocksize 64: chunks of 64 rows so blocks never straddle a chunk
    start) decode to exactly the whole dequantized weight, so the norms are bit-identical."""
    layer = Linear4bit.from_linear(_linear(83, 150, seed=15), blocksize=64)
    whole = torch.cat([w for _, _, w in weight_rows(layer, chunk_elements=10**9)])
    chunks = list(weight_rows(layer, chunk_elements=64 * 83))
    assert len(chunks) == 3 and [c[0] for c in chunks] == [0, 64, 128]
    assert torch.equal(torch.cat([w for _, _, w in chunks]), whole)
    assert torch.equal(whole, layer.dequantize(torch.float32))
    assert torch.equal(row_norms(layer, chunk_elements=83), row_norms(layer))


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_reports_error_and_unmerge_restores(use_dora):
    layer = QLoRALinear.from_linear(_linear(128, 64, seed=16), r=4, use_dora=use_dora)
    _randomize_b(layer)
    x = torch.randn(8, 128)
    y = layer(x)
    packed, state = layer.base_layer.weight.clone(), layer.base_layer.quant_state
    report = layer.merge()
    # the exact merged weight, and what requantization made of it
    ad = layer.adapters["default"]
    exact = state_w = dequantize_4bit(packed, state, torch.float32)
    exact = state_w + ad.scaling * ad.lora_B.detach() @ ad.lora_A.detach()
    if use_dora:
        exact = exact * (ad.magnitude.detach() / torch.linalg.vector_norm(exact, dim=1))[:, None]
    err = layer.base_layer.dequantize(torch.float32) - exact
    assert report is layer.merge_report
    assert math.isclose(report.max_abs, float(err.abs().max()), rel_tol=1e-6)
    assert math.isclose(report.relative, float(err.norm() / exact.norm()), rel_tol=1e-5)
    # NF4 relative error of a Gaussian-like weight is about 0.1 (SQNR ~20 dB)
    assert 0.01 < report.relative < 0.2
    merged_y = layer(x)
    # merged forward = x @ Q(W')^T + bias (the base layer alone), within fp32 rounding
    wq = layer.base_layer.dequantize(torch.float32)
    ref = x.double() @ wq.double().T + layer.bias.detach().double()
    assert_within(
        merged_y, ref, _fp32_bound(x.abs() @ wq.abs().T + layer.bias.detach().abs(), k=128).double(), "merged"
    )
    with pytest.raises(RuntimeError, match="merged"):
        layer.set_adapter(None)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, packed) and layer.base_layer.quant_state is state
    assert torch.equal(layer(x), y)
    # without the kept original, unmerge subtracts and requantizes again (and says how much it lost)
    layer.merge(keep_original=False)
    again = layer.unmerge()
    assert again.relative > 0 and layer.merged_adapter is None


def test_merge_refused_while_disabled():
    """A disabled layer gives the base layer's output; merging would change that."""
    import qpeft

    layer = QLoRALinear.from_linear(_linear(64, 32, seed=18), r=4)
    _randomize_b(layer)
    x = torch.randn(3, 64)
    base = layer.base_layer(x)
    layer.disable_adapters()
    with pytest.raises(RuntimeError, match="adapters are disabled"):
        layer.merge()
    assert layer.merged_adapter is None and torch.equal(layer(x), base)
    model = torch.nn.Sequential(
        QLoRALinear.from_linear(_linear(64, 64, seed=19), r=4), QLoRALinear.from_linear(_linear(64, 32), r=4)
    )
    model[1].disable_adapters()
    with pytest.raises(RuntimeError, match="1: adapters are disabled"):
        qpeft.merge_adapters(model)
    assert model[0].merged_adapter is None  # nothing merged
    model[1].enable_adapters()
    model[1].merge()
    with pytest.raises(RuntimeError, match="1: adapter 'default' is already merged"):
        qpeft.merge_adapters(model)
    assert model[0].merged_adapter is None


def test_merge_16bit_base_round_trip():
    lin = _linear(64, 32, seed=17)
    layer = QLoRALinear.from_linear(lin, r=4, quantize=False)
    _randomize_b(layer)
    x = torch.randn(5, 64)
    ref, tol = _ref_lora(layer, x, x)
    w0 = lin.weight.detach().clone()
    assert layer.merge() == qpeft.nn.MergeReport(0.0, 0.0, 0.0)
    # merged: x (W + s B A)^T with W + sBA rounded to fp32 once per element
    extra = (
        x.abs() @ (w0.abs() + layer.scaling * layer.lora_B.detach().abs() @ layer.lora_A.detach().abs()).T
    ) * U32
    assert_within(layer(x), ref, tol + extra.double(), "merged")
    layer.unmerge()
    # fp32((W + sBA) - sBA): two roundings of magnitude <= |W| + |sBA|, and sBA's own r-term dot
    sba = layer.scaling * layer.lora_B.detach().abs() @ layer.lora_A.detach().abs()
    assert_within(
        lin.weight.detach(),
        w0.double(),
        (2 * U32 * (w0.abs() + sba) + 2 * (4 + 2) * U32 * sba).double(),
        "unmerged",
    )


def test_bitfit_bias_gradient():
    layer = QLoRALinear.from_linear(_linear(64, 20, seed=18), r=2, train_bias=True)
    assert layer.bias.requires_grad
    x = torch.randn(2, 3, 64)
    dy = torch.randn(2, 3, 20)
    layer(x).backward(dy)
    # a sum of 6 fp32 terms: at most 6 roundings of the running |sum| <= sum |dy|
    dyr = dy.reshape(-1, 20)
    assert_within(layer.bias.grad, dyr.double().sum(0), (6 * U32 * dyr.abs().sum(0)).double(), "dbias")
    with pytest.raises(ValueError, match="BitFit"):
        QLoRALinear.from_linear(_linear(64, 20, bias=False), train_bias=True)


def test_named_adapters_set_and_disable():
    lin = _linear(64, 32, seed=19)
    layer = QLoRALinear.from_linear(lin, r=4)
    _randomize_b(layer, seed=1)
    second = layer.add_adapter("second", r=2, alpha=4)
    assert not second.lora_A.requires_grad  # added, not active
    layer.set_adapter("second")
    _randomize_b(layer, seed=2)
    x = torch.randn(4, 64)
    y2 = layer(x)
    assert_within(y2, *_ref_lora(layer, x, x), "second adapter")
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"adapters.second.lora_A", "adapters.second.lora_B"}
    layer.set_adapter("default")
    assert_within(layer(x), *_ref_lora(layer, x, x), "default adapter")
    layer.disable_adapters()
    assert torch.equal(layer(x), layer.base_layer(x))
    assert torch.equal(layer(x), Linear4bit.from_linear(lin)(x))  # exactly the quantized base output
    layer.enable_adapters()
    layer.delete_adapter("second")
    with pytest.raises(KeyError, match="second"):
        layer.set_adapter("second")


def test_qlora_state_dict_round_trip():
    layer = QLoRALinear.from_linear(_linear(64, 32, seed=20), r=4, use_dora=True)
    _randomize_b(layer)
    sd = layer.state_dict()
    assert "base_layer.weight.quant_state.bitsandbytes__nf4" in sd and "adapters.default.magnitude" in sd
    fresh = QLoRALinear(Linear4bit(64, 32), r=4, use_dora=True)
    fresh.load_state_dict(sd)
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), layer(x))


def test_ia3_output_scaling_matches_peft():
    peft = pytest.importorskip("peft")
    lin = _linear(64, 24, seed=21)
    layer = IA3Linear.from_linear(lin)
    with torch.no_grad():
        layer.ia3_l.uniform_(0.5, 1.5)
    x = torch.randn(5, 64)
    w = layer.base_layer.dequantize(torch.float32)
    base = x.double() @ w.double().T + lin.bias.double()
    ref = base * layer.ia3_l.detach().double()
    # the base's fp32 error scaled by l (<= 1.5), plus the rounding of the product with l
    tol = _fp32_bound(x.abs() @ w.abs().T + lin.bias.abs(), k=64).double() * 1.5 + U32 * ref.abs()
    y = layer(x)  # training path: base(x) * l in torch, l gets a gradient
    assert_within(y, ref, tol, "IA3 (trainable l)")
    with torch.no_grad():
        assert_within(layer(x), ref, tol, "IA3 (fused out_scale)")
    y.backward(torch.ones_like(y))
    # dl = sum over the 5 rows of x W^T + bias: one more sum of 5 terms on top of each dot
    tol_dl = _fp32_bound(x.abs().sum(0) @ w.abs().T + 5 * lin.bias.abs(), k=64 + 5).double()
    assert_within(layer.ia3_l.grad, base.sum(0), tol_dl, "dl")
    host = nn.Sequential()
    host.add_module("lin", nn.Linear(64, 24))
    with torch.no_grad():
        host.lin.weight.copy_(w)
        host.lin.bias.copy_(lin.bias)
    pm = peft.get_peft_model(host, peft.IA3Config(target_modules=["lin"], feedforward_modules=[]))
    with torch.no_grad():
        pm.base_model.model.lin.ia3_l["default"].copy_(layer.ia3_l.detach().reshape(-1, 1))
    assert_within(pm(x), ref, tol, "PEFT IA3")
    layer.disable_adapters()
    assert torch.equal(layer(x), layer.base_layer(x))


def test_qlora_bad_inputs():
    lin = _linear(64, 32)
    layer = QLoRALinear.from_linear(lin, r=4)
    with pytest.raises(ValueError, match=r"in_features=64.*got an input with 65 features"):
        layer(torch.randn(2, 65))
    for r in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            QLoRALinear.from_linear(lin, r=r)
    with pytest.raises(TypeError, match="nn.Linear"):
        QLoRALinear.from_linear(nn.Embedding(10, 4))
    with pytest.raises(ValueError, match="init"):
        QLoRALinear.from_linear(lin, init="orthogonal")
    with pytest.raises(ValueError, match="dropout"):
        QLoRALinear.from_linear(lin, dropout=1.0)
    with pytest.raises(ValueError, match="already has an adapter"):
        layer.add_adapter("default")
    with pytest.raises(RuntimeError, match="no adapter is merged"):
        layer.unmerge()


@pytest.mark.parametrize("cls", [Linear4bit, QLoRALinear])
def test_meta_inputs_give_meta_outputs(cls):
    # as nn.Linear on the meta device (shape inference, FSDP2 / tracing of meta models): a
    # meta input gives a correctly-shaped meta output, forward and backward, not autocast's
    # "unknown device type" error
    with torch.device("meta"):
        lin = nn.Linear(128, 64)
    layer = cls.from_linear(lin) if cls is Linear4bit else cls.from_linear(lin, r=4)
    for shape in ((3, 128), (2, 20, 128), (128,)):
        for needs_grad in (False, True):
            x = torch.randn(*shape, device="meta", requires_grad=needs_grad)
            y = layer(x)
            assert y.device.type == "meta" and y.shape == lin(x).shape and y.dtype == torch.float32
            if needs_grad:
                y.sum().backward()
                assert x.grad.device.type == "meta" and x.grad.shape == x.shape
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast on for cpu leaves meta alone
        assert layer(torch.randn(3, 128, device="meta")).dtype == torch.float32
