"""The static SASS report (benchmarks/sass_report.py, method in docs/sass_report.md).

Three layers: the parser and control-flow rules on a hand-written SASS fixture whose
loop counts are known by construction (tests/data/sass_fixture.txt); a small Triton
kernel compiled for sm_80 and sm_90 (tests/_sass_probe.py) whose per-iteration MMA and
W traffic are known, its loop also counted independently from cuobjdump; and the
committed report that benchmarks/roofline_qlora.py reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import sass_report as sr

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "data" / "sass_fixture.txt"
REPORT = ROOT / "benchmarks" / "results" / "sass_report.json"


@pytest.fixture(scope="module")
def functions():
    return sr.parse_sass(FIXTURE.read_text())


def _lines(*numbers):
    return {(os.path.realpath("kernel.py"), n) for n in numbers}


# --- parsing --------------------------------------------------------------------------


def test_parse_functions_labels_predicates_and_locations(functions):
    assert list(functions) == ["fixture_wgmma", "fixture_hmma", "fixture_noloop"]
    instrs, labels = functions["fixture_wgmma"]
    assert len(instrs) == 21
    assert [hex(i.addr) for i in instrs[:2]] == ["0x0", "0x10"]
    assert labels == {".L_x_0": 0x40, ".L_x_1": 0x50, ".L_x_3": 0xB0, ".L_x_2": 0x120, ".L_x_4": 0x130}
    bra = instrs[3]
    assert (bra.pred, bra.opcode, bra.target, bra.conditional) == ("P0", "BRA", ".L_x_2", True)
    w = instrs[5]
    assert w.opcode == "LDG.E.U8" and w.operands == "R4, desc[UR4][R2.64]"
    # the whole inline chain of the comment block, and only it
    assert w.locs == {("helpers.py", 5), ("kernel.py", 10)}
    assert instrs[6].locs == {("kernel.py", 11)}
    assert instrs[8].locs == {("kernel.py", 12)}  # no comment: the previous instruction's
    assert instrs[-2].target == ".L_x_4" and not instrs[-1].conditional


def test_loops_are_backward_jumps(functions):
    instrs, labels = functions["fixture_wgmma"]
    found = {(instrs[h].addr, instrs[t].addr) for h, t in sr.loops(instrs, labels)}
    assert found == {(0x50, 0xF0), (0x40, 0x110), (0x130, 0x130)}


# --- main loop and counted path -------------------------------------------------------


def test_innermost_mma_loop_counts_the_path_around_the_cold_block(functions):
    instrs, labels = functions["fixture_wgmma"]
    region = sr.main_region(instrs, labels, lambda i: sr.is_global_load(i) and ("kernel.py", 10) in i.locs)
    assert region.kind == "loop"
    assert (instrs[region.first].addr, instrs[region.last].addr) == (0x50, 0xF0)
    assert region.last - region.first + 1 == 11
    assert [instrs[i].addr for i in region.path] == [0x50, 0x60, 0x70, 0xB0, 0xC0, 0xD0, 0xE0, 0xF0]


# An MMA loop (0x10..0xc0) with two forward branches: one skips a guarded prefetch (an
# LDGSTS: taken in the steady state), one a cold block without loads (not taken), and an
# inner per-element loop (0x90..0xa0) whose load does not count as steady state.
_GUARDED = """
//--------------------- .text.guarded        --------------------------
guarded:
.text.guarded:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   HMMA.16816.F32.BF16 R8, R12, R4, R8 ;
        /*0020*/               @P0 BRA `(.L_x_1) ;
        /*0030*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0040*/                   LDGSTS.E.BYPASS.128 [R3], [R4.64] ;
.L_x_1:
        /*0050*/               @P1 BRA `(.L_x_2) ;
        /*0060*/                   FMUL R9, R9, R9 ;
        /*0070*/                   FMUL R9, R9, R9 ;
.L_x_2:
        /*0080*/               @P3 BRA `(.L_x_4) ;
.L_x_3:
        /*0090*/                   LDG.E.U16 R5, [R6.64] ;
        /*00a0*/               @P4 BRA `(.L_x_3) ;
.L_x_4:
        /*00b0*/                   ISETP.LT.AND P2, PT, R2, R3, PT ;
        /*00c0*/               @P2 BRA `(.L_x_0) ;
        /*00d0*/                   EXIT ;
"""


def test_steady_state_path_takes_the_guarded_prefetch_not_the_cold_block():
    instrs, labels = sr.parse_sass(_GUARDED)["guarded"]
    region = sr.main_region(instrs, labels, lambda i: False)
    assert (instrs[region.first].addr, instrs[region.last].addr) == (0x10, 0xC0)
    # the prefetch (0x30, 0x40) is on the path; the cold FMULs (0x60, 0x70) and the inner
    # per-element loop's load (0x90, 0xa0) are not
    assert [instrs[i].addr for i in region.path] == [0x10, 0x20, 0x30, 0x40, 0x50, 0x80, 0xB0, 0xC0]


def test_analyze_fixture_wgmma(functions):
    instrs, labels = functions["fixture_wgmma"]
    row = sr.analyze(
        instrs,
        labels,
        arch=90,
        threads=128,
        regs=168,
        smem_bytes=0,
        elems_per_iter=64,
        w_lines=_lines(10),
        expected_macs=64 * 128 * 16,
    )
    assert row["region"] == "loop" and row["region_instrs"] == 11 and row["loop_instrs"] == 8
    assert row["mma"] == "wgmma-wait" and row["mma_instrs"] == 1 and row["mma_macs_ratio"] == 1.0
    assert row["load_bytes"] == 1  # the W load, not the wider x load beside it
    assert row["w_load_opcodes"] == ["LDG.E.U8"] and row["w_bytes_loaded"] == 128
    assert row["sass_per_elem"] == 8 * 128 / 64
    assert row["spills"] == 0 and row["unroll"] == 1


def test_wgmma_kind_follows_the_wait_depth(functions):
    text = FIXTURE.read_text()
    instrs, _ = sr.parse_sass(text)["fixture_wgmma"]
    assert sr.mma_kind(instrs) == "wgmma-wait"
    relaxed, _ = sr.parse_sass(text.replace("DEPBAR.LE gsb0, 0x0", "DEPBAR.LE gsb0, 0x1"))["fixture_wgmma"]
    assert sr.mma_kind(relaxed) == "wgmma-async"
    hmma, _ = sr.parse_sass(text)["fixture_hmma"]
    noloop, _ = sr.parse_sass(text)["fixture_noloop"]
    assert (sr.mma_kind(hmma), sr.mma_kind(noloop)) == ("mma.sync", "none")


def test_loop_left_through_call_rel_noinc(functions):
    instrs, labels = functions["fixture_hmma"]
    row = sr.analyze(
        instrs,
        labels,
        arch=80,
        threads=32,
        regs=40,
        smem_bytes=0,
        elems_per_iter=256,
        w_lines=_lines(20),
        expected_macs=16 * 16 * 16,
        w_bytes_per_iter=256,
    )
    assert (row["region"], row["region_instrs"], row["loop_instrs"]) == ("loop", 6, 6)
    assert row["mma"] == "mma.sync" and row["mma_instrs"] == 2 and row["mma_macs_ratio"] == 1.0
    assert row["load_bytes"] == 8 and row["w_bytes_loaded"] == 256 and row["unroll"] == 1
    assert row["sass_per_elem"] == 6 * 32 / 256


def test_unrolled_loop_divides_by_the_iterations_per_pass(functions):
    instrs, labels = functions["fixture_hmma"]
    # if one iteration needed a quarter of the W bytes the pass loads, the pass is 4 iterations
    row = sr.analyze(
        instrs,
        labels,
        arch=80,
        threads=32,
        regs=40,
        smem_bytes=0,
        elems_per_iter=64,
        w_lines=_lines(20),
        expected_macs=16 * 16 * 4,
        w_bytes_per_iter=64,
    )
    assert row["unroll"] == 4 and row["mma_macs_ratio"] == 1.0
    assert row["sass_per_elem"] == 6 * 32 / (64 * 4)


def test_loop_free_kernel_counts_entry_to_exit_and_spills(functions):
    instrs, labels = functions["fixture_noloop"]
    row = sr.analyze(
        instrs, labels, arch=80, threads=128, regs=32, smem_bytes=0, elems_per_iter=256, w_lines=_lines(30)
    )
    assert (row["region"], row["region_instrs"], row["loop_instrs"]) == ("kernel", 8, 5)
    assert row["spills"] == 2 and row["mma"] == "none" and row["load_bytes"] == 1
    assert row["sass_per_elem"] == 5 * 128 / 256


def test_triton_load_lines_allow_the_inline_asm_offset(functions):
    # Triton's load is inline PTX: its line is the call's plus one per 32-bit register
    instrs, labels = functions["fixture_hmma"]
    kw = dict(arch=80, threads=32, regs=40, smem_bytes=0, elems_per_iter=256)
    assert sr.analyze(instrs, labels, w_lines=_lines(18), triton=True, **kw)["w_load_instrs"] == 1  # 20 - 2
    row = sr.analyze(instrs, labels, w_lines=_lines(18), **kw)
    assert row["w_load_instrs"] == 1 and "widest global load" in row["note"]  # fallback, said so


@pytest.mark.parametrize(
    "opcode, width",
    [
        ("LDG.E.U8", 1),
        ("LDG.E.S16", 2),
        ("LDG.E", 4),
        ("LDG.E.CONSTANT", 4),
        ("LDG.E.64", 8),
        ("LDG.E.128.CONSTANT", 16),
        ("LDGSTS.E.BYPASS.128", 16),
        ("LDS.128", 0),
        ("UTMALDG.2D", 0),
    ],
)
def test_load_width(opcode, width):
    assert sr.load_width(opcode) == width


@pytest.mark.parametrize(
    "arch, regs, smem, threads, expected",
    [
        # 174 regs -> 5632 per warp; 16384 / 5632 = 2 warps per sub-partition, 8 per SM: one 8-warp CTA
        (90, 174, 71680, 256, (1, "regs")),
        # 32 regs x 8 warps: 16 warps per sub-partition = 64 per SM = 8 CTAs; 2048 threads = 8 CTAs too
        (80, 32, 1088, 256, (8, "regs+threads")),
        # 255 regs round to 256 (8192 per warp): 2 warps per sub-partition, 8 per SM: two 4-warp CTAs
        (80, 255, 0, 128, (2, "regs")),
        # (100 KiB + 1 KiB reserved) per CTA: 1 in sm_80's 164 KiB, 2 in sm_90's 228 KiB
        (80, 32, 100 * 1024, 128, (1, "smem")),
        (90, 32, 100 * 1024, 128, (2, "smem")),
        # tiny CTAs hit the 32-CTA limit
        (90, 16, 0, 32, (32, "ctas")),
    ],
)
def test_occupancy(arch, regs, smem, threads, expected):
    assert sr.occupancy(arch, regs, smem, threads) == expected


def test_occupancy_counts_the_reserved_kilobyte_once():
    # 2 x (113 KiB + 1 KiB) = 228 KiB fits only when the 1 KiB is not added a second time
    assert sr.occupancy(90, 32, 114 * 1024, 128, reserved_included=True) == (2, "smem")
    assert sr.occupancy(90, 32, 114 * 1024, 128) == (1, "smem")


# --- a compiled kernel with a known loop ---------------------------------------------


@pytest.fixture(scope="module")
def probe():
    pytest.importorskip("triton")
    try:
        sr.triton_tool("nvdisasm")
        sr.triton_tool("cuobjdump")
    except FileNotFoundError as exc:
        pytest.skip(f"Triton's bundled CUDA tools are missing: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests._sass_probe"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {int(a): r for a, r in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


@pytest.mark.parametrize("arch, mma, mma_per_iter", [(80, "mma.sync", 2), (90, "wgmma-wait", 1)])
def test_probe_kernel_loop(probe, arch, mma, mma_per_iter):
    row = probe[arch]
    assert row["region"] == "loop"
    # the same loop found by another tool and rule: cuobjdump's backward BRA holding the MMA
    assert row["region_instrs"] == row["cuobjdump_loop_instrs"]
    assert row["loop_instrs"] <= row["region_instrs"]
    assert row["mma"] == mma
    # per iteration: m16n8k16 x 2 on one warp (sm_80), one 64x16x16 wgmma (sm_90); ptxas may
    # unroll the small loop, which the W bytes per pass reveal and the MMA count confirms
    assert row["mma_instrs"] == mma_per_iter * row["unroll"]
    assert row["mma_macs_ratio"] == 1.0
    bn, bk = row["tile"][1:]
    assert row["w_bytes_loaded"] == bn * bk * row["unroll"]  # each uint8 W element loaded once
    assert row["load_bytes"] in (1, 2, 4, 8, 16) and row["w_load_instrs"] >= 1
    assert row["note"] == ""  # W found by its line, not by the fallback
    assert row["sass_per_elem"] == round(row["loop_instrs"] * row["threads"] / (bn * bk * row["unroll"]), 2)
    assert row["spills"] == 0 and row["ctas_per_sm"] >= 1


# --- the committed report -------------------------------------------------------------

FIELDS = {"kernel", "config", "default", "arch", "regs", "spills", "smem_bytes", "ctas_per_sm", "mma"}
FIELDS |= {"load_bytes", "sass_per_elem", "loop_instrs", "elems_per_iter", "threads"}


def test_committed_report_covers_every_kernel_and_arch():
    records = json.loads(REPORT.read_text())
    assert isinstance(records, list) and records
    for r in records:
        assert FIELDS <= set(r), f"{r.get('name')}: missing {FIELDS - set(r)}"
        assert r["arch"] in (80, 90) and isinstance(r["default"], bool)
        assert r["mma"] in ("wgmma-async", "wgmma-wait", "mma.sync", "none")
        assert r["sass_per_elem"] > 0 and r["ctas_per_sm"] >= 1
    kernels = {(r["kernel"], r["arch"]) for r in records if r["default"]}
    for k in (
        "qlora_fwd_kernel",
        "qlora_dx_kernel",
        "dequantize_4bit_kernel",
        "dequantize4_kernel",
        "gemv4_kernel",
    ):
        assert {(k, 80), (k, 90)} <= kernels, f"{k}: no default record for both archs"


def test_roofline_reads_the_report():
    from benchmarks import roofline_qlora

    records = json.loads(REPORT.read_text())
    for kernel in roofline_qlora.KERNELS:
        for m in roofline_qlora.MS:
            cost = roofline_qlora.dequant_cost(kernel, m)
            tile = roofline_qlora._tile(kernel, m)
            rec = next(
                r
                for r in records
                if r["name"] == cost["name"]
                and r["arch"] == roofline_qlora.ARCH
                # M <= 64: the split schedule
                and r["kernel"] in (f"qlora_{kernel}_kernel", f"qlora_{kernel}_split_kernel")
            )
            assert cost["sass_per_elem"] == rec["sass_per_elem"]
            # the PRE_LORA variant's record from M >= PRE_LORA_M on (sm_90), the fused one below
            assert ("prelora" in rec["name"]) == tile["pre"] == (m >= roofline_qlora._kern().PRE_LORA_M)
        down = roofline_qlora.down_cost(kernel)
        assert down["kernel"] == "qlora_lora_down_kernel" and down["arch"] == roofline_qlora.ARCH
        assert down["mma_macs_ratio"] == 1.0 and down["stack_bytes"] == down["local_bytes"] == 0


def test_committed_report_small_m_tiles_do_not_repeat_mma_and_dequant_loads_16_bytes():
    # docs/design.md, "Triton configs": no warp repeats another's MMAs at BLOCK_M = 16, and
    # the 4-bit dequantize kernels load W (and store) 16 bytes per access.
    records = json.loads(REPORT.read_text())
    small = [r for r in records if r["kernel"].startswith("qlora_") and r["config"].startswith("16x")]
    assert {r["name"] for r in small} >= {"qlora_fwd_smallM_r16_bf16", "qlora_dx_smallM_r16_bf16"}
    for r in small:
        assert r["mma_macs_ratio"] == 1.0, f"{r['name']} sm_{r['arch']}: {r['mma_macs_ratio']}"
    dequant = [
        r for r in records if r["kernel"] in ("dequantize_4bit_kernel", "dequantize_4bit_nested_kernel")
    ]
    assert {(r["kernel"], r["arch"]) for r in dequant} == {
        (k, a) for k in ("dequantize_4bit_kernel", "dequantize_4bit_nested_kernel") for a in (80, 90)
    }
    for r in dequant:
        assert r["load_bytes"] == 16 and r["elems_per_iter"] == 4096, r["name"]


def test_merge_replaces_records_by_name_and_arch():
    from benchmarks.sass_report import merge

    old = [
        {"name": "a", "arch": 80, "v": 1},
        {"name": "a", "arch": 90, "v": 2},
        {"name": "b", "arch": 80, "v": 3},
    ]
    new = [{"name": "a", "arch": 90, "v": 20}, {"name": "c", "arch": 80, "v": 4}]
    assert [r["v"] for r in merge(old, new)] == [1, 20, 3, 4]
    assert merge(old, []) == old
