"""What a newcomer meets first: the warning when the compiled CPU module is missing; the
command-line entry points (``python -m qpeft``: one line on stderr and exit status 2 for a
bad ``--device`` or ``--out``, never a torch traceback; ``python -m benchmarks``: where it
wrote and what it skipped); and the lint/format tool pins that CI, pre-commit and the
``dev`` extra must share."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib  # Python 3.11+, which CI and the test extras run on
import torch

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter from the repository root (so that this checkout's
    qpeft is the one imported), with ``env`` added to the environment."""
    return subprocess.run(
        [sys.executable, *args, "-c", code] if code else [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


# --- the pure-torch fallback is announced, once, at the first CPU op --------------------

_WITHOUT_C = """
import sys, warnings
sys.modules["qpeft._C"] = None  # what a source tree without the built module looks like
warnings.simplefilter("always")  # the warning must not rely on the registry to appear once
with warnings.catch_warnings(record=True) as at_import:
    import torch, qpeft, qpeft.functional as qf
assert not at_import, [str(w.message) for w in at_import]
assert "qpeft._C" not in sys.modules or sys.modules["qpeft._C"] is None
w = torch.randn(64, 128)
with warnings.catch_warnings(record=True) as caught:
    packed, state = qf.quantize_4bit(w, 64, "nf4")  # the line the warning must point at
    for _ in range(3):
        qf.dequantize_4bit(*qf.quantize_4bit(w, 64, "nf4"))
from qpeft._native import ReferenceFallbackWarning
ours = [x for x in caught if issubclass(x.category, ReferenceFallbackWarning)]
assert len(ours) == 1, [str(x.message) for x in caught]
print(ours[0].lineno)
print(ours[0].message)
with qpeft.use_backend("default"):
    ref_packed, _ = qf.quantize_4bit(w, 64, "nf4")
assert torch.equal(packed, ref_packed)
"""


def test_missing_cpu_module_warns_once_at_the_first_cpu_op_naming_the_fix():
    r = _python(_WITHOUT_C)
    assert r.returncode == 0, r.stderr
    lineno, message = r.stdout.splitlines()[:2]
    # it points at the user's call, not at qpeft's dispatcher
    assert _WITHOUT_C.splitlines()[int(lineno) - 1].strip().startswith("packed, state = qf.quantize_4bit")
    assert "qpeft._C could not be imported" in message
    assert "pip install -e ." in message and "pure-torch reference" in message


def test_no_fallback_warning_when_the_cpu_module_is_built():
    r = _python(
        "import warnings, torch, qpeft.functional as qf\n"
        "from qpeft._native import ReferenceFallbackWarning\n"
        "warnings.simplefilter('error', ReferenceFallbackWarning)\n"
        "qf.quantize_4bit(torch.randn(64, 64), 64, 'nf4')\n"
    )
    assert r.returncode == 0, r.stderr


# --- python -m qpeft: bad command lines are one line on stderr, exit status 2 -----------


def _unusable_cuda() -> str:
    """A CUDA device that does not exist here: plain ``cuda`` without a GPU (the case a
    newcomer on a laptop meets), else one index past the last GPU."""
    return "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


@pytest.mark.parametrize("command", ["demo", "quant-report"])
@pytest.mark.parametrize("device", [_unusable_cuda(), "tpu"])
def test_unusable_device_is_one_line_and_exit_2(command, device):
    r = _python("", "-m", "qpeft", command, "--device", device)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"python -m qpeft {command}: error: --device {device}:"), lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_check_device_says_why():
    from qpeft.__main__ import UsageError, check_device

    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match="unknown device"):
        check_device("mps")
    with pytest.raises(UsageError, match="unknown device"):
        check_device("cuda:x")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CPU-only build|no CUDA device"):
            check_device("cuda")
    with pytest.raises(UsageError, match=r"CUDA device\(s\)|CPU-only build|no CUDA device"):
        check_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize(
    "option,message",
    [
        (["--dropout", "1.0"], "argument --dropout: must be in [0, 1), got 1.0"),
        (["--dropout", "-0.1"], "argument --dropout: must be in [0, 1), got -0.1"),
        (["--lr", "nan"], "argument --lr: must be in [1e-12, 10], got nan"),
        (["--lr", "-1"], "argument --lr: must be in [1e-12, 10], got -1"),
        (["--seq-len", "100000"], "--seq-len 100000: the held-out text has"),
    ],
)
def test_demo_option_out_of_range_is_one_line_and_exit_2(option, message):
    r = _python("", "-m", "qpeft", "demo", "--size", "tiny", "--steps", "1", "--out", "", *option)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and message in r.stderr.strip().splitlines()[-1], r.stderr


def test_out_that_is_a_file_is_refused_before_training(tmp_path):
    target = tmp_path / "taken"
    target.write_text("not a directory")
    r = _python("", "-m", "qpeft", "demo", "--device", "cpu", "--out", str(target))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"python -m qpeft demo: error: --out {target}: exists and is not a directory"
    ]
    assert target.read_text() == "not a directory"


def test_out_where_files_cannot_be_written_is_refused_before_training():
    # /proc exists and is a directory, but no file can be created in it: refused at start,
    # not with a traceback after training (checked by creating, and removing, a probe file)
    from qpeft.__main__ import UsageError, check_output_dir

    if not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux procfs")
    with pytest.raises(UsageError, match="--out /proc: cannot write files there"):
        check_output_dir("/proc")


@pytest.mark.parametrize(
    "option,message",
    [
        (["--repeat", "0"], "argument --repeat: must be >= 1, got 0"),
        (["--repeat", "-3"], "argument --repeat: must be >= 1, got -3"),
        (["--rows", "-1"], "argument --rows: must be >= 1, got -1"),
        (["--rows", "0"], "argument --rows: must be >= 1, got 0"),
        (["--cols", "0"], "argument --cols: must be >= 1, got 0"),
        (["--blocksize", "7"], "argument --blocksize: invalid choice: 7"),
        (["--blocksize", "0"], "argument --blocksize: invalid choice: 0"),
        (["--blocksize", "8192"], "argument --blocksize: invalid choice: 8192"),
    ],
)
def test_quant_report_option_out_of_range_is_an_argument_error(option, message, capsys):
    from qpeft.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["quant-report", "--device", "cpu", *option])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("dtype,bits", [("float32", 32), ("float16", 16), ("bfloat16", 16)])
def test_quant_report_compares_with_the_chosen_dtype(dtype, bits, capsys):
    from qpeft.__main__ import main

    argv = [
        "quant-report",
        "--device",
        "cpu",
        "--rows",
        "4",
        "--cols",
        "64",
        "--repeat",
        "1",
        "--dtype",
        dtype,
    ]
    assert main(argv) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "bits per parameter" in ln)
    assert line.endswith(f"({dtype}: {bits})"), line


@pytest.mark.parametrize("command", ["demo", "quant-report"])
def test_help_is_plain_text_and_shows_defaults(command):
    r = _python("", "-m", "qpeft", command, "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())  # argparse wraps lines
    assert "``" not in text
    if command == "demo":
        assert "optimizer steps (default: 300)" in text
        assert "(default: qpeft_demo_out)" in text
        assert "--no-train-embeddings" in text and "(default: True)" not in text
    else:
        assert "(default: 4096)" in text and "(default: nf4)" in text


def test_top_level_help_is_plain_text():
    r = _python("", "-m", "qpeft", "--help")
    assert r.returncode == 0 and "``" not in r.stdout and "quant-report" in r.stdout


# --- python -m benchmarks: says where it wrote and, once, what it skipped ---------------


def test_benchmarks_say_where_they_wrote_and_what_they_skipped(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from benchmarks import __main__ as bench
    from benchmarks import harness
    from benchmarks.harness import Case, Impl

    # one trivial case and no bandwidth/GEMM measurement: the test is about the messages
    x = torch.ones(4)
    fake = SimpleNamespace(
        cases=lambda device, quick: [Case("tiny group", "4", [Impl("qpeft cpu", x.clone)])]
    )
    monkeypatch.setattr(bench, "MODULES", {"tiny": fake})
    monkeypatch.setattr(bench, "copy_bandwidth_gbs", lambda *a: 1.0)
    monkeypatch.setattr(bench, "gemm_gflops", lambda *a: 1.0)
    monkeypatch.setattr(
        harness, "OPTIONAL", {"json": "never missing", "qpeft_no_such_package": "the made-up rows"}
    )
    monkeypatch.setattr(bench, "missing_optional", harness.missing_optional)

    assert bench.main(["--quick", "--ops", "tiny", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    skipped = [line for line in err.splitlines() if "skipped" in line]
    assert skipped == [
        "not installed, so skipped: qpeft_no_such_package (the made-up rows). "
        "pip install -e '.[bench]' installs them."
    ]
    assert f"wrote 2 files to {tmp_path.resolve()}: cpu_quick.md, cpu_quick.json" in err
    report = (tmp_path / "cpu_quick.md").read_text()
    assert "Not installed, so not compared: qpeft_no_such_package" in report


def test_benchmarks_refuse_a_bad_out_or_threads_before_running(tmp_path, monkeypatch, capsys):
    """--out naming a file ran every case, then lost the results to FileExistsError;
    --threads -1 was a traceback. Both are usage errors (exit 2) before any case runs."""
    from types import SimpleNamespace

    from benchmarks import __main__ as bench

    def cases(device, quick):
        raise AssertionError("a case ran")

    monkeypatch.setattr(bench, "MODULES", {"tiny": SimpleNamespace(cases=cases)})
    taken = tmp_path / "taken"
    taken.write_text("a file")
    for argv, message in [
        (["--out", str(taken)], f"--out {taken}: exists and is not a directory"),
        (["--out", "/proc/qpeft_no_such"], "cannot create or write the directory"),
        (["--threads", "-1"], "argument --threads: must be >= 1, got -1"),
        (["--threads", "0"], "argument --threads: must be >= 1, got 0"),
    ]:
        with pytest.raises(SystemExit) as exc:
            bench.main(["--quick", "--ops", "tiny", "--out", str(tmp_path / "out"), *argv])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1], argv
    assert taken.read_text() == "a file"


def test_bench_extra_installs_every_optional_package():
    from benchmarks.harness import OPTIONAL

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {req.split(">")[0].split("=")[0].split("<")[0].strip() for req in extras["bench"]}
    assert set(OPTIONAL) <= names


# --- developer tooling: one version of each lint/format tool everywhere ----------------


def test_lint_tool_pins_agree_across_ci_pre_commit_and_the_dev_extra():
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    ci = (ROOT / ".ci" / "run").read_text()
    hooks = (ROOT / ".pre-commit-config.yaml").read_text()
    for tool in ("ruff", "clang-format"):
        (pin,) = [req for req in dev if req.startswith(f"{tool}==")]
        assert pin in ci and pin in hooks, pin
        # no other version of the tool is named anywhere
        assert set(re.findall(rf"{tool}==[\w.]+", ci + hooks)) == {pin}
    for check in ("ruff check .", "ruff format --check .", "clang-format --dry-run -Werror"):
        assert check in ci, check
