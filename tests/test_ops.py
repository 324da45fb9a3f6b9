"""The registered ops: torch.library.opcheck on each, and torch.compile(fullgraph)."""

from __future__ import annotations

import pytest
import torch

import qpeft
from qpeft._formats import dynamic_map

from .conftest import CPU_BACKENDS, assert_bits_equal


def _op_samples():
    x = torch.randn(37, 19, dtype=torch.bfloat16)
    packed, absmax = torch.ops.qpeft.quantize_4bit.default(x, 64, "nf4")
    code = dynamic_map()
    q, nested_absmax = torch.ops.qpeft.quantize_blockwise.default(absmax - absmax.mean(), code, 256)
    offset = absmax.mean().reshape(1)
    return [
        (torch.ops.qpeft.quantize_4bit.default, (x, 64, "nf4")),
        (torch.ops.qpeft.quantize_4bit.default, (x.float(), 32, "fp4")),
        (torch.ops.qpeft.dequantize_4bit.default, (packed, absmax, 64, "nf4", [37, 19], torch.float16)),
        (
            torch.ops.qpeft.dequantize_4bit_nested.default,
            (packed, q, nested_absmax, code, offset, 64, 256, "nf4", [37, 19], torch.bfloat16),
        ),
        (torch.ops.qpeft.quantize_blockwise.default, (x, code, 128)),
        (torch.ops.qpeft.dequantize_blockwise.default, (q, nested_absmax, code, 256, torch.float32)),
        (torch.ops.qpeft.dequantize_4bit_out.default, (packed, absmax, 64, "nf4", torch.empty(37, 19))),
        (
            torch.ops.qpeft.dequantize_4bit_nested_out.default,
            (
                packed,
                q,
                nested_absmax,
                code,
                offset,
                64,
                256,
                "nf4",
                torch.empty(37, 19, dtype=torch.bfloat16),
            ),
        ),
        (
            torch.ops.qpeft.dequantize_blockwise_out.default,
            (q, nested_absmax, code, 256, torch.empty(q.shape)),
        ),
    ]


@pytest.mark.parametrize("backend", ["default", *CPU_BACKENDS], indirect=True)
@pytest.mark.parametrize("index", range(9))
def test_opcheck(backend, index):
    op, args = _op_samples()[index]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", ["default", *CPU_BACKENDS], indirect=True)
def test_ops_compile_fullgraph(backend):
    torch._dynamo.reset()
    code = dynamic_map()

    # The offset (a mean) is computed outside: inductor may sum in another order than
    # eager torch, and the double-quant statistics would then differ in the last bit.
    def roundtrip(x, offset):
        packed, absmax = torch.ops.qpeft.quantize_4bit(x, 64, "nf4")
        q, nested = torch.ops.qpeft.quantize_blockwise(absmax - offset, code, 256)
        w = torch.ops.qpeft.dequantize_4bit_nested(
            packed, q, nested, code, offset.reshape(1), 64, 256, "nf4", list(x.shape), torch.float32
        )
        w2 = torch.ops.qpeft.dequantize_4bit(packed, absmax, 64, "nf4", list(x.shape), torch.float32)
        a = torch.ops.qpeft.dequantize_blockwise(q, nested, code, 256, torch.float32)
        return w, w2, a

    x = torch.randn(128, 96)
    offset = torch.ops.qpeft.quantize_4bit(x, 64, "nf4")[1].mean()
    compiled = torch.compile(roundtrip, fullgraph=True, backend="inductor")
    for got, want in zip(compiled(x, offset), roundtrip(x, offset)):
        assert_bits_equal(got, want, "compiled vs eager")


def test_out_variants_bump_the_version_counter():
    """The out= ops write through a raw pointer; like any in-place torch op they bump
    out's version, so autograd notices a saved tensor that was overwritten."""
    for op, args in _op_samples()[6:]:
        out = args[-1]
        before = out._version
        op(*args)
        assert out._version > before, op


def test_quantization_ops_are_not_differentiable():
    """No autograd formula: outputs of the quantization ops never require grad, even
    for an input that does (a weight being quantized)."""
    w = torch.randn(64, 64, requires_grad=True)
    packed, absmax = torch.ops.qpeft.quantize_4bit(w, 64, "nf4")
    assert not packed.requires_grad and not absmax.requires_grad
    w_hat = torch.ops.qpeft.dequantize_4bit(packed, absmax, 64, "nf4", [64, 64], torch.float32)
    assert not w_hat.requires_grad


# --- the layer ops: fake impl vs every backend (dtypes, shapes, strides) -----------------


def _layer(n, k, r, dtype, nested=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    packed, st = qpeft.functional.quantize_4bit(torch.randn(n, k, generator=g), 64, "nf4", nested)
    if nested:
        quant = (packed, st.absmax, st.state2.absmax, st.state2.code, st.offset.reshape(1), 64, 256)
    else:
        quant = (packed, st.absmax, None, None, None, 64, 256)
    a = (torch.randn(r, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, r, generator=g).to(dtype)
    return (*quant, "nf4", n, k), a, b


# (M, N, K, r, dtype, nested): the CPU backend's paths. 5x48x80 bf16/fp16: the one-call small
# backward (it returned fp32 dA/dB); 3x256x512: the GEMV forward (xa a transposed view);
# 40x128x64: the fp32 merge of the LoRA term into W (xa a transposed view too).
_LAYER_CASES = [
    (5, 48, 80, 4, torch.bfloat16, False),
    (5, 48, 80, 4, torch.float16, True),
    (3, 256, 512, 4, torch.float32, False),
    (40, 128, 64, 8, torch.float32, True),
]


@pytest.mark.parametrize("backend", ["default", *CPU_BACKENDS, "cuda_emulated"], indirect=True)
@pytest.mark.parametrize("case", _LAYER_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{str(c[4])[6:]}")
def test_opcheck_layer_ops(backend, case):
    """opcheck (the fake's dtypes, shapes and strides against the kernel's) of qlora_linear,
    qlora_linear_backward and gemv_4bit on each CPU path."""
    m, n, k, r, dtype, nested = case
    quant, a, b = _layer(n, k, r, dtype, nested)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    fwd = (x, *quant, a, b, 0.5, bias, None, None, True)
    y, xa = torch.ops.qpeft.qlora_linear(*fwd)
    assert xa.is_contiguous() and xa.shape == (m, r) and xa.dtype == dtype
    torch.library.opcheck(torch.ops.qpeft.qlora_linear.default, fwd)
    bwd = (torch.randn(m, n).to(dtype), x, *quant, a, b, xa, 0.5, None, None, True, True, True, True)
    dx, da, db, dbias = torch.ops.qpeft.qlora_linear_backward(*bwd)
    assert (dx.dtype, da.dtype, db.dtype, dbias.dtype) == (dtype,) * 4
    torch.library.opcheck(torch.ops.qpeft.qlora_linear_backward.default, bwd)
    if m <= 8:
        torch.library.opcheck(torch.ops.qpeft.gemv_4bit.default, (x, *quant))


def test_cpu_small_backward_matches_the_reference_dtypes_and_values():
    """The one-call small backward returned fp32 dA/dB for bf16 LoRA weights: the fake
    (and the reference) say the LoRA dtype, so a compiled graph read them wrong."""
    quant, a, b = _layer(48, 80, 4, torch.bfloat16)
    x = torch.randn(5, 80, dtype=torch.bfloat16)
    args = (torch.randn(5, 48, dtype=torch.bfloat16), x, *quant, a, b, x @ a.t(), 0.5, None, None)
    args += (True, True, True, True)
    with qpeft.use_backend("cpu"):
        got = torch.ops.qpeft.qlora_linear_backward(*args)
        torch._dynamo.reset()
        compiled = torch.compile(lambda *t: torch.ops.qpeft.qlora_linear_backward(*t)[1] * 2, fullgraph=True)
        assert_bits_equal(compiled(*args), got[1] * 2, "compiled dA")
    with qpeft.use_backend("default"):
        want = torch.ops.qpeft.qlora_linear_backward(*args)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2)


def test_compiled_qlora_training_step_at_the_gemv_shape():
    """torch.compile of a QLoRALinear(512 -> 256, r=4) training step with x [3, 512]: the
    CPU forward's xa was a transposed view there, and inductor's stride assertion failed."""
    from qpeft.nn import QLoRALinear

    torch.manual_seed(0)
    layer = QLoRALinear.from_linear(torch.nn.Linear(512, 256), r=4)
    with torch.no_grad():
        layer.lora_B.normal_()  # a non-zero up-projection, so dA is not zero
    x = torch.randn(3, 512)
    params = [p for p in layer.parameters() if p.requires_grad]

    def step(fn):
        xs = x.clone().requires_grad_()
        fn(xs).square().sum().backward()
        grads = [xs.grad] + [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return grads

    want = step(layer)
    torch._dynamo.reset()
    got = step(torch.compile(layer, fullgraph=True))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


# --- direct op calls: wrong dtypes and short buffers are errors naming the argument -------


def _bad_calls():
    packed, st = qpeft.functional.quantize_4bit(torch.randn(64, 64), 64, "nf4", False)
    pn, sn = qpeft.functional.quantize_4bit(torch.randn(64, 64), 64, "nf4", True)
    nested = (sn.absmax, sn.state2.absmax, sn.state2.code, sn.offset.reshape(1))
    q, absmax8 = torch.ops.qpeft.quantize_blockwise(torch.randn(300), dynamic_map(), 64)
    code10 = torch.arange(10.0)
    x, a, b = torch.randn(3, 64), torch.randn(4, 64), torch.randn(64, 4)
    quant = (packed, st.absmax, None, None, None, 64, 256, "nf4", 64, 64)
    ops = torch.ops.qpeft
    lora = (a, b, 0.5, None, None, None, True)
    bwd = (torch.randn(3, 64), x, *quant, a, b, torch.randn(3, 4), 0.5, None, None, True, True, True, True)
    return {
        # fp16 absmax of the right element count: half the bytes the kernels read
        "dequantize_4bit absmax fp16": (
            "absmax",
            lambda: ops.dequantize_4bit(packed, st.absmax.half(), 64, "nf4", [64, 64], torch.float32),
        ),
        "dequantize_4bit_out absmax fp16": (
            "absmax",
            lambda: ops.dequantize_4bit_out(packed, st.absmax.half(), 64, "nf4", torch.empty(64, 64)),
        ),
        "dequantize_4bit packed short": (
            "packed",
            lambda: ops.dequantize_4bit(packed[:-1], st.absmax, 64, "nf4", [64, 64], torch.float32),
        ),
        # a code map of 10 values indexed by codes up to 255
        "dequantize_blockwise code 10": (
            "code",
            lambda: ops.dequantize_blockwise(q, absmax8, code10, 64, torch.float32),
        ),
        "dequantize_blockwise_out code 10": (
            "code",
            lambda: ops.dequantize_blockwise_out(q, absmax8, code10, 64, torch.empty(300)),
        ),
        "dequantize_blockwise absmax fp16": (
            "absmax",
            lambda: ops.dequantize_blockwise(q, absmax8.half(), dynamic_map(), 64, torch.float32),
        ),
        "quantize_blockwise code 10": ("code", lambda: ops.quantize_blockwise(torch.randn(300), code10, 64)),
        # an empty nested_absmax read as "not nested": uint8 codes decoded as fp32 absmax
        "dequantize_4bit_nested empty nested_absmax": (
            "nested_absmax",
            lambda: ops.dequantize_4bit_nested(
                pn, nested[0], torch.ones(0), *nested[2:], 64, 256, "nf4", [64, 64], torch.float32
            ),
        ),
        "dequantize_4bit_nested fp32 absmax": (
            "absmax",
            lambda: ops.dequantize_4bit_nested(
                pn, nested[0].float(), *nested[1:], 64, 256, "nf4", [64, 64], torch.float32
            ),
        ),
        "dequantize_4bit_nested short nested_code": (
            "nested_code",
            lambda: ops.dequantize_4bit_nested(
                pn, *nested[:2], nested[2][:10], nested[3], 64, 256, "nf4", [64, 64], torch.float32
            ),
        ),
        "dequantize_4bit_nested fp16 offset": (
            "offset",
            lambda: ops.dequantize_4bit_nested(
                pn, *nested[:3], nested[3].half(), 64, 256, "nf4", [64, 64], torch.float32
            ),
        ),
        # int32 activations: the GEMV returned an int32 "result"
        "gemv_4bit int32 x": ("x", lambda: ops.gemv_4bit(torch.ones(1, 64, dtype=torch.int32), *quant)),
        "gemv_4bit partial nested": (
            "nested_absmax",
            lambda: ops.gemv_4bit(x, pn, nested[0], nested[1], None, None, 64, 256, "nf4", 64, 64),
        ),
        # x [3, 5, 64]: the CPU kernel returned [3, 64], the reference [3, 5, 64], the fake [3, 64]
        "qlora_linear 3-D x": ("x", lambda: ops.qlora_linear(torch.randn(3, 5, 64), *quant, *lora)),
        "qlora_linear absmax fp16": (
            "absmax",
            lambda: ops.qlora_linear(x, packed, st.absmax.half(), *quant[2:], *lora),
        ),
        "qlora_linear int lora_B": (
            "lora_B",
            lambda: ops.qlora_linear(x, *quant, a, b.int(), 0.5, None, None, None, True),
        ),
        "qlora_linear_backward short grad_y": (
            "grad_y",
            lambda: ops.qlora_linear_backward(bwd[0][:2], *bwd[1:]),
        ),
    }


@pytest.mark.parametrize("backend", ["default", *CPU_BACKENDS], indirect=True)
@pytest.mark.parametrize("case", list(_bad_calls()))
def test_direct_op_call_with_bad_arguments_raises(backend, case):
    """A direct torch.ops.qpeft.* call gets an error naming the argument on every backend,
    never a read out of bounds (a segfault, or garbage values) or a silently wrong shape."""
    name, call = _bad_calls()[case]
    with pytest.raises((TypeError, ValueError), match=rf"^{name}\b"):
        call()
