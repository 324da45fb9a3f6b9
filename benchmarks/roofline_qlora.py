"""Roofline ESTIMATE of the fused QLoRA forward and dx (no GPU timing), plus static evidence.

    python -m benchmarks.roofline_qlora [--no-aot] [--out benchmarks/roofline_qlora.md]

Writes benchmarks/roofline_qlora.md: for M in MS, K = N = 4096, r = 16 on an H100 SXM
(peaks assumed below), the bytes and FLOPs of the fused Triton forward
(qpeft.triton_kernels.qlora.qlora_fwd_kernel, or at small M the split schedule
qlora_fwd_split_kernel + qlora_split_reduce_kernel) and of dx (qlora_dx_kernel, or
qlora_dx_split_kernel + the reduction) with the tile config and split count their
launchers use on 132 SMs, and at M >= PRE_LORA_M the precomputed LoRA down-projection
(qlora_lora_down_kernel, then the main kernel with PRE_LORA: no recompute in the loop);
the predicted time max(bytes / HBM, MMA FLOPs / tensor peak, main-loop instructions /
issue rate) (+ the down kernel's own such max and an assumed fixed launch cost), and the
ratio to a bf16 cuBLAS GEMM on the unquantized weight. The instructions per decoded W
element (down kernel: per activation element) are counted in the sm_90 SASS of the
launcher's default config by ``python -m benchmarks.sass_report`` and read from its
committed report (benchmarks/results/sass_report.json; method in docs/sass_report.md).
Unless --no-aot, it also compiles every tile config of the launchers' tables for sm_80
and sm_90 without a GPU and lists registers / stack (spills) from the cubin.
Nothing here is a measurement of GPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HBM_BPS = 3.35e12  # H100 SXM HBM3, bytes/s
MMA_FLOPS = 989e12  # H100 SXM dense bf16 tensor-core FLOP/s
# Issue rate: 132 SMs x 4 schedulers x 32 lanes x 1.98 GHz boost (lane-instructions/s), i.e.
# one warp-instruction per scheduler per cycle: an upper bound (stalls are not modelled).
ALU_IPS = 132 * 128 * 1.98e9
# Instructions per decoded W element: every SASS instruction of the forward kernel's main
# loop x threads per CTA / W elements one iteration decodes (docs/sass_report.md), counted
# for sm_90 (H100/H200) in the committed static report.
ARCH = 90
REPORT = Path(__file__).resolve().parent / "results" / "sass_report.json"

K = N = 4096
R = 16
BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
MS = (1, 16, 32, 64, 256, 1024, 2048, 4096)
SMS = 132  # H100 SXM
# ASSUMED fixed cost of the extra kernel of the PRE_LORA schedule (launch gap, ramp and
# tail of a small grid): not counted from anything, a round figure for an H100.
LAUNCH_S = 2e-6
KERNELS = ("fwd", "dx")


def _kern():
    from qpeft.backends.triton.qlora import _kernels

    return _kernels()


def _plan(kernel: str, m: int):
    """The launcher's split plan at this M on SMS SMs (None: the unsplit kernel)."""
    import torch

    kern = _kern()
    kern._sm_count.cache_clear()
    assert kern.INTERPRET_SMS == SMS  # a CPU device stands for the H100 in the plan
    c, loop = (N, K) if kernel == "fwd" else (K, N)
    # the GPU's tiles, also when called under TRITON_INTERPRET=1 (the tests), where the
    # launcher would plan with the interpreter's small config
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        return kern._split_plan(kernel, m, c, loop, R, torch.device("cpu"), None)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def _tile(kernel: str, m: int) -> dict:
    """The launcher's config for this M: the split table's (with its split count) or the
    regime's sm_90 default, and whether the launcher precomputes the down-projection."""
    kern = _kern()
    plan = _plan(kernel, m)
    if plan is not None:
        cfg, warps, stages, br, splits, _ = plan
        return {**{k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}, "num_warps": warps,
                "num_stages": stages, "BLOCK_R": br, "splits": splits, "pre": False}  # fmt: skip
    cfg = kern.default_config(kernel, kern._regime(m, kern.block_r(R, m)), ARCH)  # the sm_90 tile
    return {
        "BLOCK_M": cfg.kwargs["BLOCK_M"],
        "BLOCK_N": cfg.kwargs["BLOCK_N"],
        "BLOCK_K": cfg.kwargs["BLOCK_K"],
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
        "BLOCK_R": kern.block_r(R, m),
        "splits": 1,
        "pre": kern.use_pre_lora(m, True, None, ARCH),
    }


def _record(name: str, expect: str, report: Path) -> dict:
    records = json.loads(report.read_text())
    found = [r for r in records if r["name"] == name and r["arch"] == ARCH]
    if len(found) != 1:
        raise RuntimeError(
            f"{report}: {len(found)} records named {name} for sm_{ARCH}; regenerate the report"
        )
    rec = found[0]
    if rec["config"] != expect:
        raise RuntimeError(
            f"{report}: {name} is {rec['config']!r}, the launcher runs {expect!r}; regenerate it"
        )
    return rec


def dequant_cost(kernel: str, m: int, report: Path = REPORT) -> dict:
    """The sass_report record of the ``kernel`` ("fwd" / "dx") config the launcher runs at
    this M (r = R, bf16, NF4 with double quantization) on sm_<ARCH>; refuses a report whose
    tile is not the launcher's (stale: rerun ``python -m benchmarks.sass_report``)."""
    kern = _kern()
    tile = _tile(kernel, m)
    if _plan(kernel, m) is not None:
        name = f"qlora_{kernel}_split{tile['BLOCK_M']}M_r{R}_bf16"
    else:
        pre = "prelora_" if tile["pre"] else ""
        name = f"qlora_{kernel}_{pre}{kern._regime(m, kern.block_r(R, m))[0]}M_r{R}_bf16"
    expect = (
        f"{tile['BLOCK_M']}x{tile['BLOCK_N']}x{tile['BLOCK_K']} r{tile['BLOCK_R']}"
        f"{' pre' if tile['pre'] else ''} w{tile['num_warps']} s{tile['num_stages']}"
    )
    return _record(name, expect, report)


def down_cost(kernel: str, report: Path = REPORT) -> dict:
    """The sass_report record of qlora_lora_down_kernel as the ``kernel`` launcher runs it."""
    kern = _kern()
    br = kern.block_r(R, kern.PRE_LORA_M)
    bm, bc, warps, stages = kern._DOWN_CONFIGS["lo" if br <= 64 else "hi"]
    return _record(f"qlora_lora_down_{kernel}_r{R}_bf16", f"{bm}x{bc} r{br} w{warps} s{stages}", report)


def estimate(kernel: str, m: int, tile: dict) -> dict:
    """Bytes, issued MMA FLOPs and instruction issue of the ``kernel`` launch at this M.
    fwd: output [M, N], loop over K, LoRA L = x @ A^T, up-projection by B; dx: output
    [M, K], loop over N, L = dy' @ B, up-projection by A (docs/design.md)."""
    kern = _kern()
    bm = tile["BLOCK_M"]
    c, loop, bc = (N, K, tile["BLOCK_N"]) if kernel == "fwd" else (K, N, tile["BLOCK_K"])
    m_tiles, c_tiles = -(-m // bm), -(-c // bc)
    w_bytes = N * K // 2  # packed NF4
    absmax_bytes = (
        N * K // BLOCKSIZE + 4 * (N * K // BLOCKSIZE // NESTED_BLOCKSIZE) + 4
    )  # uint8 codes + fp32 nested
    side = 2 * m * R if kernel == "fwd" else 4 * m * R  # xa (bf16) / g (fp32) written
    pre = tile["pre"]
    # activations in and out, the side output, the up-projection's L (B or A) once; the
    # down-projection's (A or B) and the fp32 product read back when precomputed
    act = 2 * (m * loop + m * c) + side + 2 * R * c + (4 * m * R if pre else 2 * R * loop)
    splits = tile["splits"]
    # split schedule: fp32 partials [S, M, C] and [S, M, R] written once and read once
    workspace = 0 if splits == 1 else 2 * 4 * splits * m * (c + R)
    fused_bytes = w_bytes + absmax_bytes + act + workspace
    # MMA work as issued: M padded to BLOCK_M, r to BLOCK_R (at least 32 at small M: block_r);
    # the down-projection recomputed by each of the c_tiles programs unless precomputed.
    mp, br = m_tiles * bm, tile["BLOCK_R"]
    recompute = 0 if pre else 2 * mp * loop * br * c_tiles
    mma_flops = 2 * mp * N * K + recompute + 2 * mp * br * c
    decodes = N * K * m_tiles  # every M-tile program decodes the whole W once
    cost = dequant_cost(kernel, m)
    t_mem, t_mma = fused_bytes / HBM_BPS, mma_flops / MMA_FLOPS
    t_alu = decodes * cost["sass_per_elem"] / ALU_IPS
    main = max(t_mem, t_mma, t_alu)
    down = None
    if pre:  # qlora_lora_down_kernel first: [M, loop] x [loop, r] -> fp32 [M, r]
        dcost = down_cost(kernel)
        dbm = int(dcost["config"].split("x")[0])
        d_bytes = 2 * m * loop + 2 * R * loop + 4 * m * R
        d_flops = 2 * (-(-m // dbm) * dbm) * loop * br
        d_mem, d_mma = d_bytes / HBM_BPS, d_flops / MMA_FLOPS
        d_alu = m * loop * dcost["sass_per_elem"] / ALU_IPS
        down = {
            "cost": dcost,
            "bytes": d_bytes,
            "flops": d_flops,
            "t_mem": d_mem,
            "t_mma": d_mma,
            "t_alu": d_alu,
            "t": max(d_mem, d_mma, d_alu) + LAUNCH_S,
        }
    fused = main + (down["t"] if down else 0.0)
    base_bytes = 2 * (N * K + m * K + m * N)  # cuBLAS bf16: W at 2 bytes/param
    base_flops = 2 * m * N * K
    t_base = max(base_bytes / HBM_BPS, base_flops / MMA_FLOPS)
    return {
        "kernel": kernel,
        "m": m,
        "tile": tile,
        "cost": cost,
        "fused_bytes": fused_bytes,
        "mma_flops": mma_flops,
        "useful_flops": 2 * m * N * K + 2 * m * loop * R + 2 * m * R * c,
        "decodes": decodes,
        "programs": m_tiles * c_tiles * splits,
        "splits": splits,
        "workspace": workspace,
        "t_mem": t_mem,
        "t_mma": t_mma,
        "t_alu": t_alu,
        "main": main,
        "down": down,
        "fused": fused,
        "bound": {t_mem: "HBM", t_mma: "MMA", t_alu: "instruction issue"}[main],
        "base_bytes": base_bytes,
        "base_flops": base_flops,
        "t_base": t_base,
        "ratio": t_base / fused,
        "pre_m": kern.PRE_LORA_M,
    }


def _aot_rows(parts: int = 2) -> list[dict]:
    """Compile every table config (worst BLOCK_R of its bucket) for sm_80/sm_90 in ``parts``
    clean processes (each takes every parts-th compile), in table order."""
    code = r"""
import json, os, subprocess, sys, tempfile, warnings
warnings.filterwarnings("ignore")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qpeft.backends.triton.qlora import _kernels
kern = _kernels()
cuobj = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
rows = []
jobs = []
for name, table in (("fwd", kern._FWD_CONFIGS), ("dx", kern._DX_CONFIGS)):
    for regime, configs in table.items():
        r = 64 if regime[1] == "lo" else 256
        for i, cfg in enumerate(configs):
            entry = kern._aot_entry(name, regime, r)
            defaults = {a: kern.default_config(name, regime, a) is cfg for a in (80, 90)}
            jobs.append((name, "/".join(regime), r, defaults, cfg, entry, dict(entry["constexprs"], **cfg.kwargs)))
for name in ("fwd", "dx"):  # the PRE_LORA variant of the large-M defaults (M >= PRE_LORA_M)
    for regime in (("large", "lo"), ("large", "hi")):
        r = 64 if regime[1] == "lo" else 256
        for arch in (80, 90):
            cfg = kern.default_config(name, regime, arch)
            entry = kern._aot_entry(name, regime, r, pre=True)
            default = {a: a == arch and a // 10 in kern.PRE_LORA_ARCHS for a in (80, 90)}
            jobs.append((name, "/".join(regime) + " pre", r, default, cfg, entry,
                         dict(entry["constexprs"], **cfg.kwargs)))
for name, table in (("fwd", kern._FWD_SPLIT_CONFIGS), ("dx", kern._DX_SPLIT_CONFIGS)):
    for (bm, bucket), configs in table.items():
        r = 64 if bucket == "lo" else 256
        for i, cfg in enumerate(configs):
            entry = kern._aot_split_entry(name, bm, r)
            tiles = {k: cfg.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
            jobs.append((name, f"split{bm}/{bucket}", r, {80: i == 0, 90: i == 0}, cfg, entry,
                         dict(entry["constexprs"], **tiles)))
part, parts = int(sys.argv[1]), int(sys.argv[2])
work = [(j, arch) for j in range(len(jobs)) for arch in (80, 90)]
for index, (j, arch) in enumerate(work):
    if index % parts != part:
        continue
    name, regime, r, defaults, cfg, entry, constexprs = jobs[j]
    src = ASTSource(entry["fn"], entry["signature"], constexprs, entry["attrs"])
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"]); f.flush()
        dump = subprocess.run([cuobj, "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    line = next(l for l in dump.splitlines() if "REG:" in l).split()
    res = dict(item.split(":", 1) for item in line if ":" in item)
    rows.append({"index": index, "kernel": name, "regime": regime, "r": r, "default": defaults[arch],
                 "tile": [cfg.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")],
                 "warps": cfg.num_warps, "stages": cfg.num_stages, "arch": f"sm_{arch}",
                 "reg": int(res["REG"]), "stack": int(res["STACK"]), "local": int(res["LOCAL"]),
                 "smem": int(k.metadata.shared)})
print(json.dumps(rows))
"""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(i), str(parts)],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(parts)
    ]
    rows = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"AOT compile failed:\n{err[-4000:]}")
        rows += json.loads(out.strip().splitlines()[-1])
    return [{k: v for k, v in r.items() if k != "index"} for r in sorted(rows, key=lambda r: r["index"])]


_MMA_WORDS = {
    "wgmma-wait": "each wgmma is waited on inside the iteration that issued it",
    "wgmma-async": "wgmma groups stay in flight across iterations",
    "mma.sync": "synchronous warp-level MMA",
}


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f}"


def _alt(e: dict) -> dict | None:
    """The same launch with the other LoRA schedule (fused recompute <-> PRE_LORA) where the
    unsplit large-M kernel runs: the comparison the PRE_LORA_M rule rests on."""
    t = e["tile"]
    if t["splits"] != 1 or e["m"] <= 16:
        return None
    return estimate(e["kernel"], e["m"], dict(t, pre=not t["pre"]))


_WHAT = {
    "fwd": "forward y = x @ dequant(W)^T + s * (x @ A^T) @ B^T (output [M, N], loop over K)",
    "dx": "dx = dy' @ dequant(W) + s * (dy' @ B) @ A (output [M, K], loop over N)",
}


def markdown(rows: list[dict], aot: list[dict] | None) -> str:
    pre_m = rows[0]["pre_m"]
    lines = [
        "# Fused QLoRA forward and dx: roofline ESTIMATE (H100 SXM)",
        "",
        "**An estimate from byte, FLOP and static instruction counts, not a measurement: no GPU was "
        "available and no GPU time was measured.** Generated by `python -m benchmarks.roofline_qlora`.",
        "",
        f"Problems: the {_WHAT['fwd']}; and {_WHAT['dx']}; K = N = {K}, r = {R}, bf16 activations, "
        f"W NF4 with double quantization (blocksize {BLOCKSIZE}, nested {NESTED_BLOCKSIZE}).",
        "",
        "Assumed peaks: HBM3 3.35 TB/s; dense bf16 tensor core 989 TFLOP/s; instruction issue "
        f"{ALU_IPS / 1e12:.1f} T lane-instructions/s (132 SMs x 4 schedulers x 32 lanes x 1.98 GHz, one "
        "warp-instruction per scheduler per cycle, no stalls: an upper bound on the issue rate). "
        f"ASSUMED, not derived: {LAUNCH_S * 1e6:g} us fixed cost for the extra kernel of the "
        "precomputed schedule (launch gap, ramp and tail of its small grid).",
        "",
        f"Instruction cost: counted, not assumed. Every SASS instruction of the kernel's main loop "
        f"(sm_{ARCH}, the launcher's default config) x threads per CTA / W elements one iteration decodes "
        "(the down-projection kernel: / activation elements one iteration reads), "
        "from the static report `benchmarks/results/sass_report.json` (`python -m benchmarks.sass_report`, "
        "method in docs/sass_report.md). It covers the whole loop: dequant, loads, shared-memory staging, "
        "MMA issue and waits, address math, and the LoRA tiles where the loop has them.",
        "",
        "| kernel | M | config (sm_90 SASS) | regs | CTAs/SM | mma | W load B | loop instrs | W elems / iter "
        "| instr / W elem |",
        "| --- | ---: | --- | ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for e in rows:
        c = e["cost"]
        lines.append(
            f"| {e['kernel']} | {e['m']} | {c['config']} | {c['regs']} | {c['ctas_per_sm']} ({c['ctas_limiter']}) "
            f"| {c['mma']} | {c['load_bytes']} | {c['loop_instrs']} | {c['elems_per_iter']} | {c['sass_per_elem']} |"
        )
    for kernel in KERNELS:
        d = next((e["down"] for e in rows if e["kernel"] == kernel and e["down"]), None)
        if d:
            c = d["cost"]
            lines.append(
                f"| {kernel} down-projection (M >= {pre_m}) | | {c['config']} | {c['regs']} "
                f"| {c['ctas_per_sm']} ({c['ctas_limiter']}) | {c['mma']} | {c['load_bytes']} "
                f"| {c['loop_instrs']} | {c['elems_per_iter']} (activations) | {c['sass_per_elem']} |"
            )
    lines += [
        "",
        "Model: fused time = max(bytes / HBM, issued MMA FLOPs / tensor peak, decodes x instr / issue rate), "
        "i.e. perfect overlap of the three; every operand crosses HBM once (L2 absorbs re-reads of the "
        "activations, A, B and absmax across programs). Issued MMA FLOPs pad M to BLOCK_M and, in the fused "
        "schedule, include the LoRA down-projection (x @ A^T, dx: dy' @ B) recomputed by each of the "
        "C / BLOCK_C programs along the output columns (r / BLOCK_N extra work for the forward, r / BLOCK_K "
        "for dx). Each M-tile program decodes all of W once: decodes = N x K x ceil(M / BLOCK_M). At M <= 64, "
        "when the output tiles do not fill the 132 SMs, the launcher runs the split schedule "
        '(docs/design.md, "Triton configs"): the loop is split S ways (programs = M-tiles x C-tiles x S), the '
        "fp32 partials cross HBM twice (the workspace column), and the second (reduction) kernel's launch and "
        f"tail are not modelled. At M >= {pre_m} (PRE_LORA_M) the launcher precomputes the down-projection "
        "(qlora_lora_down_kernel: one more read of the activations, the fp32 [M, r] product written and read "
        "back) and the main kernel's loop is the base GEMM alone: its row adds the down kernel's own "
        "max(bytes / HBM, FLOPs / peak, instrs / issue) + the assumed fixed cost, in series. `other "
        "schedule us` is the same launch with the other LoRA schedule (fused recompute <-> precomputed), "
        "the comparison behind PRE_LORA_M. Baseline: a bf16 cuBLAS GEMM on the unquantized W (2 bytes/param) "
        "at the same peaks, max(bytes / HBM, 2MNK / peak), without the LoRA path.",
    ]
    for kernel in KERNELS:
        lines += [
            "",
            f"### {kernel}: {_WHAT[kernel]}",
            "",
            "| M | tile (BM x BN x BK, warps, stages) | LoRA down | splits | programs | main bytes (fp32 workspace) "
            "| issued MMA GFLOP | W decodes (M) "
            "| HBM us | MMA us | issue us | main us (bound) | down kernel us | fused us | other schedule us "
            "| cuBLAS bf16 bytes | cuBLAS us | predicted speedup |",
            "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
            "| ---: | ---: | ---: | ---: |",
        ]
        for e in (e for e in rows if e["kernel"] == kernel):
            t = e["tile"]
            alt = _alt(e)
            other = (
                f"{_us(alt['fused'])} ({'precomputed' if alt['tile']['pre'] else 'fused'})" if alt else "-"
            )
            lines.append(
                f"| {e['m']} | {t['BLOCK_M']}x{t['BLOCK_N']}x{t['BLOCK_K']}, {t['num_warps']}, {t['num_stages']} "
                f"| {'precomputed' if t['pre'] else 'fused'} "
                f"| {e['splits']} | {e['programs']} | {e['fused_bytes'] / 1e6:.2f} MB ({e['workspace'] / 1e6:.3f} MB) "
                f"| {e['mma_flops'] / 1e9:.2f} | {e['decodes'] / 1e6:.1f} "
                f"| {_us(e['t_mem'])} | {_us(e['t_mma'])} | {_us(e['t_alu'])} | {_us(e['main'])} ({e['bound']}) "
                f"| {_us(e['down']['t']) if e['down'] else '-'} | {_us(e['fused'])} "
                f"| {other} "
                f"| {e['base_bytes'] / 1e6:.1f} MB | {_us(e['t_base'])} | {e['ratio']:.2f}x |"
            )
    lines += ["", "Reading:", ""]
    for kernel in KERNELS:
        ks = [e for e in rows if e["kernel"] == kernel]
        small, large = ks[0], ks[-1]
        alt = _alt(large)
        lines.append(
            f"- {kernel}: at M = {small['m']} (decode) {_us(small['fused'])} us ({small['bound']}-bound, "
            f"{small['splits']} splits), {small['ratio']:.2f}x of cuBLAS; at M = {large['m']} "
            f"{_us(large['fused'])} us = main loop {_us(large['main'])} us ({large['bound']}-bound: MMA "
            f"{_us(large['t_mma'])}, issue {_us(large['t_alu'])} at {large['cost']['sass_per_elem']:g} "
            f"instructions per W element per M-tile, HBM {_us(large['t_mem'])})"
            + (f" + down-projection {_us(large['down']['t'])} us" if large["down"] else "")
            + f": {large['ratio']:.2f}x of cuBLAS ({_us(large['t_base'])} us)"
            + (
                f"; the fused recompute would be {_us(alt['fused'])} us ({alt['ratio']:.2f}x)"
                if alt and large["tile"]["pre"]
                else ""
            )
            + f". The issued MMA work is {large['mma_flops'] / large['base_flops'] - 1:.1%} above the GEMM's "
            f"({large['cost']['mma']} in the SASS: {_MMA_WORDS.get(large['cost']['mma'], 'no MMA')}); the "
            "estimate assumes perfect overlap of MMA, issue and HBM."
        )
    lines.append("")
    if aot:
        lines += [
            "## Static evidence: registers and spills of every tile config",
            "",
            "Each config of the launchers' autotune tables compiled ahead of time (triton "
            '`compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32))`, '
            "bf16, NF4 + double quant, blocksize 64, bias and rank_scale on, K % blocksize == 0) at the "
            "largest BLOCK_R of its bucket (64 or 256), with the divisibility-by-16 hints the JIT derives "
            "at run time for torch tensors and LLM shapes. REG/STACK/LOCAL from `cuobjdump "
            "--dump-resource-usage` (Triton's wheel); STACK > 0 means spills. Default = the config the "
            "launcher runs on that arch (the table's first, or the arch's own tile: `_ARCH_DEFAULTS`).",
            "",
            "| kernel | regime | r | default | BM x BN x BK | warps | stages | arch | REG | STACK | LOCAL | smem B |",
            "| --- | --- | ---: | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
        ]
        for a in aot:
            lines.append(
                f"| {a['kernel']} | {a['regime']} | {a['r']} | {'yes' if a['default'] else ''} "
                f"| {'x'.join(map(str, a['tile']))} | {a['warps']} | {a['stages']} | {a['arch']} | {a['reg']} "
                f"| {a['stack']} | {a['local']} | {a['smem']} |"
            )
        spills = [a for a in aot if a["stack"] or a["local"]]
        lines += [
            "",
            f"{len(spills)} of {len(aot)} compilations spill"
            + (
                ": "
                + ", ".join(
                    f"{a['kernel']} {a['regime']} {'x'.join(map(str, a['tile']))} {a['arch']}" for a in spills
                )
                if spills
                else "."
            ),
            "",
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-aot", action="store_true", help="skip the ahead-of-time compile section")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "roofline_qlora.md")
    args = parser.parse_args(argv)
    rows = [estimate(kernel, m, _tile(kernel, m)) for kernel in KERNELS for m in MS]
    aot = None if args.no_aot else _aot_rows()
    text = markdown(rows, aot)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
