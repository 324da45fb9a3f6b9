"""Benchmark cases, one module per op family. Each module's ``cases(device, quick)``
returns the cases it can run here, with every installed peer as an implementation."""

from __future__ import annotations

from . import distributed, e2e, isa, matmul, optim, overhead, qlora, quant

MODULES = {
    "quant": quant,
    "matmul": matmul,
    "qlora": qlora,
    "optim": optim,
    "e2e": e2e,
    "isa": isa,
    "overhead": overhead,
    "distributed": distributed,
}
