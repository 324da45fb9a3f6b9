"""benchmarks.readme: a per-ISA README section (``--section NAME``) is regenerated from a
run's JSON between its own markers, every M of the "by ISA" groups kept, the machine's ISA
named, and the rest of the README untouched."""

from __future__ import annotations

import json

import pytest

from benchmarks import readme


def _result(group, label, impl, ms, x=None):
    return {
        "group": group,
        "label": label,
        "impl": impl,
        "timing": {"median_ms": ms, "iqr_ms": 0.1, "runs": 5},
        "peak_mb": 0.0,
        "error": None,
        "x": x,
        "x_name": "M" if x is not None else None,
        "bound": None,
        "nbytes": None,
        "flops": None,
    }


def test_section_is_regenerated_between_its_markers(tmp_path):
    machine = {
        "device": "cpu",
        "cpu": "Test CPU",
        "cores": 2,
        "torch_threads": 1,
        "torch_cpu_capability": "AVX512",
        "cpu_isa": ["avx512_bf16", "amx_bf16"],
        "qpeft_cpu_bf16": True,
        "gpu": None,
        "python": "3.11",
        "versions": {"torch": "2.13"},
    }
    results = [
        _result("Linear4bit by ISA", f"M={m} 4096x4096", impl, ms, m)
        for m in (1, 16)
        for impl, ms in (("qpeft Linear4bit (bf16 auto)", 2.0), ("torch bf16 F.linear (dequantized W)", 1.0))
    ]
    run = tmp_path / "run.json"
    run.write_text(
        json.dumps(
            {"machine": machine, "limits": {"copy_gbs": 10.0, "gemm_gflops": 100.0}, "results": results}
        )
    )
    doc = tmp_path / "README.md"
    doc.write_text(
        "intro\n<!-- perf:begin -->\nold main\n<!-- perf:end -->\n<!-- perf:x:begin -->\nold\n<!-- perf:x:end -->\nend\n"
    )
    assert readme.main(["--results", str(run), "--readme", str(doc), "--section", "x"]) == 0
    text = doc.read_text()
    body = text.split("<!-- perf:x:begin -->")[1].split("<!-- perf:x:end -->")[0]
    assert "old" not in body and "ISA: avx512_bf16 amx_bf16; qpeft computes bf16 x in bf16" in body
    assert "| M=1 4096x4096 |" in body and "| M=16 4096x4096 |" in body  # every M kept
    assert "old main" in text and text.startswith("intro\n") and text.endswith("end\n")


def test_missing_section_is_an_error(tmp_path):
    doc = tmp_path / "README.md"
    doc.write_text("no markers\n")
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"machine": {}, "limits": {}, "results": []}))
    with pytest.raises(SystemExit):
        readme.main(["--results", str(run), "--readme", str(doc), "--section", "x"])
