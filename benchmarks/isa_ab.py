"""A/B of the CPU kernels at two ISA levels (default: avx2 against avx512) in one process:
4096x4096 quantize/dequantize (4-bit NF4 with double quantization, 8-bit blockwise), the
4-bit GEMV at M=1 and M=8, and one optimizer step on 16M parameters (AdamW and Lion, fp32
and 8-bit state). Each repetition times every level once, interleaved, so that load from
other processes hits both sides alike; the table gives medians and the ratio A / B (above
1: B is faster).

The 4-bit dequantize is also timed the way the CPU QLoRA layer uses it: W decoded panel by
panel into one reused buffer (8 consecutive panels of a 4096-wide W per sample, the native
entry called directly so that the kernel and not the dispatcher is timed), 1 MiB (stays in
L2) and the layer's own panel size (backends/cpu/qlora.py: panel_elems), each with a fill
of the same buffer as the store-bandwidth reference; and the whole
4096x4096 decode with out= against ``out.copy_(src)`` of the same output bytes. Below the
table: elements/s of each, and each decode's time as a fraction of the copy's (1.0: the
decode writes its output at the machine's copy bandwidth).

    python benchmarks/isa_ab.py [--a avx2] [--b avx512] [--reps 31] [--threads 1] [--only SUBSTR,...] [--quick]
        [--json PATH]

    python benchmarks/isa_ab.py --dpbf16 [options of benchmarks/dpbf16_ab.py]
        x @ W^T (with --dx: dy @ W) at the avx512_bf16 level: qpeft's vdpbf16ps kernel
        against the oneDNN panels and torch's F.linear (dy @ W) on a dequantized W, oneDNN
        capped below AMX (dpbf16_ab.py).

The levels are set with qpeft._C.set_isa (the in-process form of QPEFT_CPU_ISA); a level
the CPU lacks is an error naming the missing features. Results name the CPU and its
detected level (qpeft.cpu_info()); they hold for that machine only.
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

if __package__ in (None, ""):  # run as a script: make qpeft importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import qpeft
import qpeft.functional as qf
from qpeft._formats import DTYPE_IDS, QUANT_TYPE_IDS, dynamic_map  # dynamic_map: 8-bit state maps
from qpeft._native import cpu_module
from qpeft.backends.cpu.qlora import panel_elems

# Cases whose elements/s the summary prints, and the copy/fill case each is measured against.
ELEMS: dict[str, int] = {}
BOUND: dict[str, str] = {}
PANELS = 8  # panels decoded per timed sample
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _panel_cases(packed, st, side: int, panel_bytes: int, label: str, dtypes) -> list[tuple[str, object]]:
    """W (side x side, NF4, blocksize 64, nested) decoded panel by panel into one buffer of
    panel_bytes, as the CPU QLoRA layer does, for each dtype; and a fill of that buffer (the
    store-bandwidth bound)."""
    mod = cpu_module()
    s2 = st.state2
    threads = torch.get_num_threads()
    codes, absmax_q = packed.reshape(-1), st.absmax
    panel_bytes = min(panel_bytes, side * side * 2)  # --quick: W itself may be smaller
    mib = f"{panel_bytes / 2**20:g} MiB"
    fill_case = f"fill {mib} x{PANELS} (store bound)"
    cases = []
    for dtype in dtypes:
        rows = min(side, panel_bytes // (side * dtype.itemsize))
        buf = torch.empty(rows * side, dtype=dtype)
        elems, blocks = rows * side, rows * side // st.blocksize
        groups = blocks // s2.blocksize  # panels start on a nested group: rows * side % (64 * 256) == 0
        calls = []
        for p in range(PANELS):
            b0 = (p * blocks) % absmax_q.numel()
            e0 = b0 * st.blocksize
            args = (
                codes[e0 // 2 :].data_ptr(),
                elems // 2,
                absmax_q[b0:].data_ptr(),
                blocks,
                elems,
                st.blocksize,
                QUANT_TYPE_IDS[st.quant_type],
                buf.data_ptr(),
                DTYPE_IDS[dtype],
                s2.absmax[b0 // s2.blocksize :].data_ptr(),
                groups,
                s2.code.data_ptr(),
                st.offset.data_ptr(),
                s2.blocksize,
                threads,
            )
            calls.append(args)

        def decode(calls=calls, buf=buf):  # holds buf: calls has only its address
            for args in calls:
                mod.dequantize_4bit(*args)

        case = f"dequantize_4bit {label} {rows}x{side} -> {DTYPE_NAMES[dtype]} x{PANELS}"
        ELEMS[case], BOUND[case] = PANELS * elems, fill_case
        cases.append((case, decode))

    fill_buf = torch.empty(panel_bytes // 2, dtype=torch.bfloat16)

    def fill(fill_buf=fill_buf):
        for _ in range(PANELS):
            fill_buf.fill_(1.0)

    cases.append((fill_case, fill))
    return cases


def _cases(side: int, optim_n: int) -> list[tuple[str, object]]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(side, side, generator=g).to(torch.bfloat16)
    packed, st = qf.quantize_4bit(w, 64, "nf4", True)
    q8, s8 = qf.quantize_blockwise(w, 256)
    out_bf16 = torch.empty(side, side, dtype=torch.bfloat16)
    out_f32 = torch.empty(side, side)
    x1 = torch.randn(1, side, generator=g)
    x8 = torch.randn(8, side, generator=g)

    out_f16 = torch.empty(side, side, dtype=torch.float16)
    src_bf16, src_f32 = torch.zeros_like(out_bf16), torch.zeros_like(out_f32)  # the copy references

    cases: list[tuple[str, object]] = [
        ("quantize_4bit nf4+dq bf16", lambda: qf.quantize_4bit(w, 64, "nf4", True)),
        ("dequantize_4bit nf4+dq -> bf16", lambda: qf.dequantize_4bit(packed, st, out=out_bf16)),
        ("dequantize_4bit nf4+dq -> fp16", lambda: qf.dequantize_4bit(packed, st, out=out_f16)),
        ("dequantize_4bit nf4+dq -> fp32", lambda: qf.dequantize_4bit(packed, st, out=out_f32)),
        (f"copy {side}^2 bf16 (out.copy_)", lambda: out_bf16.copy_(src_bf16)),
        (f"copy {side}^2 fp32 (out.copy_)", lambda: out_f32.copy_(src_f32)),
        # an L2-resident buffer (the VM's L2: 2 MiB per core), then the layer's own panel size
        *_panel_cases(packed, st, side, 1 << 20, "L2 panel", DTYPE_NAMES),
        *_panel_cases(packed, st, side, panel_elems(2) * 2, "QLoRA panel", [torch.bfloat16]),
        ("quantize_blockwise 8-bit bf16", lambda: qf.quantize_blockwise(w, 256)),
        ("dequantize_blockwise 8-bit -> bf16", lambda: qf.dequantize_blockwise(q8, s8, torch.bfloat16)),
        ("gemv_4bit M=1", lambda: qf.gemv_4bit(x1, packed, st)),
        ("gemv_4bit M=8", lambda: qf.gemv_4bit(x8, packed, st)),
    ]
    for dt, copy in (("bf16", "bf16"), ("fp16", "bf16"), ("fp32", "fp32")):  # copy: same bytes
        ELEMS[f"dequantize_4bit nf4+dq -> {dt}"] = side * side
        BOUND[f"dequantize_4bit nf4+dq -> {dt}"] = f"copy {side}^2 {copy} (out.copy_)"

    signed, unsigned = dynamic_map(True), dynamic_map(False)
    p = torch.randn(optim_n, generator=g)
    gr = torch.randn(optim_n, generator=g) * 1e-3
    m, v = torch.zeros(optim_n), torch.zeros(optim_n)
    nb = -(-optim_n // 256)
    zero_code = int((signed == 0).nonzero()[0, 0])
    q1 = torch.full((optim_n,), zero_code, dtype=torch.uint8)
    q2 = torch.zeros(optim_n, dtype=torch.uint8)
    a1, a2 = torch.zeros(nb), torch.zeros(nb)
    ops = torch.ops.qpeft
    cases += [
        ("adamw32 step 16M", lambda: ops.adamw32_step_(p, gr, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.01, 1)),
        (
            "adamw8bit step 16M",
            lambda: ops.adamw8bit_step_(
                p, gr, q1, a1, q2, a2, signed, unsigned, 1e-3, 0.9, 0.999, 1e-8, 0.01, 1
            ),
        ),
        ("lion32 step 16M", lambda: ops.lion32_step_(p, gr, m, 1e-4, 0.9, 0.99, 0.01)),
        ("lion8bit step 16M", lambda: ops.lion8bit_step_(p, gr, q1, a1, signed, 1e-4, 0.9, 0.99, 0.01)),
    ]
    return cases


def _summary(rows: list[dict], levels: list[str]) -> None:
    """4-bit dequantize: elements/s at each level and the decode's time as a fraction of its
    bound's (the fill or copy of the same output bytes, timed in the same repetitions)."""
    by_case = {r["case"]: r for r in rows}
    lines = []
    for r in rows:
        name = r["case"]
        if name not in ELEMS:
            continue
        parts = []
        for lv in levels:
            ms, lo, hi = r[f"{lv}_ms"], r[f"{lv}_min_ms"], r[f"{lv}_max_ms"]
            part = f"{lv} {ELEMS[name] / ms / 1e6:.2f} G elem/s ({lo:.3f}-{hi:.3f} ms)"
            bound = by_case.get(BOUND[name])
            if bound is not None:
                part += f", {bound[f'{lv}_ms'] / ms:.2f} of {BOUND[name].split(' (')[0]}"
            parts.append(part)
        lines.append(f"- {name}: " + "; ".join(parts))
    if lines:
        print("\n4-bit dequantize (median elements/s, min-max of the samples, time of the bound / time):")
        print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--dpbf16" in argv:  # benchmarks/dpbf16_ab.py, in a process of its own: it caps oneDNN's
        # ISA (ONEDNN_MAX_CPU_ISA), which must be set before oneDNN is loaded
        rest = [a for a in argv if a != "--dpbf16"]
        return subprocess.call([sys.executable, str(Path(__file__).with_name("dpbf16_ab.py")), *rest])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", default="avx2")
    ap.add_argument("--b", default="avx512")
    ap.add_argument("--reps", type=int, default=31)
    ap.add_argument("--quick", action="store_true", help="1024^2 and 1M parameters, 3 repetitions")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (the kernels' thread count)"
    )
    ap.add_argument("--only", default="", help="comma-separated substrings: run the matching cases only")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    side, optim_n, reps = (1024, 1 << 20, 3) if args.quick else (4096, 1 << 24, args.reps)

    torch.set_num_threads(args.threads)
    mod = cpu_module()
    levels = [args.a, args.b]
    prev = mod.set_isa("auto")
    for lv in levels:
        mod.set_isa(lv)  # ValueError naming the missing features if the CPU lacks it
    info = qpeft.cpu_info()
    rows = []
    with qpeft.use_backend("cpu"):
        wanted = [w for w in args.only.split(",") if w]
        for name, fn in _cases(side, optim_n):
            if wanted and not any(w in name for w in wanted):
                continue
            times: dict[str, list[float]] = {lv: [] for lv in levels}
            kernels = {}
            for lv in levels:  # warm-up (8-bit lookup tables, pages)
                mod.set_isa(lv)
                fn()
            for _ in range(reps):
                for lv in levels:
                    mod.set_isa(lv)
                    t0 = time.perf_counter()
                    fn()
                    times[lv].append(time.perf_counter() - t0)
            op = name.split()[0]
            op = {"adamw32": "adamw32_step", "adamw8bit": "adamw8bit_step", "lion32": "lion32_step"}.get(
                op, op
            )
            op = {"lion8bit": "lion8bit_step"}.get(op, op)
            for lv in levels:
                mod.set_isa(lv)
                kernels[lv] = mod.cpu_info()["kernels"].get(op, "?")
            med = {lv: statistics.median(t) * 1e3 for lv, t in times.items()}
            best = {f"{lv}_min_ms": min(t) * 1e3 for lv, t in times.items()}
            best.update({f"{lv}_max_ms": max(t) * 1e3 for lv, t in times.items()})
            rows.append(
                {
                    "case": name,
                    **{f"{lv}_ms": med[lv] for lv in levels},
                    "ratio": med[args.a] / med[args.b],
                    **best,
                    "kernels": kernels,
                }
            )
    mod.set_isa(prev)

    print(
        f"CPU: {info['model']} (detected {info['detected_level']}), torch threads {torch.get_num_threads()}, "
        f"os.cpu_count() {os.cpu_count()}; medians of {reps}, {args.a} vs {args.b} interleaved"
    )
    print(f"| case | {args.a} ms | {args.b} ms | {args.a}/{args.b} | kernel at {args.b} |")
    print("| --- | ---: | ---: | ---: | --- |")
    for r in rows:
        print(
            f"| {r['case']} | {r[args.a + '_ms']:.3f} | {r[args.b + '_ms']:.3f} | {r['ratio']:.2f} | {r['kernels'][args.b]} |"
        )
    _summary(rows, levels)
    if args.json:
        args.json.write_text(json.dumps({"cpu_info": info, "reps": reps, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
