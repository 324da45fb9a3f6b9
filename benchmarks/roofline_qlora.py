"""Roofline ESTIMATE of the fused QLoRA forward (no GPU timing), plus static evidence.

    python -m benchmarks.roofline_qlora [--no-aot] [--out benchmarks/roofline_qlora.md]

Writes benchmarks/roofline_qlora.md: for M in {1, 16, 32, 64, 4096}, K = N = 4096, r = 16
on an H100 SXM (peaks assumed below), the bytes and FLOPs of the fused Triton forward
(qpeft.triton_kernels.qlora.qlora_fwd_kernel, or at small M the split schedule
qlora_fwd_split_kernel + qlora_split_reduce_kernel) with the tile config and split count
its launcher uses on 132 SMs,
the predicted time max(bytes / HBM, MMA FLOPs / tensor peak, main-loop instructions /
issue rate), and the ratio to a bf16 cuBLAS GEMM on the unquantized weight. The
instructions per decoded W element are counted in the sm_90 SASS of the launcher's
default config by ``python -m benchmarks.sass_report`` and read from its committed
report (benchmarks/results/sass_report.json; method in docs/sass_report.md).
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
MS = (1, 16, 32, 64, 4096)
SMS = 132  # H100 SXM


def _plan(m: int):
    """The launcher's split plan at this M on SMS SMs (None: the unsplit kernel)."""
    import torch

    from qpeft.backends.triton.qlora import _kernels

    kern = _kernels()
    kern._sm_count.cache_clear()
    assert kern.INTERPRET_SMS == SMS  # a CPU device stands for the H100 in the plan
    return kern._split_plan("fwd", m, N, K, R, torch.device("cpu"), None)


def _tile(m: int) -> dict:
    """The launcher's forward config for this M: the split table's (with its split count)
    or the first entry of the regime's table."""
    from qpeft.backends.triton.qlora import _kernels

    kern = _kernels()
    plan = _plan(m)
    if plan is not None:
        cfg, warps, stages, br, splits, _ = plan
        return {**{k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}, "num_warps": warps,
                "num_stages": stages, "BLOCK_R": br, "splits": splits}  # fmt: skip
    cfg = kern.default_config("fwd", kern._regime(m, kern.block_r(R, m)), ARCH)  # the sm_90 tile
    return {
        "BLOCK_M": cfg.kwargs["BLOCK_M"],
        "BLOCK_N": cfg.kwargs["BLOCK_N"],
        "BLOCK_K": cfg.kwargs["BLOCK_K"],
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
        "BLOCK_R": kern.block_r(R, m),
        "splits": 1,
    }


def dequant_cost(m: int, report: Path = REPORT) -> dict:
    """The sass_report record of the forward config the launcher runs at this M (r = R, bf16,
    NF4 with double quantization) on sm_<ARCH>; refuses a report whose tile is not the
    launcher's (stale: rerun ``python -m benchmarks.sass_report``)."""
    from qpeft.backends.triton.qlora import _kernels

    kern = _kernels()
    tile = _tile(m)
    if _plan(m) is not None:
        name = f"qlora_fwd_split{tile['BLOCK_M']}M_r{R}_bf16"
    else:
        name = f"qlora_fwd_{kern._regime(m, kern.block_r(R, m))[0]}M_r{R}_bf16"
    records = json.loads(report.read_text())
    found = [r for r in records if r["name"] == name and r["arch"] == ARCH]
    if len(found) != 1:
        raise RuntimeError(
            f"{report}: {len(found)} records named {name} for sm_{ARCH}; regenerate the report"
        )
    rec = found[0]
    expect = f"{tile['BLOCK_M']}x{tile['BLOCK_N']}x{tile['BLOCK_K']} r{tile['BLOCK_R']} w{tile['num_warps']} s{tile['num_stages']}"
    if rec["config"] != expect:
        raise RuntimeError(
            f"{report}: {name} is {rec['config']!r}, the launcher runs {expect!r}; regenerate it"
        )
    return rec


def estimate(m: int, tile: dict) -> dict:
    bm, bn = tile["BLOCK_M"], tile["BLOCK_N"]
    m_tiles, n_tiles = -(-m // bm), -(-N // bn)
    w_bytes = N * K // 2  # packed NF4
    absmax_bytes = (
        N * K // BLOCKSIZE + 4 * (N * K // BLOCKSIZE // NESTED_BLOCKSIZE) + 4
    )  # uint8 codes + fp32 nested
    act = 2 * (m * K + R * K + N * R + m * N + m * R)  # x, A, B, y, xa (bf16), each once
    splits = tile["splits"]
    # split schedule: fp32 partials [S, M, N] and [S, M, R] written once and read once
    workspace = 0 if splits == 1 else 2 * 4 * splits * m * (N + R)
    fused_bytes = w_bytes + absmax_bytes + act + workspace
    # MMA work as issued: M padded to BLOCK_M, r to BLOCK_R (at least 32 at small M: block_r);
    # x @ A^T recomputed by each of the n_tiles programs.

    mp, br = m_tiles * bm, tile["BLOCK_R"]
    mma_flops = 2 * mp * N * K + 2 * mp * K * br * n_tiles + 2 * mp * br * N
    decodes = N * K * m_tiles  # every M-tile program decodes the whole W once
    cost = dequant_cost(m)
    t_mem, t_mma = fused_bytes / HBM_BPS, mma_flops / MMA_FLOPS
    t_alu = decodes * cost["sass_per_elem"] / ALU_IPS
    fused = max(t_mem, t_mma, t_alu)
    base_bytes = 2 * (N * K + m * K + m * N)  # cuBLAS bf16: W at 2 bytes/param
    base_flops = 2 * m * N * K
    t_base = max(base_bytes / HBM_BPS, base_flops / MMA_FLOPS)
    return {
        "m": m,
        "tile": tile,
        "cost": cost,
        "fused_bytes": fused_bytes,
        "mma_flops": mma_flops,
        "useful_flops": 2 * m * N * K + 2 * m * K * R + 2 * m * R * N,
        "decodes": decodes,
        "programs": m_tiles * n_tiles * splits,
        "splits": splits,
        "workspace": workspace,
        "t_mem": t_mem,
        "t_mma": t_mma,
        "t_alu": t_alu,
        "fused": fused,
        "bound": {t_mem: "HBM", t_mma: "MMA", t_alu: "instruction issue"}[fused],
        "base_bytes": base_bytes,
        "base_flops": base_flops,
        "t_base": t_base,
        "ratio": t_base / fused,
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


def markdown(rows: list[dict], aot: list[dict] | None) -> str:
    lines = [
        "# Fused QLoRA forward: roofline ESTIMATE (H100 SXM)",
        "",
        "**An estimate from byte, FLOP and static instruction counts, not a measurement: no GPU was "
        "available and no GPU time was measured.** Generated by `python -m benchmarks.roofline_qlora`.",
        "",
        f"Problem: y = x @ dequant(W)^T + s * (x @ A^T) @ B^T, K = N = {K}, r = {R}, bf16 activations, "
        f"W NF4 with double quantization (blocksize {BLOCKSIZE}, nested {NESTED_BLOCKSIZE}).",
        "",
        "Assumed peaks: HBM3 3.35 TB/s; dense bf16 tensor core 989 TFLOP/s; instruction issue "
        f"{ALU_IPS / 1e12:.1f} T lane-instructions/s (132 SMs x 4 schedulers x 32 lanes x 1.98 GHz, one "
        "warp-instruction per scheduler per cycle, no stalls: an upper bound on the issue rate).",
        "",
        f"Instruction cost: counted, not assumed. Every SASS instruction of the forward kernel's main K loop "
        f"(sm_{ARCH}, the launcher's default config) x threads per CTA / W elements one iteration decodes, "
        "from the static report `benchmarks/results/sass_report.json` (`python -m benchmarks.sass_report`, "
        "method in docs/sass_report.md). It covers the whole loop: dequant, loads, shared-memory staging, "
        "MMA issue and waits, address math. (An earlier version of this file assumed 6.)",
        "",
        "| M | config (sm_90 SASS) | regs | CTAs/SM | mma | W load B | loop instrs | W elems / iter "
        "| instr / W elem |",
        "| ---: | --- | ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for e in rows:
        c = e["cost"]
        lines.append(
            f"| {e['m']} | {c['config']} | {c['regs']} | {c['ctas_per_sm']} ({c['ctas_limiter']}) | {c['mma']} "
            f"| {c['load_bytes']} | {c['loop_instrs']} | {c['elems_per_iter']} | {c['sass_per_elem']} |"
        )
    lines += [
        "",
        "Model: fused time = max(bytes / HBM, issued MMA FLOPs / tensor peak, decodes x instr / issue rate), "
        "i.e. perfect overlap of the three; every operand crosses HBM once (L2 absorbs re-reads of x, A, B "
        "and absmax across programs). Issued MMA FLOPs pad M to BLOCK_M and include x @ A^T recomputed by "
        "each of the N / BLOCK_N programs (r / BLOCK_N extra work). Each M-tile program decodes all of W "
        "once: decodes = N x K x ceil(M / BLOCK_M). At M <= 64, when the N-tiles do not fill the 132 SMs, "
        'the launcher runs the split schedule (docs/design.md, "Triton configs"): K is split S ways '
        "(programs = M-tiles x N-tiles x S), the fp32 partials cross HBM twice (the workspace column), and "
        "the second (reduction) kernel's launch and tail are not modelled. Baseline: a bf16 cuBLAS GEMM on the unquantized W "
        "(2 bytes/param) at the same peaks, max(bytes / HBM, 2MNK / peak), without the LoRA path.",
        "",
        "| M | tile (BM x BN x BK, warps, stages) | K splits | programs | fused bytes (fp32 workspace) "
        "| issued MMA GFLOP | W decodes (M) "
        "| HBM us | MMA us | issue us | fused us (bound) | cuBLAS bf16 bytes | cuBLAS us | predicted speedup |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for e in rows:
        t = e["tile"]
        lines.append(
            f"| {e['m']} | {t['BLOCK_M']}x{t['BLOCK_N']}x{t['BLOCK_K']}, {t['num_warps']}, {t['num_stages']} "
            f"| {e['splits']} | {e['programs']} | {e['fused_bytes'] / 1e6:.2f} MB ({e['workspace'] / 1e6:.3f} MB) | {e['mma_flops'] / 1e9:.2f} | {e['decodes'] / 1e6:.1f} "
            f"| {_us(e['t_mem'])} | {_us(e['t_mma'])} | {_us(e['t_alu'])} | {_us(e['fused'])} ({e['bound']}) "
            f"| {e['base_bytes'] / 1e6:.1f} MB | {_us(e['t_base'])} | {e['ratio']:.2f}x |"
        )
    small, large = rows[0], rows[-1]
    lines += [
        "",
        f"Reading: at M = {small['m']} (decode) the fused kernel moves "
        f"{small['base_bytes'] / small['fused_bytes']:.1f}x fewer bytes than the bf16 GEMM (about 0.53 vs 2 "
        f"bytes per parameter), but its main loop issues {small['cost']['sass_per_elem']:g} instructions per "
        f"decoded W element: {_us(small['t_alu'])} us of issue against {_us(small['t_mem'])} us of HBM time, so "
        f"it is predicted {small['bound']}-bound at {small['ratio']:.2f}x of cuBLAS -- and issue at one "
        "warp-instruction per scheduler per cycle is itself optimistic: the grid is "
        f"{small['programs']} CTAs of {small['cost']['threads'] // 32} warps for 132 SMs (occupancy would allow "
        f"{small['cost']['ctas_per_sm']} per SM), so about "
        f"{small['programs'] * small['cost']['threads'] / 32 / (132 * 4):.1f} warps per scheduler ({small['splits']} K "
        "splits), few to hide latency. At "
        f"M = {large['m']} the fused kernel issues {large['mma_flops'] / large['base_flops'] - 1:.1%} more MMA "
        f"work than the GEMM (x @ A^T recomputed per N-tile plus the LoRA up-projection) and "
        f"{large['cost']['sass_per_elem']:g} instructions per W element per M-tile ({_us(large['t_alu'])} us of "
        f"issue against {_us(large['t_mma'])} us of MMA): predicted {large['bound']}-bound at "
        f"{large['ratio']:.2f}x of cuBLAS on a bf16 weight, and only if issue and MMA overlap perfectly "
        f"({large['cost']['mma']} in the SASS: {_MMA_WORDS.get(large['cost']['mma'], 'no MMA')}). The W "
        'decode is register-resident with 16-byte W loads (docs/design.md, "Fused kernels: register '
        'decode"): per 32-bit word of 8 codes 16 prmt and 5 integer ops, per block table and row 32 more; '
        "the rest of the loop is operand staging in shared memory, MMA issue and waits, and the LoRA tiles. "
        "The decode alone is 3 to 3.6 instructions per element while it stays bit-exact (the table is "
        "code x absmax in fp32, rounded once; docs/design.md). "
        + (
            f"At M = {large['m']} issue now stays under the MMA time, so what keeps the estimate below "
            "cuBLAS is the extra MMA work of the fused LoRA path, and the estimate assumes a perfect overlap "
            "that the per-step wgmma wait does not give."
            if large["bound"] == "MMA"
            else f"At M = {large['m']} the issue bound is above the MMA bound: cutting instructions per "
            "element moves the estimate."
        ),
        "",
    ]
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
    rows = [estimate(m, _tile(m)) for m in MS]
    aot = None if args.no_aot else _aot_rows()
    text = markdown(rows, aot)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
