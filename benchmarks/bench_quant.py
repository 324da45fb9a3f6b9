"""Quantization kernels on CPU: qpeft's C++ kernels vs the pure-torch reference vs
bitsandbytes, on a 4096x4096 bf16 weight (NF4, blocksize 64, double quant) and the
8-bit blockwise pair (dynamic map, blocksize 256).

Dequantization is timed twice for qpeft: allocating its output each call, and into a
reused ``out=`` tensor. The difference is the kernel's first-touch page faults on a
fresh 32 MiB buffer, which cost more than the decode itself on this machine
(bitsandbytes has no ``out=`` on CPU, so it always pays them).

    python -m benchmarks.bench_quant [--quick] [--out benchmarks/results]

Every implementation's output is checked against the reference before it is timed.
"""

from __future__ import annotations

import argparse
import contextlib
import warnings
from pathlib import Path

import torch

import qpeft
import qpeft.functional as qf

from .harness import Row, copy_bandwidth_gbs, time_cpu, write_report

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes.functional as bnbF
except ImportError:  # an optional peer
    bnbF = None


def _impls():
    impls = {
        "qpeft cpu": lambda: qpeft.use_backend("cpu"),
        "qpeft cpu, out=": lambda: qpeft.use_backend("cpu"),
        "reference": lambda: qpeft.use_backend("default"),
    }
    if bnbF is not None:
        impls["bitsandbytes"] = contextlib.nullcontext
    return impls


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def run(rows_n: int, cols_n: int, quick: bool) -> tuple[list[Row], float]:
    torch.manual_seed(0)
    w = torch.randn(rows_n, cols_n, dtype=torch.bfloat16)
    n = w.numel()
    copy_gbs = copy_bandwidth_gbs(16 << 20 if quick else 256 << 20)
    budget = dict(min_runs=2, min_seconds=0.0) if quick else dict(min_runs=5, min_seconds=1.0)

    with qpeft.use_backend("default"):
        ref_packed, ref_state = qf.quantize_4bit(w, 64, "nf4", True)
        ref_w = qf.dequantize_4bit(ref_packed, ref_state)
        x8 = w.reshape(-1)
        ref_q8, ref_s8 = qf.quantize_blockwise(x8, 256)
        ref_w8 = qf.dequantize_blockwise(ref_q8, ref_s8)

    cases = {}
    for impl, ctx in _impls().items():
        if impl == "bitsandbytes":
            cases[impl] = {
                "quantize nf4+dq": lambda: bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True),
                "dequantize nf4+dq -> bf16": lambda: bnbF.dequantize_4bit(ref_packed, _bnb_state(ref_state)),
                "quantize 8-bit": lambda: bnbF.quantize_blockwise(x8, blocksize=256),
                "dequantize 8-bit -> bf16": lambda: bnbF.dequantize_blockwise(ref_q8, _bnb_state8(ref_s8)),
            }
        elif impl.endswith("out="):
            out_w, out_w8 = torch.empty_like(w), torch.empty_like(x8)
            cases[impl] = {
                "dequantize nf4+dq -> bf16": lambda: qf.dequantize_4bit(ref_packed, ref_state, out=out_w),
                "dequantize 8-bit -> bf16": lambda: qf.dequantize_blockwise(ref_q8, ref_s8, out=out_w8),
            }
        else:
            cases[impl] = {
                "quantize nf4+dq": lambda: qf.quantize_4bit(w, 64, "nf4", True),
                "dequantize nf4+dq -> bf16": lambda: qf.dequantize_4bit(ref_packed, ref_state),
                "quantize 8-bit": lambda: qf.quantize_blockwise(x8, 256),
                "dequantize 8-bit -> bf16": lambda: qf.dequantize_blockwise(ref_q8, ref_s8),
            }

    nbytes = {
        "quantize nf4+dq": 2 * n + n // 2 + n // 64,
        "dequantize nf4+dq -> bf16": n // 2 + n // 64 + 2 * n,
        "quantize 8-bit": 2 * n + n + 4 * (n // 256),
        "dequantize 8-bit -> bf16": n + 4 * (n // 256) + 2 * n,
    }
    rows: list[Row] = []
    for impl, ctx in _impls().items():
        with ctx():
            # correctness first: every implementation must reproduce the reference
            mine = cases[impl]
            if "quantize nf4+dq" in mine:
                p, s = mine["quantize nf4+dq"]()
                assert _same(p, ref_packed) and _same(s.absmax, ref_state.absmax), f"{impl}: quantize differs"
                q8, s8 = mine["quantize 8-bit"]()
                assert _same(q8, ref_q8) and _same(s8.absmax, ref_s8.absmax), f"{impl}: 8-bit quantize differs"
            assert _same(mine["dequantize nf4+dq -> bf16"]().reshape(w.shape), ref_w), f"{impl}: dequantize"
            assert _same(mine["dequantize 8-bit -> bf16"](), ref_w8), f"{impl}: 8-bit dequantize differs"
            for case, fn in cases[impl].items():
                if quick or impl != "reference" or case.startswith("de"):
                    t = time_cpu(fn, **budget)
                else:
                    t = time_cpu(fn, min_runs=3, min_seconds=0.0)
                rows.append(Row(case, impl, t, nbytes[case]))
    rows.sort(key=lambda r: list(nbytes).index(r.case))
    return rows, copy_gbs


# Issue targets on this machine: (case, qpeft impl, min speed-up over bitsandbytes, min fraction of copy BW).
TARGETS = [
    ("dequantize nf4+dq -> bf16", "qpeft cpu, out=", 5.0, 0.5),
    ("dequantize nf4+dq -> bf16", "qpeft cpu", 5.0, 0.5),
    ("quantize nf4+dq", "qpeft cpu", 10.0, None),
]


def targets(rows: list[Row], copy_gbs: float) -> str:
    """The targets as met / not met, from this run's rows."""
    by = {(r.case, r.impl): r for r in rows}
    lines = ["| target | measured | met |", "| --- | --- | --- |"]
    for case, impl, speedup, frac in TARGETS:
        mine, peer = by.get((case, impl)), by.get((case, "bitsandbytes"))
        if mine is None or peer is None:
            continue
        got = peer.timing.median_ms / mine.timing.median_ms
        ok = got >= speedup
        text = f"{got:.1f}x faster than bitsandbytes"
        if frac is not None:
            f = mine.gbs() / copy_gbs
            ok = ok and f >= frac
            text += f", {100 * f:.0f}% of copy BW"
        want = f">= {speedup:g}x" + (f" and >= {100 * frac:.0f}% of copy BW" if frac else "")
        lines.append(f"| {case} ({impl}): {want} | {text} | {'yes' if ok else 'no'} |")
    return "\n".join(lines)


def _bnb_state(state):
    return bnbF.QuantState.from_dict(state.as_dict(packed=True), device="cpu")


def _bnb_state8(state):
    return bnbF.QuantState(absmax=state.absmax, code=state.code, blocksize=state.blocksize, dtype=state.dtype)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few runs (CI smoke)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    size = (256, 256) if args.quick else (4096, 4096)
    rows, copy_gbs = run(*size, quick=args.quick)
    name = "quant_cpu_quick" if args.quick else "quant_cpu"
    notes = (
        f"Weight {size[0]}x{size[1]} bf16. GB/s counts the bytes each kernel must read and write "
        "(inputs, codes, statistics, outputs). Every implementation's result was checked against the "
        "reference before timing."
    )
    notes += "\n\nTargets (issue 2):\n\n" + targets(rows, copy_gbs)
    print(write_report(name, rows, copy_gbs, "qpeft cpu", args.out, notes))


if __name__ == "__main__":
    main()
