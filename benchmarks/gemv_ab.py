"""The decode GEMV against torch (issue 13): ``Linear4bit`` forward at M = 1, 2, 4, 8 rows of
bf16 x on a 4096x4096 NF4 weight with double quantization (blocksize 64), which runs
``qpeft::gemv_4bit`` (csrc/cpu/gemv*.cpp), at each ISA level with a GEMV kernel of its own
that this CPU runs, against torch's bf16 and fp32 ``F.linear`` on the already dequantized
weight (no decode at all: the yardstick of the issue).

    python benchmarks/gemv_ab.py [--m 1,2,4,8] [--levels avx2,avx512] [--reps 15] [--threads 1]
        [--clock thread|wall]

Each repetition runs every implementation once in a rotating order, so that load from
other processes hits all alike. ``--clock thread`` (default) times the calling thread's
CPU time (CLOCK_THREAD_CPUTIME_ID): on a shared VM it leaves out the time the thread
waited for a core, which wall time counts; with --threads above 1 use ``wall`` (the other
threads' work is not the caller's CPU time). The table gives medians, the range, and each
level's median as a fraction of the faster torch median (below 0.5: more than 2x faster).
The numbers hold for the machine named only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make qpeft importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

import qpeft
from qpeft._native import cpu_module

BF16 = torch.bfloat16


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", default="1,2,4,8")
    ap.add_argument("--levels", default="avx2,avx512")
    ap.add_argument("--shape", default="4096x4096", help="N x K of W")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("thread", "wall"), default="thread")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    mod = cpu_module()
    info = mod.cpu_info()
    levels = [lv for lv in args.levels.split(",") if lv in info["built_levels"] and lv not in info["missing"]]
    n, k = (int(v) for v in args.shape.split("x"))
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_((torch.randn(n, k, generator=g) * 0.02).to(BF16).float())
    layer = qpeft.nn.Linear4bit.from_linear(lin)
    w32 = layer.dequantize(torch.float32)
    w16 = w32.to(BF16)
    print(
        f"CPU: {info['model']} (detected {info['detected_level']}), torch threads {args.threads}, "
        f"{args.clock} clock, medians of {args.reps}; W {n}x{k} NF4+DQ bs64, bf16 x"
    )
    print(
        "| M | "
        + " | ".join(f"qpeft {lv} ms" for lv in levels)
        + " | torch bf16 ms | torch fp32 ms | "
        + " | ".join(f"{lv} / torch" for lv in levels)
        + " |"
    )
    print("| ---: |" + " ---: |" * (2 * len(levels) + 2))
    prev = mod.set_isa(info["chosen_level"])
    try:
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k, generator=g).to(BF16)

            def at(level, x=x):
                mod.set_isa(level)
                with torch.no_grad():
                    return layer(x)

            impls = {lv: (lambda lv=lv: at(lv)) for lv in levels}
            impls["torch bf16"] = lambda x=x: F.linear(x, w16)
            impls["torch fp32"] = lambda x=x: F.linear(x.float(), w32)
            names = list(impls)
            for fn in impls.values():  # warm-up: pages, scratch, oneDNN primitives
                fn()
            times: dict[str, list[float]] = {name: [] for name in names}
            for r in range(args.reps):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    t0 = clock()
                    impls[name]()
                    times[name].append((clock() - t0) * 1e3)
            med = {name: statistics.median(v) for name, v in times.items()}
            best = min(med["torch bf16"], med["torch fp32"])

            def cell(name, times=times, med=med):
                v = times[name]
                return f"{med[name]:.3f} ({min(v):.2f}-{max(v):.2f})"

            print(
                f"| {m} | "
                + " | ".join(cell(name) for name in names)
                + " | "
                + " | ".join(f"{med[lv] / best:.2f}" for lv in levels)
                + " |",
                flush=True,
            )
    finally:
        mod.set_isa(prev)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
