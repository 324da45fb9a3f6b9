"""A small Triton kernel whose main loop is known, run through benchmarks/sass_report.py.

    python -m tests._sass_probe    # prints one JSON line: {"80": {...}, "90": {...}}

Run in a fresh process by tests/test_sass_report.py (conftest.py puts pytest's process in
interpreter mode, where @triton.jit functions cannot be compiled). Per loop iteration the
kernel loads one [BLOCK_M, BLOCK_K] bf16 x tile and one [BLOCK_N, BLOCK_K] uint8 W tile
and issues one BLOCK_M x BLOCK_N x BLOCK_K dot: on sm_80 (1 warp, 16x16x16) that is two
HMMA.16816 (m16 n8 k16 each); on sm_90 (4 warps = one warpgroup, 64x16x16) one
HGMMA.64x16x16. Each W byte is loaded once per iteration: BLOCK_N * BLOCK_K bytes.

Besides the report's own analysis it counts the loop a second, independent way: from
``cuobjdump -sass`` (not nvdisasm), the backward branch whose address range holds the
MMA, counting its instruction lines.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="qpeft-sass-probe-"))

import triton
import triton.language as tl

from benchmarks import sass_report

CONFIGS = {80: (16, 16, 16, 1), 90: (64, 16, 16, 4)}  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps


@triton.jit
def probe_kernel(x_ptr, w_ptr, y_ptr, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + offs_m[:, None] * K + (k0 + offs_k)[None, :])
        w = tl.load(w_ptr + offs_n[:, None] * K + (k0 + offs_k)[None, :])
        acc = tl.dot(x, tl.trans(w.to(tl.bfloat16)), acc)
    tl.store(y_ptr + offs_m[:, None] * BLOCK_N + offs_n[None, :], acc)


def cuobjdump_loop(cubin: bytes) -> int:
    """Instructions of the innermost backward-branch range holding an MMA, from cuobjdump."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        text = subprocess.run(
            [sass_report.triton_tool("cuobjdump"), "-sass", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    rows = [(int(a, 16), body) for a, body in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", text)]
    loops = []
    for addr, body in rows:
        m = re.search(r"\bBRA\s+0x([0-9a-f]+)", body)
        if m and int(m.group(1), 16) <= addr:
            lo = int(m.group(1), 16)
            inside = [b for a, b in rows if lo <= a <= addr]
            if any(re.search(r"\bHG?MMA\b", b) for b in inside):
                loops.append(len(inside))
    return min(loops)


def probe(arch: int) -> dict:
    bm, bn, bk, warps = CONFIGS[arch]
    entry = {
        "fn": probe_kernel,
        "signature": {
            "x_ptr": "*bf16",
            "w_ptr": "*u8",
            "y_ptr": "*fp32",
            "K": "i32",
            "BLOCK_M": "constexpr",
            "BLOCK_N": "constexpr",
            "BLOCK_K": "constexpr",
        },
        "constexprs": {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
        "attrs": {(i,): [["tt.divisibility", 16]] for i in range(4)},
        "num_warps": warps,
        "num_stages": 1,
    }
    cubin, dynamic_smem = sass_report.compile_triton(entry, arch)
    res = sass_report.resources(cubin)["probe_kernel"]
    instrs, labels = sass_report.parse_sass(sass_report.disassemble(cubin))["probe_kernel"]
    row = sass_report.analyze(
        instrs,
        labels,
        arch=arch,
        threads=warps * 32,
        regs=res["regs"],
        smem_bytes=res["shared_static_bytes"] + dynamic_smem,
        elems_per_iter=bn * bk,
        w_lines=sass_report.triton_w_lines(probe_kernel.fn.__code__.co_filename, "w_ptr"),
        expected_macs=bm * bn * bk,
        w_bytes_per_iter=bn * bk,  # uint8 W: one byte per element
        triton=True,
    )
    return {
        **row,
        "threads": warps * 32,
        "tile": [bm, bn, bk],
        "cuobjdump_loop_instrs": cuobjdump_loop(cubin),
    }


if __name__ == "__main__":
    archs = [int(a) for a in sys.argv[1:]] or sorted(CONFIGS)
    print(json.dumps({str(a): probe(a) for a in archs}))
