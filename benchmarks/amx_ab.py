"""A/B of the CPU bf16 products with a 4-bit W: qpeft's AMX kernel (csrc/cpu/qgemm_amx.cpp,
W decoded straight into the tiles) against the oneDNN path it replaces at the amx level
(W decoded to bf16 panels, ``backends/cpu/qlora.py`` ``_base_bf16`` / the panel loop of
``_backward_bf16``) and against torch's bf16 matmul on an already dequantized W (the
issue-13 yardstick: no decode at all). NF4 with double quantization, blocksize 64.

    python benchmarks/amx_ab.py [--shapes 4096x4096,14336x4096] [--m 16,64,512] [--reps 9]
        [--threads 1] [--only fwd|dx] [--clock wall|thread] [--json PATH]

Shapes are N x K of W. Each repetition runs every implementation once, in an order that
rotates, so that load from other processes hits all alike; the table gives medians (and
the best run), GFLOP/s of the median, and the ratios amx / panels and amx / torch (below
1: amx is faster). ``--clock thread`` times the calling thread's CPU time instead of the
wall clock (one thread only: the kernels then run in the calling thread): on the shared
VM a 50 ms call is often descheduled, which adds wall time but no CPU time, so CPU-time
minima repeat within a few percent where wall-clock ones move 2x (cache and memory
contention from other jobs still shows). The machine line names the CPU and its detected level; the numbers hold
for that machine only. Needs the amx level (qpeft.cpu_info()["detected_level"]).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make qpeft importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

import qpeft
import qpeft.functional as qf
from qpeft.backends.cpu import amx
from qpeft.backends.cpu import qlora as cpu_qlora

BF16 = torch.bfloat16


def _quant(n: int, k: int):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g).to(BF16)
    packed, st = qf.quantize_4bit(w, 64, "nf4", True)
    absmax, nested_absmax, nested_code, offset, rest = qf._quant_args(st)
    quant = (packed, absmax, nested_absmax, nested_code, offset, *rest)
    return quant, qf.dequantize_4bit(packed, st, BF16)


def _panels_dx(dy, quant, k):
    acc = torch.zeros((dy.shape[0], k))
    part = torch.empty_like(acc, dtype=BF16)
    for r0, r1, w in cpu_qlora._decode_panels(*quant, dtype=BF16):
        acc.add_(torch.mm(dy[:, r0:r1].contiguous(), w, out=part))
    return acc


def _impls(direction: str, m: int, n: int, k: int, quant, w16):
    g = torch.Generator().manual_seed(1)
    if direction == "fwd":
        x = torch.randn(m, k, generator=g).to(BF16)
        return {
            "amx": lambda: amx.qgemm_4bit(x, quant, out_dtype=BF16),
            "panels": lambda: cpu_qlora._base_bf16(x, quant),
            "torch": lambda: F.linear(x, w16),
        }
    dy = torch.randn(m, n, generator=g).to(BF16)
    return {
        "amx": lambda: amx.qgemm_4bit(dy, quant, dx=True),
        "panels": lambda: _panels_dx(dy, quant, k),
        "torch": lambda: dy @ w16,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="4096x4096,14336x4096", help="N x K of W, comma-separated")
    ap.add_argument("--m", default="16,64,512")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", choices=("fwd", "dx"), default=None)
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    info = qpeft.cpu_info()
    if info["detected_level"] != "amx":
        print(f"this CPU lacks the amx level: {info['missing'].get('amx')}", file=sys.stderr)
        return 1
    if args.clock == "thread" and args.threads != 1:
        ap.error("--clock thread needs --threads 1 (other threads' CPU time is not counted)")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    torch.set_num_threads(args.threads)
    rows = []
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        quant, w16 = _quant(n, k)
        for direction in ("fwd", "dx"):
            if args.only not in (None, direction):
                continue
            for m in (int(v) for v in args.m.split(",")):
                impls = _impls(direction, m, n, k, quant, w16)
                names = list(impls)
                for f in impls.values():  # warm-up: pages, oneDNN's kernels, workspaces
                    f()
                times = {name: [] for name in names}
                for rep in range(args.reps):
                    for i in range(len(names)):
                        name = names[(rep + i) % len(names)]
                        t0 = clock()
                        impls[name]()
                        times[name].append(clock() - t0)
                med = {name: statistics.median(t) for name, t in times.items()}
                flops = 2 * m * n * k
                rows.append(
                    {
                        "shape": f"{n}x{k}",
                        "op": direction,
                        "m": m,
                        **{f"{name}_ms": med[name] * 1e3 for name in names},
                        **{f"{name}_min_ms": min(times[name]) * 1e3 for name in names},
                        **{f"{name}_gflops": flops / med[name] / 1e9 for name in names},
                        "amx/panels": med["amx"] / med["panels"],
                        "amx/torch": med["amx"] / med["torch"],
                    }
                )
                r = rows[-1]
                print(
                    f"{direction} {n}x{k} M={m}: "
                    + ", ".join(f"{name} {r[name + '_ms']:.2f} ms" for name in names)
                    + f"; amx/panels {r['amx/panels']:.2f}, amx/torch {r['amx/torch']:.2f}",
                    file=sys.stderr,
                    flush=True,
                )
    print(
        f"CPU: {info['model']} (detected {info['detected_level']}), torch threads {torch.get_num_threads()}, "
        f"os.cpu_count() {os.cpu_count()}; {args.clock} clock; medians (best) of {args.reps}, interleaved; NF4+DQ, blocksize 64"
    )
    print(
        "| op | W (N x K) | M | amx ms (best) | panels ms (best) | torch bf16 ms (best) "
        "| amx GFLOP/s | amx / panels | amx / torch |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['op']} | {r['shape']} | {r['m']} | {r['amx_ms']:.2f} ({r['amx_min_ms']:.2f}) "
            f"| {r['panels_ms']:.2f} ({r['panels_min_ms']:.2f}) | {r['torch_ms']:.2f} ({r['torch_min_ms']:.2f}) "
            f"| {r['amx_gflops']:.0f} | {r['amx/panels']:.2f} | {r['amx/torch']:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"cpu_info": info, "threads": args.threads, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
