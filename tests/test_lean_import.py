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


def test_missing_native_module_error_is_actionable(monkeypatch):
    from qpeft import _native

    monkeypatch.setattr(
        _native, "_load", lambda name: (None, f"qpeft.{name} could not be imported; reinstall")
    )
    import pytest

    with pytest.raises(ImportError, match="reinstall"):
        _native.cpu_module()
