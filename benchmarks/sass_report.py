"""Static SASS report: instructions per decoded weight element in each kernel's main loop.

    python -m benchmarks.sass_report --out DIR [--arch 80 90] [--jobs 1] [--no-cuda]
        [--modules quant qlora] [--smoke]

Compiles, with no GPU, every Triton kernel config (``AOT_CONFIGS`` of each module in
``qpeft.triton_kernels`` plus the non-default tiles of the fused QLoRA launchers' tables)
and the CUDA C++ dequantize / gemv_4bit kernels (``nvcc -cubin``) for sm_80 and sm_90,
disassembles each cubin with the ``nvdisasm`` shipped in Triton's wheel, finds the main
loop and writes ``DIR/sass_report.json`` (one record per kernel, config and arch) and
``DIR/sass_report.md``. The method, its rules and its limits: docs/sass_report.md.

Record fields: kernel, config, name, default, arch (80/90), threads, regs, spills (local
load/store instructions in the SASS), stack_bytes, local_bytes, smem_bytes, ctas_per_sm
(and its limiter), mma (wgmma-async, wgmma-wait, mma.sync, none), load_bytes (widest
global load of W in the main loop), region (loop or kernel), loop_instrs (instructions on
the counted path through the main loop), elems_per_iter, unroll (iterations per pass through the
loop body), sass_per_elem = loop_instrs x threads / (elems_per_iter x unroll), plus the
evidence the figures rest on (MMA counts, W loads).

A static count: nothing here ran on a GPU and no time was measured. The pure functions
(parse_sass, main_region, mma_kind, occupancy, ...) are tested on a committed SASS fixture
and a small compiled kernel in tests/test_sass_report.py.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------
# SASS text (nvdisasm -c -gi) -> instructions
# ---------------------------------------------------------------------------------------

_SECTION = re.compile(r"^//-+ \.text\.(\S+)")
_LABEL = re.compile(r"^(\.L\w+):")
_INSTR = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(.*?)\s*;")
_LOC = re.compile(r'//## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')
_PRED = re.compile(r"^@(!?)(U?P\w+)\s+")
_TARGET = re.compile(r"`\((\.L\w+)\)")

# Opcodes that end a basic block. CALL.REL.NOINC is ptxas' loop-exit jump (no return);
# a plain CALL.REL returns to the next instruction, so it does not end a block (the
# subroutine's instructions are not counted: docs/sass_report.md, "Limits").
_JUMPS = ("BRA", "BRX", "JMP", "JMX", "CALL.REL.NOINC", "CALL.ABS.NOINC")
_ENDS = ("EXIT", "RET", "KILL")
_GLOBAL_LOADS = ("LDG", "LDGSTS", "UTMALDG", "UBLKCP")


@dataclass
class Instr:
    """One SASS instruction: byte address, guard predicate ('' = always), opcode with its
    modifiers (e.g. LDG.E.U8), operand text, jump target label and source locations."""

    addr: int
    pred: str
    opcode: str
    operands: str
    target: str | None = None
    locs: frozenset = field(default_factory=frozenset)

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def conditional(self) -> bool:
        return self.pred not in ("", "PT", "UPT")


def parse_sass(text: str) -> dict[str, tuple[list[Instr], dict[str, int]]]:
    """{function: (instructions, {label: address})} of nvdisasm output.

    Source locations come from the ``//## File "f", line n [inlined at "g", line m]``
    comments (nvdisasm -gi on a cubin with line info): each instruction carries every
    (file, line) of the comment block above it, an instruction without one those of the
    previous instruction. Without line info the sets are empty."""
    out: dict[str, tuple[list[Instr], dict[str, int]]] = {}
    name = None
    instrs: list[Instr] = []
    labels: dict[str, int] = {}
    pending: list[str] = []
    locs: frozenset = frozenset()
    fresh = False  # the next location comment starts a new block
    for line in text.splitlines():
        if m := _SECTION.match(line.strip()):
            name = m.group(1)
            instrs, labels, pending, locs, fresh = [], {}, [], frozenset(), False
            out[name] = (instrs, labels)
            continue
        if name is None:
            continue
        stripped = line.strip()
        if m := _LOC.search(stripped):
            if fresh:
                locs, fresh = frozenset(), False
            extra = {(m.group(1), int(m.group(2)))}
            if m.group(3):
                extra.add((m.group(3), int(m.group(4))))
            locs = locs | extra
            continue
        if m := _LABEL.match(stripped):
            pending.append(m.group(1))
            continue
        if m := _INSTR.match(line):
            addr, body = int(m.group(1), 16), m.group(2)
            for label in pending:
                labels[label] = addr
            pending = []
            pred = ""
            if p := _PRED.match(body):
                pred = ("!" if p.group(1) else "") + p.group(2)
                body = body[p.end() :]
            opcode, _, operands = body.partition(" ")
            t = _TARGET.search(operands)
            instrs.append(Instr(addr, pred, opcode, operands.strip(), t.group(1) if t else None, locs))
            fresh = True
    return out


def _is_jump(ins: Instr) -> bool:
    return ins.opcode.startswith(_JUMPS) and ins.target is not None


# ---------------------------------------------------------------------------------------
# Control flow: basic blocks, loops, the counted path
# ---------------------------------------------------------------------------------------


def basic_blocks(instrs: list[Instr], labels: dict[str, int]) -> tuple[list[tuple[int, int]], dict]:
    """([(first, last) instruction index of each block], {block: [successor blocks]})."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    leaders = {0}
    for i, ins in enumerate(instrs):
        if _is_jump(ins):
            leaders.add(index[labels[ins.target]])
            leaders.add(i + 1)
        elif ins.base in _ENDS:
            leaders.add(i + 1)
    starts = sorted(x for x in leaders if x < len(instrs))
    blocks = [(s, (starts[j + 1] if j + 1 < len(starts) else len(instrs)) - 1) for j, s in enumerate(starts)]
    block_of = {s: b for b, (s, _) in enumerate(blocks)}
    succ: dict[int, list[int]] = {}
    for b, (_, last) in enumerate(blocks):
        ins = instrs[last]
        nxt = [b + 1] if b + 1 < len(blocks) else []
        if _is_jump(ins):
            tgt = block_of[index[labels[ins.target]]]
            succ[b] = [tgt] + (nxt if ins.conditional else [])
        elif ins.base in _ENDS:
            succ[b] = nxt if ins.conditional else []
        else:
            succ[b] = nxt
    return blocks, succ


def loops(instrs: list[Instr], labels: dict[str, int]) -> list[tuple[int, int]]:
    """(header, latch) instruction indices of every backward jump: the loop is the address
    range from the jump's target (header) to the jump (latch), inclusive."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    found = []
    for i, ins in enumerate(instrs):
        if _is_jump(ins) and labels[ins.target] <= ins.addr:
            found.append((index[labels[ins.target]], i))
    return found


def is_mma(ins: Instr) -> bool:
    return ins.base in ("HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "BGMMA", "DMMA", "UTCHMMA")


@dataclass
class Region:
    kind: str  # "loop" (the main loop) or "kernel" (no loop holds the anchor: the whole kernel)
    first: int  # instruction index range of the region, inclusive
    last: int
    path: list[int]  # instruction indices on the counted path
    note: str = ""


def _shortest_through(
    instrs, blocks, succ, first, last, start_block, end_blocks, anchors, loads=None
) -> list[int] | None:
    """Path of blocks from start_block to one of end_blocks through every anchor block (in
    address order), along forward edges inside [first, last]: the one issuing the most
    steady-state loads (``loads``: instruction indices; none given: every path ties), then
    the fewest instructions."""
    inside = {b for b, (s, e) in enumerate(blocks) if s >= first and e <= last}
    loads = loads or set()
    # per block: (-loads it issues, instructions): a path's key is the sum, lower is better
    cost = {
        b: (
            -sum(1 for i in range(blocks[b][0], blocks[b][1] + 1) if i in loads),
            blocks[b][1] - blocks[b][0] + 1,
        )
        for b in inside
    }

    def dist_from(src):  # DAG (forward edges only): relax in address order
        best = {src: (cost[src], [src])}
        for b in sorted(inside):
            if b not in best:
                continue
            for t in succ.get(b, []):
                if t in inside and t > b:
                    key = (best[b][0][0] + cost[t][0], best[b][0][1] + cost[t][1])
                    if t not in best or key < best[t][0]:
                        best[t] = (key, best[b][1] + [t])
        return best

    path: list[int] = []
    cur = start_block
    for target in sorted(set(anchors)) + [None]:
        best = dist_from(cur)
        if target is None:
            ends = [e for e in end_blocks if e in best]
            if not ends:
                return None
            seg = min((best[e] for e in ends), key=lambda v: v[0])[1]
        else:
            if target not in best:
                return None
            seg = best[target][1]
            cur = target
        path += seg if not path else seg[1:]
    return [i for b in path for i in range(blocks[b][0], blocks[b][1] + 1)]


def main_region(instrs: list[Instr], labels: dict[str, int], is_w_load, in_loop_line=None) -> Region:
    """The main loop: the innermost loop (smallest address range of a backward jump) whose
    body holds an MMA instruction; without MMA anywhere, the innermost loop holding the
    widest load of W (``is_w_load``), or, given ``in_loop_line`` (instructions from the
    source line of the loop statement), a loop holding one of those; without such a loop,
    the whole kernel. Where several innermost loops qualify (none inside another), the one
    holding the widest W load wins (a loop the compiler duplicated for a run-time flag,
    e.g. vector / scalar), then the smallest. The count is the path through the region
    (header to latch, or entry to EXIT) that passes every MMA block and the block of the
    widest W load, issues the most global loads (those outside loops nested in the region:
    the prefetch of the next tile and the absmax loads are taken, where alternatives exclude
    each other the branch with more loads), and among those has the fewest instructions:
    the steady-state path, not the cold branches (tail fix-ups, slow-path calls) beside it."""
    blocks, succ = basic_blocks(instrs, labels)
    block_at = {}
    for b, (s, e) in enumerate(blocks):
        for i in range(s, e + 1):
            block_at[i] = b
    has_mma = any(is_mma(x) for x in instrs)
    if has_mma:
        want = is_mma
    elif in_loop_line is not None:
        want = in_loop_line
    else:  # the loop of the widest W load: the fast path, not a per-byte fallback loop
        width = max((load_width(x.opcode) for x in instrs if is_w_load(x)), default=0)

        def want(x):
            return is_w_load(x) and load_width(x.opcode) == width

    candidates = [(h, t) for h, t in loops(instrs, labels) if any(want(instrs[i]) for i in range(h, t + 1))]
    if candidates:
        # innermost: holding no other candidate; then the widest W load (loop copies the
        # compiler made for a run-time flag), then the smallest
        candidates = [
            (h, t)
            for h, t in candidates
            if not any(h <= h2 and t2 <= t and (h2, t2) != (h, t) for h2, t2 in candidates)
        ]

        def key(ht):
            h, t = ht
            return (
                -max(
                    (load_width(instrs[i].opcode) for i in range(h, t + 1) if is_w_load(instrs[i])), default=0
                ),
                t - h,
            )

        first, last = min(candidates, key=key)
        kind, start, ends = "loop", block_at[first], [block_at[last]]
    else:
        first, last = 0, len(instrs) - 1
        kind, start = "kernel", 0
        ends = [
            b for b, (_, e) in enumerate(blocks) if instrs[e].base == "EXIT" and not instrs[e].conditional
        ]
    mma_blocks = [block_at[i] for i in range(first, last + 1) if is_mma(instrs[i])]
    w = [i for i in range(first, last + 1) if is_w_load(instrs[i])]
    widest = [block_at[max(w, key=lambda i: (load_width(instrs[i].opcode), -i))]] if w else []
    # The steady state issues every load of the iteration: prefetches guarded by "is there a
    # next tile", absmax loads guarded by "is this row inside W". Global loads inside a loop
    # nested in the region (per-element fallbacks) do not count.
    inner = [(h, t) for h, t in loops(instrs, labels) if first <= h and t <= last and (h, t) != (first, last)]
    steady = {
        i
        for i in range(first, last + 1)
        if is_global_load(instrs[i]) and not any(h <= i <= t for h, t in inner)
    }
    for anchors, note in (
        (mma_blocks + widest, ""),
        (widest, "path through the widest W load only"),
        ([], ""),
    ):
        path = _shortest_through(instrs, blocks, succ, first, last, start, ends, anchors, steady)
        if path is not None:
            return Region(kind, first, last, path, note)
    return Region(kind, first, last, list(range(first, last + 1)), "no path found: every instruction counted")


# ---------------------------------------------------------------------------------------
# Classification: loads, MMA kind, occupancy
# ---------------------------------------------------------------------------------------


def load_width(opcode: str) -> int:
    """Bytes per thread of a global load (LDG / LDGSTS): .U8/.S8 1, .U16/.S16 2, none 4,
    .64 8, .128 16; a TMA copy (UTMALDG / UBLKCP) moves a whole box: reported as 0."""
    parts = opcode.split(".")
    if parts[0] not in ("LDG", "LDGSTS"):
        return 0
    for tag, width in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if tag in parts[1:]:
            return width
    return 4


def is_global_load(ins: Instr) -> bool:
    return ins.base in _GLOBAL_LOADS


def mma_kind(instrs: list[Instr]) -> str:
    """'wgmma-wait': HGMMA in the loop and a WARPGROUP.DEPBAR that drains the wgmma queue
    (``.LE gsb0, 0x0``) after one of them in the same iteration, so no wgmma overlaps the
    next iteration's work; 'wgmma-async': HGMMA whose in-loop waits all leave >= 1 group
    in flight; 'mma.sync': HMMA (synchronous warp-level MMA); 'none' otherwise."""
    seen_wgmma = False
    drained = False
    for ins in instrs:
        if ins.base.endswith("GMMA"):
            seen_wgmma = True
        elif seen_wgmma and ins.opcode.startswith("WARPGROUP.DEPBAR"):
            m = re.search(r"0x([0-9a-f]+)|,\s*(\d+)\s*$", ins.operands)
            if m and int(m.group(1) or m.group(2), 16 if m.group(1) else 10) == 0:
                drained = True
    if seen_wgmma:
        return "wgmma-wait" if drained else "wgmma-async"
    if any(ins.base in ("HMMA", "IMMA", "DMMA") for ins in instrs):
        return "mma.sync"
    return "none"


def mma_macs(ins: Instr) -> int:
    """Multiply-accumulates one warp (HMMA) or warpgroup (HGMMA) issues with ``ins``."""
    m = re.match(r"H(G?)MMA\.(\d+)x?(\d+)x(\d+)", ins.opcode)
    if m and m.group(1):  # HGMMA.64x128x16
        return int(m.group(2)) * int(m.group(3)) * int(m.group(4))
    m = re.match(r"HMMA\.(\d)(\d)(\d+)", ins.opcode)  # HMMA.16816 = m16 n8 k16; HMMA.1688
    if m:
        shapes = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4)}
        mm, nn, kk = shapes.get(ins.opcode.split(".")[1], (0, 0, 0))
        return mm * nn * kk
    return 0


# Per-SM limits (CUDA C Programming Guide, "Compute capabilities" table) and allocation rules
# (docs/sass_report.md, "Occupancy").
ARCH_LIMITS = {
    80: {"regs": 65536, "smem": 164 * 1024, "threads": 2048, "ctas": 32},
    90: {"regs": 65536, "smem": 228 * 1024, "threads": 2048, "ctas": 32},
}
REG_UNIT = 256  # registers are allocated per warp in units of 256 (8 per thread)
SUB_PARTITIONS = 4  # each SM's register file is split over 4 schedulers' sub-partitions
SMEM_UNIT = 128  # shared memory allocation granularity, bytes
SMEM_RESERVED = 1024  # shared memory the driver reserves per CTA (sm_80 and later)


def occupancy(
    arch: int, regs: int, smem_bytes: int, threads: int, reserved_included: bool = False
) -> tuple[int, str]:
    """(resident CTAs per SM, the limiting resources joined by '+') for a kernel's regs/thread, shared
    bytes/CTA and threads/CTA on sm_<arch>. reserved_included: smem_bytes already holds the
    driver's reserved kilobyte (sm_90 cubins list it as static shared memory)."""
    lim = ARCH_LIMITS[arch]
    warps = -(-threads // 32)
    regs_per_warp = -(-regs * 32 // REG_UNIT) * REG_UNIT
    if regs_per_warp:
        warps_per_sub = (lim["regs"] // SUB_PARTITIONS) // regs_per_warp
        by_regs = warps_per_sub * SUB_PARTITIONS // warps
    else:
        by_regs = lim["ctas"]
    reserved = 0 if reserved_included else SMEM_RESERVED
    smem_per_cta = -(-(smem_bytes + reserved) // SMEM_UNIT) * SMEM_UNIT
    by_smem = lim["smem"] // smem_per_cta
    by_threads = lim["threads"] // (warps * 32)
    limits = {"regs": by_regs, "smem": by_smem, "threads": by_threads, "ctas": lim["ctas"]}
    ctas = min(limits.values())
    return ctas, "+".join(k for k, v in limits.items() if v == ctas)


# ---------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------


def triton_tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: this Triton wheel ships no {name}")
    return str(path)


def disassemble(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        return subprocess.run(
            [triton_tool("nvdisasm"), "-c", "-gi", str(path)], capture_output=True, text=True, check=True
        ).stdout


# as in benchmarks/triton_aot_report.py (not imported: that module clears TRITON_INTERPRET
# on import, and the tests import this one in an interpreter-mode process)
_RESOURCE = re.compile(r"Function ([\w$]+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def resources(cubin: bytes) -> dict[str, dict[str, int]]:
    """{function: {regs, stack_bytes, shared_static_bytes, local_bytes}} from cuobjdump."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        dump = subprocess.run(
            [triton_tool("cuobjdump"), "--dump-resource-usage", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    return {
        f: {"regs": int(r), "stack_bytes": int(s), "shared_static_bytes": int(sh), "local_bytes": int(lo)}
        for f, r, s, sh, lo in _RESOURCE.findall(dump)
    }


def analyze(
    instrs: list[Instr],
    labels: dict[str, int],
    *,
    arch: int,
    threads: int,
    regs: int,
    smem_bytes: int,
    elems_per_iter: int,
    w_lines: set[tuple[str, int]] | None,
    expected_macs: int = 0,
    loop_lines: set[tuple[str, int]] | None = None,
    w_bytes_per_iter: int = 0,
    triton: bool = False,
    static_smem: int = 0,
) -> dict:
    """The record fields that come from one function's SASS (see the module docstring).

    w_lines: the (real path, line) of the source lines that load W; a global load whose
    location set meets it is a W load. None (no line info): every global load counts.
    loop_lines: the line of the main loop's statement, for kernels without MMA whose W
    load line info is not trusted to pick the loop (see CUDA_KERNELS).
    w_bytes_per_iter: bytes of W one iteration loads (the CTA's W tile), to tell how many
    iterations one pass through the loop body makes (``unroll``). triton: a Triton load's
    line is its call's line plus 0 or one per 32-bit register it loads (Triton emits each
    load as inline PTX that first zeroes the destination registers, one line each)."""

    def is_w_load(ins: Instr) -> bool:
        if not is_global_load(ins):
            return False
        if w_lines is None:
            return True
        shifts = {0, max(1, load_width(ins.opcode) // 4)} if triton else {0}
        return any((os.path.realpath(f), n - d) in w_lines for f, n in ins.locs for d in shifts)

    def in_loop_line(ins: Instr) -> bool:
        return any((os.path.realpath(f), n) in loop_lines for f, n in ins.locs)

    region = main_region(instrs, labels, is_w_load, in_loop_line if loop_lines else None)
    body = [instrs[i] for i in range(region.first, region.last + 1)]
    path = [instrs[i] for i in region.path]
    w_loads = [x for x in path if is_w_load(x)]
    note = region.note
    if not w_loads and w_lines is not None:  # line info lost the W load (ptxas merged lines)
        w_loads = [x for x in path if is_global_load(x)]
        note = "; ".join(filter(None, [note, "no load attributed to W's source lines: widest global load"]))
        w_loads = [max(w_loads, key=lambda x: load_width(x.opcode))] if w_loads else []
    mmas = [x for x in path if is_mma(x)]
    # sm_90 cubins carry the driver's reserved 1 KiB as static shared memory
    # (.nv.shared.reserved): counted once (docs/sass_report.md, "Occupancy")
    ctas, limiter = occupancy(arch, regs, smem_bytes, threads, arch >= 90 and static_smem >= SMEM_RESERVED)
    warps = threads // 32
    per_unit = {True: max(1, warps // 4), False: warps}  # HGMMA per warpgroup, HMMA per warp
    macs = sum(mma_macs(x) * per_unit[x.base == "HGMMA"] for x in mmas)
    w_bytes = sum(load_width(x.opcode) for x in w_loads) * threads
    # Iterations per pass through the loop body: ptxas unrolls small loops (the W tile is
    # then loaded several times per pass). 1 for loop-free kernels and unknown W traffic.
    unroll = 1
    if region.kind == "loop" and w_bytes_per_iter and w_bytes >= 2 * w_bytes_per_iter:
        unroll = round(w_bytes / w_bytes_per_iter)
    return {
        "regs": regs,
        "spills": sum(1 for x in instrs if x.base in ("STL", "LDL")),
        "smem_bytes": smem_bytes,
        "ctas_per_sm": ctas,
        "ctas_limiter": limiter,
        "mma": mma_kind(body),
        "load_bytes": max((load_width(x.opcode) for x in w_loads), default=0),
        "region": region.kind,
        "region_instrs": len(body),
        "loop_instrs": len(path),
        "elems_per_iter": elems_per_iter,
        "unroll": unroll,
        "sass_per_elem": round(len(path) * threads / (elems_per_iter * unroll), 2)
        if elems_per_iter
        else None,
        "mma_instrs": len(mmas),
        "mma_macs_ratio": round(macs / (expected_macs * unroll), 3) if expected_macs else None,
        "w_load_instrs": len(w_loads),
        "w_load_opcodes": sorted({x.opcode for x in w_loads}),
        "w_bytes_loaded": w_bytes,
        "note": note,
    }


# ---------------------------------------------------------------------------------------
# Which source lines load W
# ---------------------------------------------------------------------------------------

# The pointer argument that is "W" (the tensor a kernel decodes or encodes) per Triton kernel.
W_POINTER = {
    "qlora_fwd_kernel": "packed_ptr",
    "qlora_dx_kernel": "packed_ptr",
    "qlora_fwd_split_kernel": "packed_ptr",
    "qlora_dx_split_kernel": "packed_ptr",
    "qlora_lora_down_kernel": "a_ptr",  # no W: its streamed operand is the activations
    "dequantize_4bit_kernel": "packed_ptr",
    "dequantize_4bit_nested_kernel": "packed_ptr",
    "dequantize_blockwise_kernel": "q_ptr",
    "quantize_4bit_kernel": "x_ptr",
    "quantize_blockwise_kernel": "x_ptr",
}


def triton_w_lines(source_file: str, pointer: str) -> set[tuple[str, int]]:
    """Lines of every ``tl.load(...)`` call in ``source_file`` whose address expression
    names ``pointer`` (any function of the module: loads in inlined helpers count)."""
    text = Path(source_file).read_text()
    lines = set()
    for node in ast.walk(ast.parse(text)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "load"
            and node.args
            and any(isinstance(n, ast.Name) and n.id == pointer for n in ast.walk(node.args[0]))
        ):
            lines |= {(os.path.realpath(source_file), n) for n in range(node.lineno, node.end_lineno + 1)}
    return lines


def cuda_lines(source_file: Path, function: str, pattern: str) -> set[tuple[str, int]]:
    """Lines inside ``function``'s definition (from its name to the next line that starts
    with '}') whose code (comments stripped) matches the regex ``pattern``."""
    lines = Path(source_file).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.search(rf"\b{function}\(", line))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("}"))
    real = os.path.realpath(source_file)
    return {(real, i + 1) for i in range(start, end + 1) if re.search(pattern, lines[i].split("//")[0])}


# ---------------------------------------------------------------------------------------
# Triton jobs
# ---------------------------------------------------------------------------------------

MODULES = ("quant", "qlora")


def _triton_entries(module: str) -> list[dict]:
    """AOT_CONFIGS of the module; for qlora also every non-default tile of the launchers'
    tables (same arguments as its regime's AOT entry, tile and warps/stages replaced)."""
    import importlib

    mod = importlib.import_module(f"qpeft.triton_kernels.{module}")
    entries = [dict(e, default=bool(e.get("default", True))) for e in getattr(mod, "AOT_CONFIGS", [])]
    if module == "qlora":
        for kernel_name, table in (("fwd", mod._FWD_CONFIGS), ("dx", mod._DX_CONFIGS)):
            for regime, configs in table.items():
                r = 16 if regime[1] == "lo" else 256  # the r of AOT_CONFIGS' entry for the bucket
                # an arch's own default is an AOT_CONFIGS entry already
                arch_defaults = {
                    t[(kernel_name, regime)]
                    for t in mod._ARCH_DEFAULTS.values()
                    if (kernel_name, regime) in t
                }
                for i, cfg in enumerate(configs[1:], start=1):
                    if i in arch_defaults:
                        continue
                    e = mod._aot_entry(kernel_name, regime, r)
                    e["constexprs"] = dict(e["constexprs"], **cfg.kwargs)
                    e.update(name=f"{e['name']}_alt{i}", num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                    e["default"] = False
                    entries.append(e)
    return entries


def _config_text(entry: dict) -> str:
    c = entry["constexprs"]
    if "BLOCK_N" in c:
        lora = f"r{c['BLOCK_R']}" if c.get("HAS_LORA", True) else "nolora"
        tile = f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} {lora}{' pre' if c.get('PRE_LORA') else ''}"
    elif "BLOCK_C" in c:  # the LoRA down-projection: [BLOCK_M, BLOCK_C] activations x [BLOCK_C, BLOCK_R]
        tile = f"{c['BLOCK_M']}x{c['BLOCK_C']} r{c['BLOCK_R']}"
    else:
        tile = f"{c['ROWS']}x{c['BLOCKSIZE']}"
    return f"{tile} w{entry['num_warps']} s{entry['num_stages']}"


def compile_triton(entry: dict, arch: int) -> tuple[bytes, int]:
    """(cubin, dynamic shared bytes per launch) of an AOT entry (triton_kernels/__init__.py
    format) compiled for sm_<arch> without a GPU. Needs a process where Triton is not in
    interpreter mode (TRITON_INTERPRET=1 replaces @triton.jit functions)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError(
            "TRITON_INTERPRET=1: compile in a fresh process without it (python -m benchmarks.sass_report)"
        )
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = {"num_warps": entry["num_warps"], "num_stages": entry["num_stages"], **entry.get("options", {})}
    src = ASTSource(
        fn=entry["fn"], signature=entry["signature"], constexprs=entry["constexprs"], attrs=entry.get("attrs")
    )
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return compiled.asm["cubin"], int(compiled.metadata.shared)


def triton_record(module: str, index: int, arch: int) -> dict:
    """Compile entry ``index`` of ``module`` (see _triton_entries) for sm_<arch> and analyze it."""
    entry = _triton_entries(module)[index]
    fn = entry["fn"]
    start = time.perf_counter()
    cubin, dynamic_smem = compile_triton(entry, arch)
    seconds = time.perf_counter() - start
    res = resources(cubin)
    name = fn.__name__
    if list(res) != [name]:
        raise RuntimeError(
            f"{entry['name']} sm_{arch}: expected one function {name}, cuobjdump lists {list(res)}"
        )
    instrs, labels = parse_sass(disassemble(cubin))[name]
    c = entry["constexprs"]
    threads = entry["num_warps"] * 32
    if "BLOCK_N" in c:  # fused QLoRA: each loop step decodes a [BLOCK_N, BLOCK_K] W tile
        elems = c["BLOCK_N"] * c["BLOCK_K"]
        # PRE_LORA: no LoRA dot in the loop (the down-projection is read in the epilogue)
        lora = c["BLOCK_R"] if c.get("HAS_LORA") and not c.get("PRE_LORA") else 0
        if name in ("qlora_fwd_kernel", "qlora_fwd_split_kernel"):
            macs = c["BLOCK_M"] * c["BLOCK_K"] * (c["BLOCK_N"] + lora)
        else:
            macs = c["BLOCK_M"] * c["BLOCK_N"] * (c["BLOCK_K"] + lora)
    elif "BLOCK_C" in c:  # qlora_lora_down_kernel: per step a [BLOCK_M, BLOCK_C] activation tile
        elems = c["BLOCK_M"] * c["BLOCK_C"]
        macs = elems * c["BLOCK_R"]
    else:  # quant kernels: one [ROWS, BLOCKSIZE] tile per program, no loop
        elems, macs = c["ROWS"] * c["BLOCKSIZE"], 0
    smem = res[name]["shared_static_bytes"] + dynamic_smem
    w_lines = triton_w_lines(fn.fn.__code__.co_filename, W_POINTER[name]) if name in W_POINTER else None
    row = analyze(
        instrs,
        labels,
        arch=arch,
        threads=threads,
        regs=res[name]["regs"],
        smem_bytes=smem,
        elems_per_iter=elems,
        w_lines=w_lines,
        expected_macs=macs,
        # packed NF4/FP4: two codes per byte. The down-projection: 2-byte activations and
        # its [BLOCK_C, BLOCK_R] L tile, both (Triton's line info puts the L tile's loads
        # on the activation load's lines, so both are "W" loads here: per-iteration bytes
        # must count both, or a wide L tile reads as an unrolled loop)
        w_bytes_per_iter=(2 * (elems + c["BLOCK_C"] * c["BLOCK_R"]) if "BLOCK_C" in c else elems // 2)
        if macs
        else 0,
        triton=True,
        static_smem=res[name]["shared_static_bytes"],
    )
    return {
        "kernel": name,
        "config": _config_text(entry),
        "name": entry["name"],
        "source": f"triton_kernels/{module}.py",
        "default": entry["default"],
        "arch": arch,
        "threads": threads,
        **row,
        "stack_bytes": res[name]["stack_bytes"],
        "local_bytes": res[name]["local_bytes"],
        "compile_s": round(seconds, 2),
    }


# ---------------------------------------------------------------------------------------
# CUDA C++ jobs
# ---------------------------------------------------------------------------------------

# Kernel template -> (source, W pointer, regex of the main loop's statement, threads
# constant, elements per thread per iteration constant). Both decode one 16-byte chunk
# (32 NF4/FP4 values) per thread per iteration of that loop (csrc/cuda/quant.cu,
# csrc/cuda/gemv_4bit.cu). The loop is named by its source line because nvcc's line info
# can attribute the 16-byte W load to a neighbouring line (docs/sass_report.md, "Limits").
CUDA_KERNELS = {
    "dequantize4_kernel": (
        "quant.cu",
        "packed",
        r"for \(int64_t c = .*c < nchunks",
        "kDequantThreads",
        "kDequant4Elems",
    ),
    "gemv4_kernel": (
        "gemv_4bit.cu",
        "packed",
        r"for \(int64_t c = lane; c < nchunks",
        "kGemvThreads",
        "kGemvChunk",
    ),
    # The fused QLoRA GEMM (forward and dx): per iteration of its reduction loop each thread
    # decodes 16 packed bytes (32 weights) of the CTA's 128 x 32 W tile; the loop holds the
    # MMAs, so main_region picks it by those (the loop copy whose W load, the cp.async of
    # `w_src`, is 16 bytes: the per-element W path is a second copy of the loop).
    "qlora_gemm_kernel": (
        "qlora_gemm.cu",
        "w_src",
        r"for \(int64_t c = c_lo; c < c_hi",
        "kThreads",
        "kDecodePerThread",
    ),
    # Its SIMT peer (fp32/fp64, pre-sm_80): per iteration of the main pass's reduction loop
    # each of 256 threads decodes 8 weights (4 packed bytes) of the 64 x 32 W tile. No MMA:
    # main_region takes the loop holding the widest W load, which is in the inlined load_w
    # (the 6th field: the function whose lines hold the W load). The DOWN instantiations (the
    # LoRA down-projection, no W) are left out.
    "qlora_simt_kernel": (
        "qlora_simt.cu",
        "packed",
        r"for \(int64_t c = 0; c < nchunks",
        "kThreads",
        "kDecodePerThread",
        "load_w",
    ),
}
CUDA_SOURCES = ("quant.cu", "gemv_4bit.cu", "qlora_gemm.cu", "qlora_simt.cu")
_DT = {"0": "fp32", "1": "fp16", "2": "bf16", "3": "fp64"}
_QT = {"1": "fp4", "2": "nf4"}


def _constant(text: str, name: str) -> int:
    m = re.search(rf"constexpr int {name} = (\d+)", text)
    if not m:
        raise RuntimeError(f"constant {name} not found")
    return int(m.group(1))


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not tool:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def nvcc() -> str | None:
    return os.environ.get("QPEFT_NVCC") or shutil.which("nvcc")


def cuda_records(source: str, arch: int) -> list[dict]:
    """Compile csrc/cuda/<source> to a cubin for sm_<arch> with the build's flags (plus
    -lineinfo) and analyze every instantiation of the CUDA_KERNELS templates in it."""
    path = ROOT / "csrc" / "cuda" / source
    with tempfile.TemporaryDirectory() as tmp:
        cubin_path = Path(tmp) / "k.cubin"
        cmd = [
            nvcc(),
            "-cubin",
            f"-arch=sm_{arch}",
            "-std=c++17",
            "-O3",
            "--fmad=false",
            "-lineinfo",
            "-Xcompiler=-ffp-contract=off",
            '-DQPEFT_MODULE_NAME="qpeft._C_cuda"',  # as CMakeLists.txt defines it
            f"-I{ROOT / 'csrc' / 'include'}",
            f"-I{ROOT / 'csrc' / 'cuda'}",
            "-o",
            str(cubin_path),
            str(path),
        ]
        start = time.perf_counter()
        subprocess.run(cmd, capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - start
        cubin = cubin_path.read_bytes()
    res = resources(cubin)
    functions = parse_sass(disassemble(cubin))
    text = path.read_text()
    names = _demangle(list(functions))
    rows = []
    for mangled, (instrs, labels) in functions.items():
        pretty = names.get(mangled, mangled)
        kernel = next((k for k in CUDA_KERNELS if f"::{k}<" in pretty or pretty.startswith(f"{k}<")), None)
        if kernel is None or CUDA_KERNELS[kernel][0] != source:
            continue
        _, pointer, loop_pattern, threads_name, elems_name, *w_function = CUDA_KERNELS[kernel]
        threads = _constant(text, threads_name)
        targs = re.search(r"<([^>]*)>", pretty).group(1).split(",")
        targs = [a.strip() for a in targs]
        if kernel == "dequantize4_kernel":
            dt, qt, nested = targs
            config = f"{_DT[dt]} {_QT[qt]}{' nested' if nested == 'true' else ''}"
            default = dt == "2" and qt == "2"
        elif kernel == "qlora_simt_kernel":
            dt, dx, down = targs
            if down == "true":  # the LoRA down-projection: no W
                continue
            config = f"{_DT[dt]} {'dx' if dx == 'true' else 'fwd'}"
            default = dt == "0" and dx == "false"
        elif kernel == "qlora_gemm_kernel":
            dt, dx, br, *rc = targs  # rc: the rank-chunk instantiation (r > 64)
            chunks = " chunked" if rc == ["true"] else ""
            config = f"{_DT[dt]} {'dx' if dx == 'true' else 'fwd'} BR={br}{chunks}"
            default = dt == "2" and br == "16" and not chunks
        else:
            dt, m = targs
            config = f"{_DT[dt]} M={m}"
            default = dt == "2" and m == "1"
        r = res[mangled]
        row = analyze(
            instrs,
            labels,
            arch=arch,
            threads=threads,
            regs=r["regs"],
            smem_bytes=r["shared_static_bytes"],  # + the launch's dynamic smem (gemv: 1 KiB when nested)
            elems_per_iter=threads * _constant(text, elems_name),
            static_smem=r["shared_static_bytes"],
            # unroll stays 1: gemv's loop is `#pragma unroll 1`, the dequantize loop is not
            # unrolled, and nvcc's line info can attribute x loads to W's line (Limits)
            w_lines=cuda_lines(path, (w_function or [kernel])[0], rf"\b{pointer}\b"),
            loop_lines=cuda_lines(path, kernel, loop_pattern),
        )
        rows.append(
            {
                "kernel": kernel,
                "config": f"{config} t{threads}",
                "name": f"cuda_{kernel}_{config.replace(' ', '_')}",
                "source": f"csrc/cuda/{source}",
                "default": default,
                "arch": arch,
                "threads": threads,
                **row,
                "stack_bytes": r["stack_bytes"],
                "local_bytes": r["local_bytes"],
                "compile_s": round(seconds, 2),
            }
        )
    return sorted(rows, key=lambda x: x["name"])


# ---------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------


def _run_job(job):
    kind, *args = job
    return [triton_record(*args)] if kind == "triton" else cuda_records(*args)


def _versions(cuda: bool) -> dict:
    import triton

    nvcc_version = ""
    if cuda and nvcc():
        out = subprocess.run([nvcc(), "--version"], capture_output=True, text=True).stdout
        nvcc_version = out.strip().splitlines()[-1] if out.strip() else ""
    return {
        "triton": triton.__version__,
        "nvcc": nvcc_version,
        "machine": f"{platform.machine()}, no GPU (static compile and disassembly only)",
    }


def run(
    modules=MODULES,
    archs=(80, 90),
    jobs=1,
    cuda=True,
    smoke=False,
    only: str | None = None,
    cuda_sources=CUDA_SOURCES,
) -> dict:
    """``only``: a regular expression; only the Triton entries whose name it matches (re.search).
    ``cuda_sources``: the csrc/cuda files whose CUDA_KERNELS are compiled (with ``cuda``)."""
    # A private Triton cache: line info in a cached cubin names the file (and lines) of
    # whichever checkout compiled it first, and W loads are found by line.
    cache = tempfile.mkdtemp(prefix="qpeft-sass-cache-")
    os.environ["TRITON_CACHE_DIR"] = cache
    work: list[tuple] = []
    skipped: dict[str, str] = {}
    for module in modules:
        entries = _triton_entries(module)
        chosen = [i for i, e in enumerate(entries) if only is None or re.search(only, e["name"])]
        if smoke:  # the first entry of each kernel function
            firsts: dict[str, int] = {}
            for i, e in enumerate(entries):
                firsts.setdefault(e["fn"].__name__, i)
            chosen = sorted(firsts.values())
        # an entry with "archs" is one arch's default config: compiled for that arch only
        work += [
            ("triton", module, i, a) for i in chosen for a in archs if a in entries[i].get("archs", archs)
        ]
    if cuda:
        if nvcc():
            work += [("cuda", s, a) for s in cuda_sources for a in archs]
        else:
            skipped["cuda"] = "no nvcc on PATH (set QPEFT_NVCC)"
    start = time.perf_counter()
    try:
        if jobs > 1:
            with ProcessPoolExecutor(jobs) as pool:
                results = list(pool.map(_run_job, work))
        else:
            results = [_run_job(j) for j in work]
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return {
        **_versions(cuda),
        "archs": list(archs),
        "skipped": skipped,
        "wall_s": round(time.perf_counter() - start, 1),
        "records": [r for rows in results for r in rows],
    }


def merge(old: list[dict], new: list[dict], only: str | None = None) -> list[dict]:
    """``old`` with each record replaced by the ``new`` one of the same (name, arch), in
    order; a new record without an old one is appended. ``only``: the regular expression
    the new records were compiled for: an old Triton record it matches that has no new one
    (a config no longer in the tables, or an arch its entry no longer compiles for) is dropped."""
    fresh = {(r["name"], r["arch"]): r for r in new}
    merged = []
    for r in old:
        key = (r["name"], r["arch"])
        if key in fresh:
            merged.append(fresh.pop(key))
        elif not (only and r["source"].startswith("triton_kernels/") and re.search(only, r["name"])):
            merged.append(r)
    return merged + list(fresh.values())


def _rows(records: list[dict]) -> list[str]:
    lines = []
    for r in records:
        loop = f"{r['loop_instrs']}" + ("" if r["region"] == "loop" else " (kernel)")
        lines.append(
            f"| {r['kernel']} | {r['config']} | {'yes' if r['default'] else ''} | {r['arch']} | {r['regs']} "
            f"| {r['spills']} | {r['smem_bytes']} | {r['ctas_per_sm']} ({r['ctas_limiter']}) | {r['mma']} "
            f"| {r['load_bytes']} | {loop} | {r['elems_per_iter']} | {r['sass_per_elem']} |"
        )
    return lines


def markdown(report: dict) -> str:
    lines = [
        "# Static SASS report (an estimate of instruction cost, no GPU run)",
        "",
        f"Generated by `python -m benchmarks.sass_report` (Triton {report['triton']}"
        + (f"; nvcc {report['nvcc']}" if report.get("nvcc") else "")
        + f"), sm_{' and sm_'.join(map(str, report['archs']))}, on {report['machine']}. Method, rules "
        "and limits: docs/sass_report.md. Nothing here ran on a GPU.",
        "",
        "- sass/elem: instructions on the counted path of the main loop x threads per CTA / W elements "
        "one iteration decodes (per thread of work, not per cycle: issue rate is not modelled).",
        "- loop: instructions counted (the steady-state path through the loop, or through the whole kernel "
        "for loop-free kernels); elems: W elements per iteration (per CTA).",
        "- W load: widest global load of W in the loop, bytes per thread (1 = LDG.E.U8, 16 = .128).",
        "- CTAs/SM: occupancy from regs, shared memory and threads (limiter in brackets).",
        "- spills: local-memory load/store instructions (LDL/STL) in the whole kernel.",
        "",
    ]
    for what, why in report.get("skipped", {}).items():
        lines.append(f"- {what} not reported: {why}")
    header = [
        "| kernel | config | default | arch | regs | spills | smem B | CTAs/SM | mma | W load B | loop | elems "
        "| sass/elem |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- | ---: | --- | ---: | ---: |",
    ]
    fused = [r for r in report["records"] if r["default"] and r["kernel"].startswith("qlora")]
    others = [r for r in report["records"] if r not in fused]
    if fused:
        lines += ["## Fused QLoRA kernels, default configs", ""] + header + _rows(fused) + [""]
    lines += ["## Every config" if fused else "## Configs", ""] + header + _rows(others)

    odd = [r for r in report["records"] if r.get("mma_macs_ratio") not in (None, 1.0)]
    notes = [r for r in report["records"] if r.get("note")]
    lines += [""]
    if odd:
        lines.append(
            "MMA work per iteration differs from the tile's (MACs ratio != 1: a layout that repeats a dot "
            "across warps, e.g. 4 warps on one 16-row MMA at BLOCK_M = 16): "
            + ", ".join(f"{r['name']} sm_{r['arch']} ({r['mma_macs_ratio']})" for r in odd)
        )
    if notes:
        lines.append("Notes: " + "; ".join(f"{r['name']} sm_{r['arch']}: {r['note']}" for r in notes))
    took = f" in {report['wall_s']} s" if "wall_s" in report else ""
    lines.append(f"{len(report['records'])} kernel configs analysed{took}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("triton was imported in interpreter mode: run this report in a fresh process")
    os.environ.pop("TRITON_INTERPRET", None)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, help="output folder (default benchmarks/results; with --smoke: print only)"
    )
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(ARCH_LIMITS))
    parser.add_argument("--modules", nargs="+", default=list(MODULES))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA C++ kernels (nvcc)")
    parser.add_argument("--smoke", action="store_true", help="the first config of each Triton kernel only")
    parser.add_argument(
        "--render", action="store_true", help="only rewrite DIR/sass_report.md from DIR/sass_report.json"
    )
    parser.add_argument(
        "--cuda-only",
        nargs="+",
        metavar="SOURCE",
        choices=CUDA_SOURCES,
        help="recompile only these csrc/cuda sources (no Triton) and merge their records into "
        "DIR/sass_report.json, replacing those of the same name and arch",
    )
    parser.add_argument(
        "--only",
        metavar="REGEX",
        help="recompile only the Triton records whose name matches (no CUDA) and merge them into "
        "DIR/sass_report.json, replacing those of the same name and arch",
    )
    args = parser.parse_args(argv)
    if args.out is None and args.smoke:  # never overwrite the committed report with a partial one
        print(markdown(run(args.modules, tuple(args.arch), args.jobs, not args.no_cuda, True)))
        return 0
    args.out = args.out or ROOT / "benchmarks" / "results"
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render:
        records = json.loads((args.out / "sass_report.json").read_text())
        report = {**_versions(True), "archs": sorted({r["arch"] for r in records}), "records": records}
    elif args.cuda_only:
        fresh = run((), tuple(args.arch), args.jobs, True, False, None, tuple(args.cuda_only))["records"]
        old = json.loads((args.out / "sass_report.json").read_text())
        records = merge(old, fresh)
        (args.out / "sass_report.json").write_text(json.dumps(records, indent=1) + "\n")
        report = {**_versions(True), "archs": sorted({r["arch"] for r in records}), "records": records}
    elif args.only:
        fresh = run(args.modules, tuple(args.arch), args.jobs, False, False, args.only)["records"]
        old = json.loads((args.out / "sass_report.json").read_text())
        records = merge(old, fresh, args.only)
        (args.out / "sass_report.json").write_text(json.dumps(records, indent=1) + "\n")
        report = {**_versions(True), "archs": sorted({r["arch"] for r in records}), "records": records}
    else:
        report = run(args.modules, tuple(args.arch), args.jobs, not args.no_cuda, args.smoke)
        (args.out / "sass_report.json").write_text(json.dumps(report["records"], indent=1) + "\n")
    table = markdown(report)
    (args.out / "sass_report.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
