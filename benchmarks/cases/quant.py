"""Quantize / dequantize, 4-bit (NF4, with and without double quantization) and 8-bit
blockwise (dynamic map, blocks of 256), on bf16 weights.

Implementations: each qpeft backend usable on the device (dequantize also into a
reused ``out=`` tensor: on CPU a fresh 32 MiB output costs ~7 ms of first-touch page
faults, more than the decode), the pure-torch reference, bitsandbytes, torchao's NF4
tensor. qpeft and bitsandbytes must reproduce the reference bit for bit; torchao has a
format of its own (int8 block scalers), so its round trip is held to bitsandbytes'
published NF4 double-quant error bound instead (mean |error| < 0.11 on randn data).
"""

from __future__ import annotations

import torch

import qpeft
import qpeft.functional as qf

from ..harness import Case, Impl
from .peers import optional, qpeft_backends, torchao_nf4

NF4_DQ_MEAN_ABS_ERROR = 0.11  # bitsandbytes' published bound, NF4 + DQ, blocksize 64, randn


def _equal(want):
    def check(got):
        got = got[0] if isinstance(got, tuple) else got
        want_t = want[0] if isinstance(want, tuple) else want
        assert got.dtype == want_t.dtype and torch.equal(got.reshape(want_t.shape), want_t), (
            "differs from reference"
        )

    return check


def _within_nf4_bound(w):
    def check(got):
        err = float((got.float() - w.float()).abs().mean())
        assert err < NF4_DQ_MEAN_ABS_ERROR, f"mean |error| {err:.4f} >= {NF4_DQ_MEAN_ABS_ERROR}"

    return check


def _forced(backend: str, fn):
    def run():
        with qpeft.use_backend(backend):
            return fn()

    return run


def cases(device: str, quick: bool) -> list[Case]:
    bnbF = optional("bitsandbytes.functional")
    ao = torchao_nf4()
    sizes = [(256, 256)] if quick else [(1024, 1024), (2048, 2048), (4096, 4096)]
    slow = {"min_runs": 1, "min_seconds": 0.0} if quick else {"min_runs": 3, "min_seconds": 0.0}
    out: list[Case] = []
    for rows, cols in sizes:  # one function call per size: its closures bind that size's tensors
        out += _size_cases(device, rows, cols, bnbF, ao, slow)
    return out


def _size_cases(device, rows, cols, bnbF, ao, slow) -> list[Case]:
    out: list[Case] = []
    g = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=g).to(device=device, dtype=torch.bfloat16)
    n = w.numel()
    label = f"{rows}x{cols} bf16"
    with qpeft.use_backend("default"):
        ref = {dq: qf.quantize_4bit(w, 64, "nf4", dq) for dq in (False, True)}
        ref_w = {dq: qf.dequantize_4bit(*ref[dq]) for dq in (False, True)}
        q8, s8 = qf.quantize_blockwise(w.reshape(-1), 256)
        ref_w8 = qf.dequantize_blockwise(q8, s8)

    for dq in (False, True):
        tag = "nf4+dq" if dq else "nf4"
        packed, state = ref[dq]
        stats = n // 64 * (1 if dq else 4) + (4 * (n // 64 // 256) if dq else 0)

        impls = [
            Impl(
                f"qpeft {b}", _forced(b, lambda dq=dq: qf.quantize_4bit(w, 64, "nf4", dq)), _equal(ref[dq][0])
            )
            for b in qpeft_backends(device)
        ]
        impls.append(
            Impl(
                "reference",
                _forced("default", lambda dq=dq: qf.quantize_4bit(w, 64, "nf4", dq)),
                _equal(ref[dq][0]),
            )
        )
        if bnbF is not None:
            impls.append(
                Impl(
                    "bitsandbytes",
                    lambda dq=dq: bnbF.quantize_4bit(
                        w, blocksize=64, quant_type="nf4", compress_statistics=dq
                    ),
                    _equal(ref[dq][0]),
                )
            )
        if ao is not None and dq:
            impls.append(Impl("torchao", lambda: ao[0](w, 64, 256), None))
        out.append(
            Case(
                f"quantize 4-bit {tag}",
                label,
                impls,
                x=n,
                x_name="elements",
                bound="memory",
                nbytes=2 * n + n // 2 + stats,
                runs={"reference": slow},
            )
        )

        buf = torch.empty_like(w)
        impls = []
        for b in qpeft_backends(device):
            impls.append(
                Impl(
                    f"qpeft {b}",
                    _forced(b, lambda p=packed, s=state: qf.dequantize_4bit(p, s)),
                    _equal(ref_w[dq]),
                )
            )
            impls.append(
                Impl(
                    f"qpeft {b} out=",
                    _forced(b, lambda p=packed, s=state, buf=buf: qf.dequantize_4bit(p, s, out=buf)),
                    _equal(ref_w[dq]),
                )
            )
        impls.append(
            Impl(
                "reference",
                _forced("default", lambda p=packed, s=state: qf.dequantize_4bit(p, s)),
                _equal(ref_w[dq]),
            )
        )
        if bnbF is not None:
            bstate = bnbF.QuantState.from_dict(state.as_dict(packed=True), device=device)
            impls.append(
                Impl("bitsandbytes", lambda p=packed, s=bstate: bnbF.dequantize_4bit(p, s), _equal(ref_w[dq]))
            )
        if ao is not None and dq:
            nf4 = ao[0](w, 64, 256)
            impls.append(Impl("torchao", nf4.get_original_weight, _within_nf4_bound(w)))
        out.append(
            Case(
                f"dequantize 4-bit {tag} -> bf16",
                label,
                impls,
                x=n,
                x_name="elements",
                bound="memory",
                nbytes=n // 2 + stats + 2 * n,
                runs={"reference": slow},
            )
        )

    x8 = w.reshape(-1)
    impls = [
        Impl(f"qpeft {b}", _forced(b, lambda: qf.quantize_blockwise(x8, 256)), _equal(q8))
        for b in qpeft_backends(device)
    ]
    impls.append(Impl("reference", _forced("default", lambda: qf.quantize_blockwise(x8, 256)), _equal(q8)))
    if bnbF is not None:
        impls.append(Impl("bitsandbytes", lambda: bnbF.quantize_blockwise(x8, blocksize=256), _equal(q8)))
    out.append(
        Case(
            "quantize 8-bit",
            label,
            impls,
            x=n,
            x_name="elements",
            bound="memory",
            nbytes=2 * n + n + 4 * (n // 256),
            runs={"reference": slow},
        )
    )

    buf8 = torch.empty_like(x8)
    impls = []
    for b in qpeft_backends(device):
        impls.append(Impl(f"qpeft {b}", _forced(b, lambda: qf.dequantize_blockwise(q8, s8)), _equal(ref_w8)))
        impls.append(
            Impl(
                f"qpeft {b} out=",
                _forced(b, lambda: qf.dequantize_blockwise(q8, s8, out=buf8)),
                _equal(ref_w8),
            )
        )
    impls.append(
        Impl("reference", _forced("default", lambda: qf.dequantize_blockwise(q8, s8)), _equal(ref_w8))
    )
    if bnbF is not None:
        b8 = bnbF.QuantState(absmax=s8.absmax, code=s8.code, blocksize=256, dtype=torch.bfloat16)
        impls.append(Impl("bitsandbytes", lambda: bnbF.dequantize_blockwise(q8, b8), _equal(ref_w8)))
    out.append(
        Case(
            "dequantize 8-bit -> bf16",
            label,
            impls,
            x=n,
            x_name="elements",
            bound="memory",
            nbytes=n + 4 * (n // 256) + 2 * n,
            runs={"reference": slow},
        )
    )
    return out
