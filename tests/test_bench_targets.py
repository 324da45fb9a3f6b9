"""The benchmark targets name implementations the cases really run: a renamed
implementation would otherwise drop its targets from the report without a word (the
issue 13 rows vanished once when the CPU layer's auto mode gained the kernel's name)."""

from __future__ import annotations

import pytest

from benchmarks.cases import isa
from benchmarks.targets import AUTO_MODES, TARGETS


def test_cpu_layer_targets_match_the_isa_cases():
    pytest.importorskip("qpeft._C")
    mode = isa._auto_name()
    assert mode in AUTO_MODES
    cases = isa.cases("cpu", quick=True)
    groups = {c.group for c in cases}
    names = {impl.name for c in cases for impl in c.impls}
    judged = [t for t in TARGETS if t.group in groups and f"({mode} auto)" in t.impl]
    # Linear4bit: M=1/16/512 against torch bf16 and fp32; the layer against PEFT+bnb bf16/fp32
    assert len(judged) == 8
    for t in judged:
        assert t.impl in names, t
        if t.peer.startswith("torch"):
            assert t.peer in names, t
