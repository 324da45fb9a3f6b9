"""The benchmark harness: timing, this machine's limits, and reports.

Timing is the median of repeated runs after a warm-up (``time.perf_counter`` on
CPU, with torch's thread count pinned for the whole run). Each run also measures
the machine's memory-copy bandwidth so memory-bound kernels can be reported as a
fraction of it: figures from other runs or other machines are never mixed in.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import torch


@dataclass
class Timing:
    median_ms: float
    iqr_ms: float
    runs: int


def time_cpu(fn: Callable[[], object], min_runs: int = 5, min_seconds: float = 0.5, warmup: int = 1) -> Timing:
    """Median and interquartile range of ``fn``'s wall time: at least ``min_runs`` runs
    and ``min_seconds`` in total."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 200:
            break
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return Timing(statistics.median(times), q[2] - q[0], len(times))


def copy_bandwidth_gbs(nbytes: int = 256 << 20) -> float:
    """Memory copy bandwidth in GB/s counting bytes read + written (torch's copy_)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = time_cpu(lambda: dst.copy_(src), min_runs=10, min_seconds=1.0)
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("qpeft", "torch", "bitsandbytes", "triton", "numpy")},
    }


@dataclass
class Row:
    case: str
    impl: str
    timing: Timing
    nbytes: int | None = None  # bytes a memory-bound case must move (read + write)
    extra: dict = field(default_factory=dict)

    def gbs(self) -> float | None:
        return None if self.nbytes is None else self.nbytes / (self.timing.median_ms * 1e-3) / 1e9


def markdown(rows: list[Row], copy_gbs: float, baseline: str) -> str:
    """Table: one line per (case, impl): the median, the time relative to ``baseline``
    on the same case (2.00x: twice as slow as the baseline), and achieved GB/s, also
    as a fraction of the copy bandwidth measured in the same run."""
    base = {r.case: r.timing.median_ms for r in rows if r.impl == baseline}
    lines = [
        f"| case | implementation | median ms | IQR ms | time / {baseline} | GB/s | of copy BW |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ratio = r.timing.median_ms / base[r.case] if r.case in base else float("nan")
        gbs = r.gbs()
        bw = f"{gbs:.1f}" if gbs is not None else "-"
        frac = f"{100 * gbs / copy_gbs:.0f}%" if gbs is not None else "-"
        lines.append(
            f"| {r.case} | {r.impl} | {r.timing.median_ms:.2f} | {r.timing.iqr_ms:.2f} | {ratio:.2f}x | {bw} | {frac} |"
        )
    return "\n".join(lines)


def write_report(name: str, rows: list[Row], copy_gbs: float, baseline: str, out_dir: Path, notes: str = "") -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine()
    table = markdown(rows, copy_gbs, baseline)
    header = (
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['versions']['torch']} "
        f"({info['torch_threads']} threads), bitsandbytes {info['versions']['bitsandbytes']}. "
        f"Measured copy bandwidth in this run: {copy_gbs:.1f} GB/s (read + write)."
    )
    text = f"# {name}\n\n{header}\n\n{table}\n" + (f"\n{notes}\n" if notes else "")
    (out_dir / f"{name}.md").write_text(text)
    payload = {
        "machine": info,
        "copy_bandwidth_gbs": copy_gbs,
        "rows": [{**asdict(r), "gbs": r.gbs()} for r in rows],
    }
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2))
    return text
