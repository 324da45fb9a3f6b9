"""The benchmark harness: timing, peak memory, this machine's limits, and what a case is.

Timing is the median of repeated runs after a warm-up: ``time.perf_counter`` on CPU
with torch's thread count pinned for the whole run; CUDA events through
``triton.testing.do_bench`` (which flushes L2 between runs) on a GPU. Each run also
measures the machine's memory-copy bandwidth and dense GEMM rate, so every case is
reported as a fraction of a limit measured in the same run: figures from other runs or
other machines are never mixed in, and devices are never mixed in a ratio.
"""

from __future__ import annotations

import importlib
import os
import platform
import statistics
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata

import torch


@dataclass
class Timing:
    median_ms: float
    iqr_ms: float
    runs: int


@dataclass
class Impl:
    """One implementation of a case: ``run()`` is timed; ``check(run())`` raises
    (AssertionError) when the result is wrong, and is called before any timing."""

    name: str
    run: Callable[[], object]
    check: Callable[[object], None] | None = None


@dataclass
class Case:
    """One op at one size. ``bound`` says which limit the fraction column uses:
    "memory" (``nbytes`` read + written against the copy bandwidth) or "compute"
    (``flops`` against the dense GEMM rate)."""

    group: str  # report section and plot, e.g. "qlora forward"
    label: str  # the size, e.g. "M=512 4096x4096 r=16"
    impls: list[Impl]
    x: float | None = None  # position on the plot's x axis (M, or elements)
    x_name: str | None = None
    bound: str | None = None
    nbytes: int | None = None
    flops: int | None = None
    runs: dict = field(default_factory=dict)  # time_case overrides, e.g. min_runs for slow peers


@dataclass
class Result:
    group: str
    label: str
    impl: str
    timing: Timing | None  # None: the implementation failed (error says why)
    peak_mb: float | None = None
    error: str | None = None
    x: float | None = None
    x_name: str | None = None
    bound: str | None = None
    nbytes: int | None = None
    flops: int | None = None


# --- timing ------------------------------------------------------------------------------


def time_cpu(
    fn: Callable[[], object],
    min_runs: int = 5,
    min_seconds: float = 0.5,
    warmup: int = 1,
    max_runs: int = 200,
) -> Timing:
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
        if len(times) >= max_runs:
            break
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return Timing(statistics.median(times), q[2] - q[0], len(times))


def time_cpu_interleaved(
    fns: list[Callable[[], object]], budgets: list[dict], slice_seconds: float = 0.25, max_runs: int = 200
) -> list[Timing | Exception]:
    """``time_cpu`` for several implementations of one case at once, in rounds: each
    round runs every implementation still short of its budget (``min_runs`` runs and
    ``min_seconds`` in total, as ``time_cpu``) for about ``slice_seconds`` (at least one
    run), the order rotating from round to round. On a shared, noisy machine a slow
    spell then falls on all of them alike instead of on whichever was being timed.
    A slice holds several runs of one implementation, so the median is a warm run's
    (strict alternation made both demo-model training steps ~25 ms slower: each ran
    after the other model had taken over the caches and malloc's free lists).
    An implementation that raises is dropped; its entry is the exception."""
    n = len(fns)
    per_run = [1e-6] * n
    errors: list[Exception | None] = [None] * n
    for i, fn in enumerate(fns):  # warm-up, then a first estimate of each one's time
        try:
            fn()
            t0 = time.perf_counter()
            fn()
            per_run[i] = max(time.perf_counter() - t0, 1e-6)
        except Exception as exc:
            errors[i] = exc
    times: list[list[float]] = [[] for _ in fns]
    spent = [0.0] * n

    def short(i: int) -> bool:
        b, runs = budgets[i], len(times[i])
        if errors[i] is not None or runs >= max_runs:
            return False
        return runs < b.get("min_runs", 5) or spent[i] < b.get("min_seconds", 0.5)

    rnd = 0
    while todo := [i for i in range(n) if short(i)]:
        shift = rnd % len(todo)
        for i in todo[shift:] + todo[:shift]:
            try:
                for _ in range(max(1, min(int(slice_seconds / per_run[i]), max_runs - len(times[i])))):
                    t0 = time.perf_counter()
                    fns[i]()
                    dt = time.perf_counter() - t0
                    times[i].append(dt * 1e3)
                    spent[i] += dt
            except Exception as exc:
                errors[i] = exc
        rnd += 1
    out: list[Timing | Exception] = []
    for ts, err in zip(times, errors):
        if err is not None:
            out.append(err)
            continue
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        out.append(Timing(statistics.median(ts), q[2] - q[0], len(ts)))
    return out


def time_cuda(fn: Callable[[], object], min_runs: int = 5, min_seconds: float = 0.5, **_) -> Timing:
    """CUDA-event timing with L2 flushed between runs (triton.testing.do_bench)."""
    from triton.testing import do_bench

    ms = do_bench(fn, warmup=25, rep=max(int(min_seconds * 1e3), 20), quantiles=[0.25, 0.5, 0.75])
    return Timing(ms[1], ms[2] - ms[0], min_runs)


class PeakRSS:
    """Peak resident-set growth while a block runs, sampled every millisecond from
    /proc/self/statm (CPU: torch has no allocator statistics there). A lower bound of
    the true peak: a spike shorter than the sampling period can be missed."""

    def __init__(self) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.peak_bytes = 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def __enter__(self) -> PeakRSS:
        self._base = self._rss()
        self._stop = threading.Event()
        self._peak = self._base

        def sample() -> None:
            while not self._stop.wait(0.001):
                self._peak = max(self._peak, self._rss())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self._peak, self._rss()) - self._base


def peak_memory_mb(fn: Callable[[], object], device: str) -> float | None:
    """Peak memory one call of ``fn`` adds: torch's max allocated on CUDA, the sampled
    RSS growth on CPU (None where /proc is missing)."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if not os.path.exists("/proc/self/statm"):
        return None
    with PeakRSS() as peak:
        fn()
    return peak.peak_bytes / 2**20


# --- this machine's limits, measured in the same run ----------------------------------


def copy_bandwidth_gbs(device: str = "cpu", nbytes: int = 256 << 20) -> float:
    """Memory copy bandwidth in GB/s counting bytes read + written (torch's copy_)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timer = time_cuda if device == "cuda" else time_cpu
    t = timer(lambda: dst.copy_(src), min_runs=10, min_seconds=1.0)
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9


def gemm_gflops(device: str = "cpu", size: int = 2048, dtype: torch.dtype = torch.float32) -> float:
    """Dense GEMM rate (torch.mm, ``size`` cubed) in GFLOP/s: the compute limit."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    timer = time_cuda if device == "cuda" else time_cpu
    t = timer(lambda: a @ b, min_runs=5, min_seconds=1.0)
    return 2 * size**3 / (t.median_ms * 1e-3) / 1e9


# --- the machine description ----------------------------------------------------------


# The optional packages of a full run (all in qpeft's `bench` extra) and what a run without
# each one lacks. The cases import them if present and leave their rows out otherwise.
OPTIONAL = {
    "matplotlib": "the PNG plots",
    "bitsandbytes": "bitsandbytes and PEFT-over-bitsandbytes rows",
    "torchao": "torchao NF4 rows",
    "peft": "PEFT-over-bitsandbytes rows",
    "transformers": "the demo-model training step",
}
INSTALL_HINT = "pip install -e '.[bench]'"


def missing_optional() -> dict[str, str]:
    """{package: what is skipped} for each package of OPTIONAL that cannot be imported here."""
    missing = {}
    for pkg, what in OPTIONAL.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # peers warn at import about CPU-only builds
                importlib.import_module(pkg)
        except Exception:  # a broken install is skipped by the cases just as a missing one
            missing[pkg] = what
    return missing


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


# ISA features that decide qpeft's CPU kernels and compute dtype (issue 13), as torch's
# cpuinfo reports them
ISA_FEATURES = ("avx2", "fma3", "f16c", "avx512_f", "avx512_bw", "avx512_vl", "avx512_vnni", "avx512_bf16")
ISA_FEATURES += ("amx_tile", "amx_bf16")


def cpu_isa() -> list[str]:
    """The ISA_FEATURES this CPU has (empty where torch cannot say)."""
    try:
        caps = torch.cpu.get_capabilities()
    except Exception:  # an older torch without get_capabilities
        return []
    return [f for f in ISA_FEATURES if caps.get(f)]


def _qpeft_cpu_bf16() -> bool | None:
    """Whether qpeft's CPU QLoRA layer computes bf16 x in bf16 here (auto mode)."""
    try:
        from qpeft.backends.cpu import capability
    except Exception:
        return None
    return capability.bf16_dot_products()


def machine(device: str = "cpu") -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "device": device,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_isa": cpu_isa(),
        "qpeft_cpu_bf16": _qpeft_cpu_bf16(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "python": platform.python_version(),
        "versions": {
            p: _version(p)
            for p in ("qpeft", "torch", "bitsandbytes", "torchao", "peft", "transformers", "triton", "numpy")
        },
    }
