"""Bad input gets a clear Python exception naming the problem: one test per case."""

from __future__ import annotations

import pytest
import torch

import qpeft
import qpeft.functional as qf
from qpeft import BackendUnavailableError, QuantState

from .conftest import CPU_BACKENDS

pytestmark = pytest.mark.parametrize("backend", ["default", *CPU_BACKENDS], indirect=True)


@pytest.mark.parametrize(
    "x,kind",
    [
        (torch.arange(64, dtype=torch.int32), "torch.int32"),
        (torch.ones(64, dtype=torch.bool), "bool"),
        (torch.ones(64, dtype=torch.complex64), "complex"),
        (torch.ones(64, dtype=torch.float64), "float64"),
    ],
)
def test_non_float_input(backend, x, kind):
    with pytest.raises(TypeError, match=kind):
        qf.quantize_4bit(x)
    with pytest.raises(TypeError, match=kind):
        qf.quantize_blockwise(x)


def test_empty_input(backend):
    for fn in (qf.quantize_4bit, qf.quantize_blockwise):
        with pytest.raises(ValueError, match="empty"):
            fn(torch.empty(0, 16))


@pytest.mark.parametrize("blocksize", [0, 16, 100, 8192, -64])
def test_unsupported_blocksize(backend, blocksize):
    with pytest.raises(ValueError, match="blocksize"):
        qf.quantize_4bit(torch.randn(256), blocksize=blocksize)
    with pytest.raises(ValueError, match="blocksize"):
        qf.quantize_blockwise(torch.randn(256), blocksize=blocksize)


def test_unknown_quant_type(backend):
    with pytest.raises(ValueError, match="quant_type"):
        qf.quantize_4bit(torch.randn(256), quant_type="int4")


def test_truncated_absmax(backend):
    packed, state = qf.quantize_4bit(torch.randn(64, 64), double_quant=False)
    state.absmax = state.absmax[:-1]  # a corrupt checkpoint
    with pytest.raises(ValueError, match="absmax has 63 elements but 64"):
        qf.dequantize_4bit(packed, state)


def test_truncated_nested_absmax(backend):
    packed, state = qf.quantize_4bit(torch.randn(300, 256))
    state.state2.absmax = state.state2.absmax[:-1]
    with pytest.raises(ValueError, match="nested_absmax"):
        qf.dequantize_4bit(packed, state)


def test_packed_state_size_mismatch(backend):
    packed, state = qf.quantize_4bit(torch.randn(64, 64))
    with pytest.raises(ValueError, match="packed has 2047 elements but 2048"):
        qf.dequantize_4bit(packed[:-1], state)
    state.shape = torch.Size([64, 65])
    with pytest.raises(ValueError, match="disagree"):
        qf.dequantize_4bit(packed, state)


def test_wrong_packed_dtype(backend):
    # Another dtype is taken as bitsandbytes' quant_storage (the same bytes, viewed); values
    # converted to it hold 4x the bytes the state describes, and the size check says so.
    packed, state = qf.quantize_4bit(torch.randn(64), double_quant=False)
    with pytest.raises(ValueError, match="disagree"):
        qf.dequantize_4bit(packed.to(torch.int32), state)


def test_bad_out_dtype(backend):
    packed, state = qf.quantize_4bit(torch.randn(64))
    with pytest.raises(TypeError, match="output dtype"):
        qf.dequantize_4bit(packed, state, out_dtype=torch.int8)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_input_names_count_and_index(backend, value):
    x = torch.randn(10, 64)
    x[3, 17] = value
    x[7, 1] = value
    with pytest.raises(ValueError, match=r"2 non-finite value\(s\).*index \(3, 17\) \(flat 209\)"):
        qf.quantize_4bit(x)
    with pytest.raises(ValueError, match=r"2 non-finite"):
        qf.quantize_blockwise(x)
    packed, state = qf.quantize_4bit(x, allow_nonfinite=True, double_quant=False)
    out = qf.dequantize_4bit(packed, state)
    assert not bool(torch.isfinite(out[3]).all())
    assert bool(torch.isfinite(out[:3]).all())


def test_unsorted_code(backend):
    code = torch.linspace(-1, 1, 256).flip(0).contiguous()
    with pytest.raises(ValueError, match="sorted"):
        qf.quantize_blockwise(torch.randn(256), code=code)


def test_code_of_wrong_size(backend):
    with pytest.raises(ValueError, match="code has 16 elements but 256"):
        qf.quantize_blockwise(torch.randn(256), code=torch.linspace(-1, 1, 16))


def test_state_type(backend):
    with pytest.raises(TypeError, match="QuantState"):
        qf.dequantize_4bit(torch.zeros(4, 1, dtype=torch.uint8), {"absmax": torch.ones(1)})


def test_from_dict_errors(backend):
    packed, state = qf.quantize_4bit(torch.randn(64, 64))
    d = state.as_dict(packed=True)
    with pytest.raises(ValueError, match="neither a packed"):
        QuantState.from_dict({"absmax": d["absmax"]}, "cpu")
    bad = dict(d)
    bad["quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    with pytest.raises(ValueError, match="JSON"):
        QuantState.from_dict(bad, "cpu")
    bad = dict(d)
    del bad["nested_absmax"]
    bad = {k: v for k, v in bad.items()}
    state2 = QuantState.from_dict(bad, "cpu")  # nested stats absent: read as plain state ...
    with pytest.raises(TypeError, match="absmax must be torch.float32"):  # ... whose uint8 absmax is refused
        qf.dequantize_4bit(packed, state2)


def test_unavailable_backend(backend):
    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        with qpeft.use_backend("tpu"):
            pass
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="cuda"):
            with qpeft.use_backend("cuda"):
                pass


def test_bad_out_tensor(backend):
    packed, state = qf.quantize_4bit(torch.randn(8, 8))
    with pytest.raises(ValueError, match=r"out is \(64,\).*result is \(8, 8\)"):
        qf.dequantize_4bit(packed, state, out=torch.empty(64))
    with pytest.raises(ValueError, match="out is torch.float16 but out_dtype=torch.float32"):
        qf.dequantize_4bit(packed, state, torch.float32, out=torch.empty(8, 8, dtype=torch.float16))
    q, s8 = qf.quantize_blockwise(torch.randn(8))
    with pytest.raises(ValueError, match=r"out is \(9,\)"):
        qf.dequantize_blockwise(q, s8, out=torch.empty(9))
    with pytest.raises(TypeError, match="output dtype"):
        qf.dequantize_blockwise(q, s8, out=torch.empty(8, dtype=torch.int32))
