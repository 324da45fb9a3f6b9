"""A/B of x @ W^T at the avx512_bf16 level (a CPU with AVX512-BF16 and no AMX, e.g. AMD Zen
4/5; issue 13): qpeft's fused decode + vdpbf16ps kernel (csrc/cpu/qgemm_avx512bf16.cpp)
against (a) the path it replaces, W decoded to bf16 panels each handed to oneDNN
(``backends/cpu/qlora.py`` ``_base_bf16``), and (b) torch's bf16 F.linear on an already
dequantized W (the issue's yardstick: no decode at all); and the whole ``Linear4bit``
forward (no LoRA) with the kernel and with the panels. W 4096x4096 NF4 with double
quantization, blocksize 64.

    python benchmarks/isa_ab.py --dpbf16 [--m 9,16,32,64,128] [--shape 4096x4096] [--reps 15]
        [--threads 1] [--onednn-isa AVX512_CORE_BF16] [--json PATH] [--dx]
    --dx: the backward's dx = dy @ W instead (dy [M, N]): the kernel (``qgemm_4bit_dx``)
    against the panel path of ``_backward_bf16`` (W's bf16 panels, one oneDNN GEMM each,
    summed in fp32) and torch's bf16 dy @ W on the dequantized W; medians (min-max).
    (or python benchmarks/dpbf16_ab.py with the same options)

To stand in for a CPU without AMX on one that has it, oneDNN is capped with
ONEDNN_MAX_CPU_ISA (default AVX512_CORE_BF16, set before torch is imported: oneDNN reads it
once) and qpeft runs at QPEFT_CPU_ISA=avx512_bf16 (``set_isa``). The output names the CPU,
the cap, and the implementation oneDNN reported for a bf16 matmul under it (ONEDNN_VERBOSE
in a child process). Each repetition runs every implementation once in a rotating order,
so that load from other processes hits all alike; medians (and the best run), ratios to
torch and to the panels (below 1: faster). The numbers hold for the machine named only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_ONEDNN_ISA = "AVX512_CORE_BF16"


def _onednn_isa_arg(argv: list[str]) -> str:
    for i, a in enumerate(argv):
        if a == "--onednn-isa" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--onednn-isa="):
            return a.split("=", 1)[1]
    return os.environ.get("ONEDNN_MAX_CPU_ISA", DEFAULT_ONEDNN_ISA)


if __name__ == "__main__":  # before torch (and oneDNN) is loaded
    os.environ["ONEDNN_MAX_CPU_ISA"] = _onednn_isa_arg(sys.argv[1:])
    os.environ["QPEFT_CPU_ISA"] = "avx512_bf16"

if __package__ in (None, ""):  # run as a script: make qpeft importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import qpeft  # noqa: E402
import qpeft.functional as qf  # noqa: E402
from qpeft._native import cpu_module  # noqa: E402
from qpeft.backends.cpu import dpbf16  # noqa: E402
from qpeft.backends.cpu import qlora as cpu_qlora  # noqa: E402

BF16 = torch.bfloat16


def onednn_impl(isa: str) -> str:
    """The implementation oneDNN reports (ONEDNN_VERBOSE) for a bf16 [16, 512] @ [512, 512]
    under ONEDNN_MAX_CPU_ISA=isa, in a child process (the variable is read once per process)."""
    code = "import torch; a = torch.randn(16, 512).bfloat16(); b = torch.randn(512, 512).bfloat16(); a @ b"
    env = dict(os.environ, ONEDNN_VERBOSE="1", ONEDNN_MAX_CPU_ISA=isa)
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.SubprocessError) as e:
        return f"? ({e})"
    for line in out.stdout.splitlines():
        fields = line.split(",")
        if "exec" in fields and "matmul" in fields and fields.index("matmul") + 1 < len(fields):
            return fields[fields.index("matmul") + 1]
    return "? (no matmul line in ONEDNN_VERBOSE)"


def _quant(n: int, k: int):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g).to(BF16)
    packed, st = qf.quantize_4bit(w, 64, "nf4", True)
    absmax, nested_absmax, nested_code, offset, rest = qf._quant_args(st)
    return (packed, absmax, nested_absmax, nested_code, offset, *rest), qf.dequantize_4bit(packed, st, BF16)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", default="9,16,32,64,128")
    ap.add_argument("--shape", default="4096x4096", help="N x K of W")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--onednn-isa", default=None, help=f"ONEDNN_MAX_CPU_ISA (default {DEFAULT_ONEDNN_ISA})")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--dx", action="store_true", help="dx = dy @ W instead of x @ W^T")
    args = ap.parse_args(argv)
    isa_cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "(none)")
    torch.set_num_threads(args.threads)
    mod = cpu_module()
    prev = mod.set_isa("avx512_bf16")  # ValueError naming the missing features without it
    n, k = (int(v) for v in args.shape.split("x"))
    quant, w16 = _quant(n, k)
    layer = qpeft.nn.Linear4bit.from_linear(torch.nn.Linear(k, n, bias=False).to(BF16))
    if args.dx:
        return _main_dx(args, quant, w16, n, k, mod, prev, isa_cap)
    rows = []
    g = torch.Generator().manual_seed(1)
    for m in (int(v) for v in args.m.split(",")):
        x = torch.randn(m, k, generator=g).to(BF16)

        def layer_fwd(use_kernel: bool, x=x) -> None:
            saved = dpbf16.MAX_ROWS
            dpbf16.MAX_ROWS = saved if use_kernel else 0
            try:
                with qpeft.use_backend("cpu"), torch.no_grad():
                    layer(x)
            finally:
                dpbf16.MAX_ROWS = saved

        impls = {
            "dpbf16": lambda x=x: dpbf16.qgemm_4bit(x, quant),
            "panels": lambda x=x: cpu_qlora._base_bf16(x, quant).float(),
            "torch": lambda x=x: F.linear(x, w16),
            "layer dpbf16": lambda: layer_fwd(True),
            "layer panels": lambda: layer_fwd(False),
        }
        names = list(impls)
        times: dict[str, list[float]] = {name: [] for name in names}
        for fn in impls.values():  # warm-up: pages, oneDNN primitives
            fn()
        for r in range(args.reps):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                impls[name]()
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        best = {name: min(t) * 1e3 for name, t in times.items()}
        rows.append({"m": m, "ms": med, "best_ms": best})
    mod.set_isa(prev)

    info = qpeft.cpu_info()
    print(
        f"CPU: {info['model']} (detected {info['detected_level']}; qpeft at avx512_bf16), "
        f"ONEDNN_MAX_CPU_ISA={isa_cap} (oneDNN bf16 matmul: {onednn_impl(isa_cap)}), torch threads "
        f"{torch.get_num_threads()}, os.cpu_count() {os.cpu_count()}; W {n}x{k} NF4+DQ bs64; "
        f"medians of {args.reps} (best), implementations interleaved"
    )
    print(
        "| M | dpbf16 ms | panels ms | torch F.linear ms | dpbf16/torch | dpbf16/panels "
        "| Linear4bit dpbf16 ms | Linear4bit panels ms | layer dpbf16/torch |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        ms, b = r["ms"], r["best_ms"]
        print(
            f"| {r['m']} | {ms['dpbf16']:.2f} ({b['dpbf16']:.2f}) | {ms['panels']:.2f} ({b['panels']:.2f}) "
            f"| {ms['torch']:.2f} ({b['torch']:.2f}) | {ms['dpbf16'] / ms['torch']:.2f} "
            f"| {ms['dpbf16'] / ms['panels']:.2f} | {ms['layer dpbf16']:.2f} | {ms['layer panels']:.2f} "
            f"| {ms['layer dpbf16'] / ms['torch']:.2f} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"cpu_info": info, "onednn_max_cpu_isa": isa_cap, "reps": args.reps, "rows": rows}, indent=1
            )
        )
    return 0


def _panels_dx(dy: torch.Tensor, quant: tuple) -> torch.Tensor:
    """dy @ W as ``_backward_bf16`` computes it without the kernel (no LoRA term): W's bf16
    panels, one oneDNN GEMM each, accumulated in fp32."""
    acc = torch.zeros((dy.shape[0], quant[9]), dtype=torch.float32)
    part = torch.empty_like(acc, dtype=BF16)
    for r0, r1, w in cpu_qlora._decode_panels(*quant, dtype=BF16):
        acc.add_(torch.mm(dy[:, r0:r1].contiguous(), w, out=part))
    return acc


def _main_dx(args, quant, w16, n, k, mod, prev, isa_cap) -> int:
    rows = []
    g = torch.Generator().manual_seed(1)
    for m in (int(v) for v in args.m.split(",")):
        dy = torch.randn(m, n, generator=g).to(BF16)
        impls = {
            "dpbf16": lambda dy=dy: dpbf16.qgemm_4bit_dx(dy, quant),
            "panels": lambda dy=dy: _panels_dx(dy, quant),
            "torch": lambda dy=dy: dy @ w16,
        }
        names = list(impls)
        times: dict[str, list[float]] = {name: [] for name in names}
        for fn in impls.values():  # warm-up: pages, oneDNN primitives
            fn()
        for r in range(args.reps):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                impls[name]()
                times[name].append(time.perf_counter() - t0)
        rows.append(
            {
                "m": m,
                "ms": {a: statistics.median(t) * 1e3 for a, t in times.items()},
                "min_ms": {a: min(t) * 1e3 for a, t in times.items()},
                "max_ms": {a: max(t) * 1e3 for a, t in times.items()},
            }
        )
    mod.set_isa(prev)
    info = qpeft.cpu_info()
    print(
        f"CPU: {info['model']} (detected {info['detected_level']}; qpeft at avx512_bf16), "
        f"ONEDNN_MAX_CPU_ISA={isa_cap} (oneDNN bf16 matmul: {onednn_impl(isa_cap)}), torch threads "
        f"{torch.get_num_threads()}, os.cpu_count() {os.cpu_count()}; dx = dy @ W, W {n}x{k} NF4+DQ "
        f"bs64; medians of {args.reps} (min-max), implementations interleaved"
    )
    print("| M | dpbf16 dx ms | panels dx ms | torch dy @ W ms | dpbf16/torch | dpbf16/panels |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        ms, lo, hi = r["ms"], r["min_ms"], r["max_ms"]
        cell = {a: f"{ms[a]:.2f} ({lo[a]:.2f}-{hi[a]:.2f})" for a in ms}
        print(
            f"| {r['m']} | {cell['dpbf16']} | {cell['panels']} | {cell['torch']} "
            f"| {ms['dpbf16'] / ms['torch']:.2f} | {ms['dpbf16'] / ms['panels']:.2f} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "cpu_info": info,
                    "onednn_max_cpu_isa": isa_cap,
                    "reps": args.reps,
                    "dx": True,
                    "rows": rows,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
