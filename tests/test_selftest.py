"""python -m qpeft selftest: the quick CPU run passes and prints its table, a broken kernel
registered through the dispatcher makes it fail naming the op, and a device that is not here
is one line on stderr with exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qpeft
from qpeft import _dispatch
from qpeft.__main__ import main

ROOT = Path(__file__).resolve().parent.parent


def test_quick_cpu_run_passes_and_prints_the_table(capsys):
    # The native backends; Triton (here under the interpreter, which conftest turns on) is run
    # on the tiny grid below: interpreted, the quick grid alone takes a minute and more.
    rc = main(["selftest", "--device", "cpu", "--quick", "--backends", "cpu,cuda_emulated"])
    out = capsys.readouterr().out
    assert rc == 0, out
    header = next(line for line in out.splitlines() if line.startswith("op "))
    for column in ("backend", "dtype", "shapes", "max |err|", "bound", "time ms"):
        assert column in header
    rows = [line.split() for line in out.splitlines() if line.endswith(" ok")]
    covered = {(r[0], r[1]) for r in rows}
    # every op of the C++ CPU backend's kernel table has a row (qlora's two ops share one)
    for op in _dispatch.kernels_of("cpu"):
        name = "qlora_linear+backward" if op.startswith("qlora_linear") else op
        assert (name, "cpu") in covered, op
    for op in ("PagedAdamW", "PagedAdamW8bit"):
        assert (op, "cpu") in covered
    assert "selftest: all passed" in out


def test_tiny_run_covers_the_interpreted_triton_kernels(capsys):
    pytest.importorskip("triton")
    if "triton" not in qpeft.available_backends():
        pytest.skip("the triton backend cannot run on CPU tensors here (TRITON_INTERPRET is not 1)")
    rc = main(["selftest", "--device", "cpu", "--tiny", "--backends", "triton", "--checks", "quant8,qlora"])
    out = capsys.readouterr().out
    assert rc == 0, out
    ops = {line.split()[0] for line in out.splitlines() if line.endswith(" ok") and " triton " in line}
    assert ops == {
        "quantize_blockwise",
        "dequantize_blockwise",
        "qlora_linear+backward",
    }


@pytest.fixture
def broken_cpu_kernel():
    """The C++ CPU backend's quantize_blockwise replaced, through register_backend, by one
    that returns the reference's codes with one code off by one; restored afterwards."""
    original = _dispatch.kernels_of("cpu")["quantize_blockwise"]
    unavailable = _dispatch._backends["cpu"].unavailable

    def broken(x, code, blocksize):
        q, absmax = original(x, code, blocksize)
        q = q.clone()
        q.view(-1)[q.numel() // 2] ^= 1
        return q, absmax

    _dispatch.register_backend("cpu", {"quantize_blockwise": broken}, unavailable)
    yield
    _dispatch.register_backend("cpu", {"quantize_blockwise": original}, unavailable)


def test_a_wrong_kernel_fails_naming_the_op(broken_cpu_kernel, capsys):
    rc = main(["selftest", "--device", "cpu", "--quick", "--checks", "quant8", "--backends", "cpu"])
    cap = capsys.readouterr()
    assert rc == 1
    failed = [line for line in cap.out.splitlines() if line.endswith("FAIL")]
    assert failed and all(line.split()[:2] == ["quantize_blockwise", "cpu"] for line in failed), cap.out
    assert "quantize_blockwise [cpu," in cap.err and "FAILED" in cap.err
    assert not any(line.startswith("dequantize_blockwise") for line in failed)


def test_a_kernel_that_raises_fails_naming_the_op(capsys):
    original = _dispatch.kernels_of("cpu")["gemv_4bit"]
    unavailable = _dispatch._backends["cpu"].unavailable

    def raises(*args):
        raise RuntimeError("planted failure")

    _dispatch.register_backend("cpu", {"gemv_4bit": raises}, unavailable)
    try:
        rc = main(["selftest", "--device", "cpu", "--quick", "--checks", "gemv", "--backends", "cpu"])
    finally:
        _dispatch.register_backend("cpu", {"gemv_4bit": original}, unavailable)
    cap = capsys.readouterr()
    assert rc == 1
    assert "gemv_4bit [cpu," in cap.err and "planted failure" in cap.err


@pytest.mark.parametrize(
    "option", [["--checks", "nope"], ["--backends", "cuda"], ["--checks", ""], ["--checks", ","]]
)
def test_unknown_check_or_backend_is_a_usage_error(option):
    # through `python -m qpeft`, where qpeft/__main__.py runs as __main__
    r = subprocess.run(
        [sys.executable, "-m", "qpeft", "selftest", "--device", "cpu", *option],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"python -m qpeft selftest: error: {option[0]}:"), r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("command", ["selftest", "demo"])
def test_cuda_without_a_gpu_is_one_line_and_exit_2(command):
    r = subprocess.run(
        [sys.executable, "-m", "qpeft", command, "--device", "cuda"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"python -m qpeft {command}: error: --device cuda:"), (
        r.stderr
    )
    assert r.stdout == ""


def test_bounds_come_from_the_shared_module():
    """The tests and the selftest hold kernels to one set of bounds (qpeft/testing.py)."""
    from qpeft import selftest, testing

    from . import _helpers

    assert _helpers.gemv_bound is testing.gemv_bound and _helpers.oracle is testing.oracle
    assert selftest.testing is testing
    assert qpeft.testing is testing


def test_compare_is_bitwise_at_bound_zero_and_nan_fails():
    from qpeft.selftest import _compare

    a = torch.tensor([1.0, 0.0, 2.0])
    assert _compare(a, a.clone(), 0) == (0.0, 0.0, 0.0)
    assert _compare(a, torch.tensor([1.0, -0.0, 2.0]), 0)[2] == float("inf")  # -0.0 is not 0.0
    assert _compare(a, a.half(), 0)[2] == float("inf")  # another dtype
    err, bound, ratio = _compare(a, a + 1e-5, 1e-6)
    assert ratio > 1 and bound == pytest.approx(1e-6)
    assert _compare(a, a + 1e-7, torch.full((3,), 1e-6))[2] < 1
    assert _compare(torch.tensor([float("nan")]), torch.tensor([1.0]), 1.0)[2] == float("inf")
