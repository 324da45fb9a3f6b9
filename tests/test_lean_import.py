"""Importing qpeft does no device work and loads no native module."""

from __future__ import annotations

import subprocess
import sys


def test_import_is_lean():
    code = (
        "import sys, torch, qpeft, qpeft.functional\n"
        "assert not torch.cuda.is_initialized(), 'importing qpeft initialised CUDA'\n"
        "loaded = [m for m in ('qpeft._C', 'qpeft._C_cuda', 'triton') if m in sys.modules]\n"
        "assert not loaded, f'importing qpeft loaded {loaded}'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


_WITHOUT_C = """
import sys
import importlib.abc


class Missing(importlib.abc.MetaPathFinder):
    # Stands in for an install whose native CPU module was never built.
    def find_spec(self, name, path, target=None):
        if name == "qpeft._C":
            raise ImportError("No module named 'qpeft._C' (blocked by the test)")
        return None


sys.meta_path.insert(0, Missing())
import torch
import qpeft
import qpeft.functional as qf

assert "cpu" not in qpeft.available_backends(), qpeft.available_backends()
try:
    with qpeft.use_backend("cpu"):
        pass
except qpeft.BackendUnavailableError as exc:
    print(exc)
else:
    raise SystemExit("use_backend('cpu') did not raise")
# Unforced dispatch falls back to the reference instead of failing.
packed, state = qf.quantize_4bit(torch.randn(64, 64))
assert qf.dequantize_4bit(packed, state).shape == (64, 64)
"""


def test_missing_native_module_error_is_actionable():
    """Without qpeft._C (import blocked in a fresh process), forcing the CPU backend raises an
    error that names the module and how to build it, and the ops still run on the reference."""
    r = subprocess.run([sys.executable, "-c", _WITHOUT_C], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "qpeft._C could not be imported" in r.stdout and "pip install ." in r.stdout, r.stdout
