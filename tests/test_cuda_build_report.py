"""Static evidence for the CUDA kernels: the ptxas -v report of the build.

The build keeps each CUDA source's ptxas output in build/ptxas-report/<source>.txt
(cmake/capture_ptxas.cmake, rewritten whenever the source is recompiled). Every
kernel, on every architecture compiled into qpeft._C_cuda, must use no local
memory: 0 bytes of spill stores and loads and a 0-byte stack frame (a local array
indexed at run time would show there). ``python -m tests.test_cuda_build_report``
prints the registers per kernel and architecture as a markdown table.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

REPORT_DIR = Path(__file__).resolve().parents[1] / "build" / "ptxas-report"
KERNEL_SOURCES = ("quant.cu", "gemv_4bit.cu", "qlora_gemm.cu", "qlora_simt.cu")

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)[af]?'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")


def parse_report(text: str) -> dict[tuple[str, int], dict[str, int]]:
    """{(mangled kernel, sm): {registers, stack, spill_stores, spill_loads}} of one ptxas -v output."""
    entries: dict[tuple[str, int], dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = (m.group(1), int(m.group(2)))
            entries[current] = {}
        elif _PROPS.search(line):
            continue  # its numbers follow on the next line
        elif (m := _FRAME.search(line)) and current is not None:
            # The entry's own line, or a non-inlined device function's: either way
            # local memory the entry's threads use, so it is charged to the entry.
            stats = dict(zip(("stack", "spill_stores", "spill_loads"), map(int, m.groups())))
            for key, value in stats.items():
                entries[current][key] = entries[current].get(key, 0) + value
        elif (m := _USED.search(line)) and current is not None:
            entries[current]["registers"] = int(m.group(1))
    return entries


def _nvcc_present() -> bool:
    for var in ("CMAKE_CUDA_COMPILER", "CUDACXX"):
        if os.environ.get(var):
            return True
    return shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").exists()


def load_reports():
    try:
        cuda = importlib.import_module("qpeft._C_cuda")
    except ImportError as exc:
        if os.environ.get("QPEFT_CUDA", "auto").strip() == "0":
            pytest.skip("built with QPEFT_CUDA=0")
        if _nvcc_present():
            pytest.fail(f"nvcc is installed but qpeft._C_cuda is missing ({exc}): the CUDA build did not run")
        pytest.skip("no nvcc: the CUDA module is not built here")
    reports = {p.name[: -len(".txt")]: parse_report(p.read_text()) for p in sorted(REPORT_DIR.glob("*.txt"))}
    return cuda, reports


def short_name(mangled: str) -> str:
    """`quantize4_kernel<1, 2>` from the mangled name (c++filt when present)."""
    filt = shutil.which("c++filt")
    if filt:
        demangled = subprocess.run([filt, mangled], capture_output=True, text=True, check=True).stdout.strip()
        m = re.search(r"(\w+)<([^()]*)>\(", demangled)
        if m:
            return f"{m.group(1)}<{m.group(2)}>"
    m = re.search(r"\d+(\w+_kernel)I", mangled)
    return m.group(1) if m else mangled


def test_every_kernel_reported_without_local_memory():
    cuda, reports = load_reports()
    archs = set(cuda.compiled_archs())
    assert archs, "qpeft._C_cuda lists no compiled architectures"
    for source in KERNEL_SOURCES:
        assert source in reports, f"no ptxas report for {source} in {REPORT_DIR}"
        entries = reports[source]
        kernels = {name for name, _ in entries}
        assert kernels, f"{source}: the report lists no kernels"
        for name in kernels:
            have = {sm for n, sm in entries if n == name}
            assert have == archs, (
                f"{source}: {short_name(name)} compiled for sm_{sorted(have)}, module has {sorted(archs)}"
            )
    for source, entries in reports.items():
        for (name, sm), stats in entries.items():
            where = f"{source}: {short_name(name)} on sm_{sm}"
            assert "registers" in stats, f"{where}: no register count"
            assert stats.get("spill_stores", 0) == 0 and stats.get("spill_loads", 0) == 0, (
                f"{where} spills: {stats}"
            )
            assert stats.get("stack", 0) == 0, (
                f"{where} uses a {stats['stack']}-byte stack frame (local memory)"
            )


def register_table() -> str:
    _, reports = load_reports()
    regs: dict[tuple[str, str], dict[int, int]] = defaultdict(dict)
    archs: set[int] = set()
    for source, entries in reports.items():
        for (name, sm), stats in entries.items():
            regs[(source, short_name(name))][sm] = stats["registers"]
            archs.add(sm)
    cols = sorted(archs)
    lines = [
        "| source | kernel <template args> | " + " | ".join(f"sm_{a}" for a in cols) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in cols) + " |",
    ]
    for (source, kernel), by_arch in sorted(regs.items()):
        lines.append(f"| {source} | `{kernel}` | " + " | ".join(str(by_arch.get(a, "")) for a in cols) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(register_table())


def test_parser_sees_spills_and_stack():
    # The gate above is only as good as the parser: a synthetic report with spills.
    text = (
        "ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z3fooPf\n"
        "    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 0 bytes smem\n"
        "ptxas info    : Compiling entry function '_Z3barv' for 'sm_75'\n"
        "ptxas info    : Function properties for _Z6helperv\n"
        "    32 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Function properties for _Z3barv\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 12 registers\n"
    )
    entries = parse_report(text)
    assert entries[("_Z3fooPf", 90)] == {"stack": 16, "spill_stores": 8, "spill_loads": 4, "registers": 255}
    assert entries[("_Z3barv", 75)]["stack"] == 32  # the helper's frame counts against its caller
    assert entries[("_Z3barv", 75)]["registers"] == 12
