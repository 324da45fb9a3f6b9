"""benchmarks/bench_quant.py, the quantization benchmark run as a script: it checks
every implementation's result before timing it and exits 0 only if qpeft's are right."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quant_script_quick(tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_quant.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    report = (tmp_path / "cpu_quick.md").read_text()
    for group in (
        "quantize 4-bit nf4+dq",
        "dequantize 4-bit nf4+dq -> bf16",
        "quantize 8-bit",
        "dequantize 8-bit",
    ):
        assert f"### {group}" in report
    assert "memory copy" in report and "| qpeft cpu out= |" in report
