""".ci/gpu refuses cleanly where there is no GPU: one line on stderr, exit status 2, nothing
run or written. (Its --rehearse run, every step on CPU, is part of .ci/run.)"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "gpu"


def _run(tmp_path: Path, nvidia_smi: str | None, *args: str) -> subprocess.CompletedProcess:
    """.ci/gpu with PATH holding only the basic tools and, if given, a fake nvidia-smi."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("bash", "dirname", "grep", "sed", "date", "mkdir", "cat"):
        found = shutil.which(tool)
        if found and not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(found)
    if nvidia_smi is not None:
        fake = bin_dir / "nvidia-smi"
        fake.write_text("#!/bin/sh\n" + nvidia_smi + "\n")
        fake.chmod(0o755)
    out = tmp_path / "out"
    env = {"PATH": str(bin_dir), "HOME": os.environ.get("HOME", "/tmp"), "OUT": str(out)}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path
    )


@pytest.mark.parametrize(
    "nvidia_smi",
    [
        None,  # no driver installed
        "echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'; exit 9",
        "exit 0",  # a driver, no GPU listed
    ],
    ids=["no-nvidia-smi", "no-driver", "no-gpu-listed"],
)
def test_refuses_without_a_gpu(tmp_path, nvidia_smi):
    r = _run(tmp_path, nvidia_smi)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(".ci/gpu: no NVIDIA GPU here"), r.stderr
    assert "--rehearse" in lines[0]
    assert r.stdout == ""
    assert not (tmp_path / "out").exists()  # nothing written


def test_unknown_argument_is_refused(tmp_path):
    r = _run(tmp_path, None, "--bogus")
    assert r.returncode == 2
    assert r.stderr.strip() == ".ci/gpu: unknown argument '--bogus' (use --rehearse or nothing)"


def test_script_is_executable_and_parses():
    assert os.access(SCRIPT, os.X_OK)
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)
