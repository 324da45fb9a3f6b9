"""The registered ops: torch.library.opcheck on each, and torch.compile(fullgraph)."""

from __future__ import annotations

import pytest
import torch

import qpeft  # noqa: F401
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
