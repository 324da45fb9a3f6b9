"""The quantization benchmark on its own: quantize / dequantize 4-bit (NF4, with and
without double quantization) and 8-bit blockwise at 1024^2 to 4096^2 bf16 weights, qpeft's
C++ kernels against the pure-torch reference, bitsandbytes and torchao, each rate next to
the copy bandwidth measured in the same run, printed as tables.

    python benchmarks/bench_quant.py [--quick] [--out DIR]

It is ``python -m benchmarks --ops quant`` (same cases, checks and report: see
benchmarks/cases/quant.py), writing to a temporary directory unless ``--out`` is given,
so that it never replaces the committed run of record in benchmarks/results/.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.__main__ import main


def run(argv: list[str]) -> int:
    if "--out" in argv:
        return main(["--ops", "quant", *argv])
    with tempfile.TemporaryDirectory() as out:
        return main(["--ops", "quant", "--out", out, *argv])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
