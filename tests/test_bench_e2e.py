"""benchmarks/cases/e2e.py's diagnosis of bitsandbytes' CPU 4-bit decode: it reports a
fault exactly when bitsandbytes' dequantize differs from qpeft's reference decode of the
same bytes, and names the layer's shape."""

from __future__ import annotations

import pytest
import torch

import qpeft
import qpeft.functional as qf

bnb = pytest.importorskip("bitsandbytes")
bf = pytest.importorskip("bitsandbytes.functional")
e2e = pytest.importorskip("benchmarks.cases.e2e")


@pytest.mark.parametrize("k", [64, 96, 128, 176])
def test_bnb_decode_fault_matches_reference_decode(k):
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, 32, bias=False)
    model = torch.nn.Sequential(e2e._bnb_linear(lin))
    qs = model[0].weight.quant_state
    got = bf.dequantize_4bit(model[0].weight.data, qs)
    with qpeft.use_backend("default"):
        packed, state = qf.quantize_4bit(lin.weight.data, 64, "nf4", True)
        want = qf.dequantize_4bit(packed, state)
    # the same bytes: bitsandbytes' quantization is qpeft's, bit for bit
    assert torch.equal(model[0].weight.data.reshape(-1), packed.reshape(-1))
    fault = e2e._bnb_decode_fault(model)
    if torch.allclose(got, want, rtol=1e-6, atol=0):
        assert fault is None
    else:
        assert fault is not None and f"[32x{k}]" in fault
    if k % 64 == 0:  # rows hold whole blocks: bitsandbytes decodes right
        assert fault is None
