"""Static evidence for the Triton kernels without a GPU: every kernel compiles ahead of
time for sm_80 and sm_90, and no default config spills (no local memory, no stack).

Runs benchmarks/triton_aot_report.py --smoke (the first and last config of each kernel)
in a fresh process: conftest.py puts this one in interpreter mode, where @triton.jit
functions cannot be compiled. `python -m benchmarks.triton_aot_report` does every config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("sm_80", "sm_90")


@pytest.fixture(scope="module")
def report() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.triton_aot_report", "--smoke", "--json", "-"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"triton_aot_report failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rows(report: dict, module: str) -> list[dict]:
    # both kernel modules exist: one the report could not compile is a failure, not a skip
    assert module not in report["skipped_modules"], (
        f"qpeft.triton_kernels.{module}: {report['skipped_modules'][module]}"
    )
    return [r for r in report["rows"] if r["module"] == module]


@pytest.mark.parametrize("module", ["quant", "qlora"])
def test_every_kernel_compiles_for_sm80_and_sm90(report, module):
    import importlib

    configs = importlib.import_module(f"qpeft.triton_kernels.{module}").AOT_CONFIGS
    kernels = {cfg["fn"].__name__ for cfg in configs}
    rows = _rows(report, module)
    for kernel in kernels:
        assert {r["arch"] for r in rows if r["kernel"] == kernel} == set(ARCHS), (
            f"{kernel} not compiled for both"
        )
    assert all(r["regs"] > 0 for r in rows)


@pytest.mark.parametrize("module", ["quant", "qlora"])
def test_default_configs_do_not_spill(report, module):
    spilling = [
        f"{r['name']} {r['arch']}: {r['regs']} regs, stack {r['stack_bytes']} B, local {r['local_bytes']} B"
        for r in _rows(report, module)
        if r["default"] and (r["stack_bytes"] or r["local_bytes"])
    ]
    assert not spilling, "default configs with local memory or stack (spills):\n" + "\n".join(spilling)


def test_quant_kernels_round_every_step(report):
    # Bit-exactness with the reference needs every fp32 op rounded alone and subnormals
    # kept: no contracted FMA and no flush-to-zero anywhere in the PTX.
    bad = [f"{r['name']} {r['arch']}" for r in _rows(report, "quant") if r["ptx_fma_f32"] or r["ptx_ftz"]]
    assert not bad, f"fma or ftz in: {bad}"
