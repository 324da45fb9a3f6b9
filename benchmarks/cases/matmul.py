"""4-bit matmul y = x @ W^T (no adapter) with W NF4 + double quant (blocksize 64), bf16
activations, from decode (M <= 8) to training M.

Implementations: qpeft's ``gemv_4bit`` (M <= 8: the fused C++ GEMV on CPU) and, for
larger M, ``dequantize_4bit`` into a reused fp32 buffer + an fp32 GEMM (what qpeft's API
offers for a plain large-M 4-bit matmul on a CPU without bf16 units); bitsandbytes'
``matmul_4bit`` on the same packed weight; torchao's ``linear_nf4``; and torch's
``F.linear`` on the unquantized bf16 and fp32 weights as the 16-bit baselines.

Checks against the fp64 product with the exactly decoded W: implementations on the same
packed weight within ||err|| / ||ref|| < 2^-6 (see cases/qlora.py for the derivation);
torchao (its own NF4 variant) and the unquantized baselines within 0.15 of the
unquantized product (NF4's relative RMS error on Gaussian weights is 0.092).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import qpeft
import qpeft.functional as qf

from ..harness import Case, Impl
from .peers import optional, qpeft_backends, torchao_nf4
from .qlora import OTHER_FORMAT_REL, SAME_FORMAT_REL, _rel

GEMV_MAX_ROWS = 8


def cases(device: str, quick: bool) -> list[Case]:
    bnb = optional("bitsandbytes")
    bnbF = optional("bitsandbytes.functional")
    ao = torchao_nf4()
    n = k = 256 if quick else 4096
    ms = [1, 4, 16] if quick else [1, 4, 8, 16, 64, 512, 2048]
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=g) * 0.02).to(device=device, dtype=torch.bfloat16)
    packed, state = qf.quantize_4bit(w, 64, "nf4", True)
    with qpeft.use_backend("default"):
        w_deq = qf.dequantize_4bit(packed, state, torch.float32)
    buf = torch.empty(n, k, dtype=torch.float32, device=device)
    w32 = w.float()
    out = []
    for m in ms:
        x = torch.randn(m, k, generator=g).to(device=device, dtype=torch.bfloat16)
        y_ref = (x.double() @ w_deq.double().T).float()
        y_full = (x.double() @ w.double().T).float()

        def check(want, bound):
            def run(y):
                assert _rel(y, want) < bound, f"relative error {_rel(y, want):.2e} >= {bound:.2e}"

            return run

        same, other = check(y_ref, SAME_FORMAT_REL), check(y_full, OTHER_FORMAT_REL)
        impls = []
        for b in qpeft_backends(device):
            if m <= GEMV_MAX_ROWS:

                def run(b=b, x=x):
                    with qpeft.use_backend(b):
                        return qf.gemv_4bit(x, packed, state)

                impls.append(Impl(f"qpeft {b} gemv_4bit", run, same))
            else:

                def run(b=b, x=x):
                    with qpeft.use_backend(b):
                        return F.linear(x.float(), qf.dequantize_4bit(packed, state, out=buf)).to(x.dtype)

                impls.append(Impl(f"qpeft {b} dequantize(out=) + fp32 GEMM", run, same))
        if bnb is not None and bnbF is not None:
            bstate = bnbF.QuantState.from_dict(state.as_dict(packed=True), device=device)
            impls.append(
                Impl(
                    "bitsandbytes matmul_4bit",
                    lambda x=x, packed=packed, bstate=bstate: bnb.matmul_4bit(x, packed.t(), bstate),
                    same,
                )
            )
        if ao is not None:
            w_nf4 = ao[0](w, 64, 256)
            impls.append(Impl("torchao linear_nf4", lambda x=x, w_nf4=w_nf4: ao[1](x, w_nf4), other))
        impls.append(Impl("torch bf16 F.linear (unquantized)", lambda x=x: F.linear(x, w), other))
        impls.append(Impl("torch fp32 F.linear (unquantized)", lambda x=x: F.linear(x.float(), w32), other))
        out.append(
            Case(
                "4-bit matmul", f"M={m} {n}x{k}", impls, x=m, x_name="M", bound="compute", flops=2 * m * n * k
            )
        )
    return out
