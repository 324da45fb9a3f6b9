"""Optimizer step time on CPU: qpeft's fused C++ steps (fp32 and 8-bit state) vs
torch.optim.AdamW (single-tensor, foreach, fused) vs bitsandbytes' AdamW8bit on CPU.

    python -m benchmarks.bench_optim [--quick] [--out benchmarks/results]

Two parameter sets of the same total size: one large tensor (streaming, the
roofline case) and many LoRA-sized tensors (where per-tensor overhead shows).

Run it twice: as is, and with OMP_WAIT_POLICY=PASSIVE. By default torch's OpenMP
workers spin for milliseconds after every torch op, holding the second core
while qpeft's own thread pool (or anything else) wants it: a qpeft step right
after a torch step runs partly on one core. With PASSIVE they sleep at once.
Implementations are timed round-robin (one step each per round) so that load
from other processes on the shared machine hits all of them alike; the table
gives medians. Before timing, qpeft's steps are checked bit for bit against the
pure-torch reference on the first tensors of the set (``--quick``: all of them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

import qpeft
import qpeft.optim as qo

from .harness import machine

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes as bnb
except ImportError:  # an optional peer
    bnb = None

# Bytes a step must move per fp32 parameter element (read + write), its roofline:
#   fp32 state: read p, g, m, v and write p, m, v = 7 x 4 bytes;
#   8-bit state: read p, g (8) and two codes (2), write p (4) and two codes (2) =
#   16 bytes, plus 2 x 4 bytes of absmax per 256 elements read and written.
BYTES_32 = 28.0
BYTES_8 = 16.0 + 16.0 / 256


def _params(shapes: list[tuple[int, ...]], seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * 1e-2
    return ps


def _implementations() -> dict[str, tuple[Callable, float]]:
    """name -> (optimizer factory, roofline bytes per element)."""
    impls: dict[str, tuple[Callable, float]] = {
        "qpeft AdamW (fp32 state)": (lambda ps: qo.AdamW(ps, lr=1e-3), BYTES_32),
        "qpeft AdamW8bit": (lambda ps: qo.AdamW8bit(ps, lr=1e-3), BYTES_8),
        "torch AdamW foreach=False": (lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False), BYTES_32),
        "torch AdamW foreach=True": (lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True), BYTES_32),
        "torch AdamW fused=True": (lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), BYTES_32),
    }
    if bnb is not None:
        impls["bitsandbytes AdamW8bit (CPU)"] = (lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3), BYTES_8)
    return impls


def check_against_reference(shapes: list[tuple[int, ...]]) -> None:
    """qpeft's native steps equal the reference (backend "default") bit for bit."""
    for cls in (qo.AdamW, qo.AdamW8bit):
        results = []
        for backend in ("default", "cpu"):
            ps = _params(shapes, seed=1)
            opt = cls(ps, lr=1e-3)
            with qpeft.use_backend(backend):
                for _ in range(2):
                    opt.step()
            results.append([p.detach().clone() for p in ps])
        for i, (a, b) in enumerate(zip(*results)):
            if not torch.equal(a.view(torch.int32), b.view(torch.int32)):
                raise AssertionError(f"{cls.__name__}: native step differs from the reference (tensor {i})")


def run_case(shapes: list[tuple[int, ...]], rounds: int) -> dict[str, dict]:
    numel = sum(torch.Size(s).numel() for s in shapes)
    steps: dict[str, Callable] = {}
    bytes_per = {}
    for name, (factory, nbytes) in _implementations().items():
        opt = factory(_params(shapes))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step()  # allocates state; also the warm-up
        except Exception as exc:  # a peer that cannot run here is reported, not hidden
            steps[name] = exc
            continue
        steps[name] = opt.step
        bytes_per[name] = nbytes
    times: dict[str, list[float]] = {name: [] for name, fn in steps.items() if callable(fn)}
    # The copy bandwidth is measured in the same rounds (a 64 MB copy_ each), so the
    # "of copy BW" column compares like with like on a machine others share.
    src = torch.ones(16 << 20)
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy_ms = []
    for _ in range(rounds):
        for name in times:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        dst.copy_(src)
        copy_ms.append((time.perf_counter() - t0) * 1e3)
    out = {"copy_gbs": 2 * src.numel() * 4 / (statistics.median(copy_ms) * 1e-3) / 1e9}
    for name, fn in steps.items():
        if not callable(fn):
            out[name] = {"error": f"{type(fn).__name__}: {fn}"}
            continue
        ms = statistics.median(times[name])
        q = statistics.quantiles(times[name], n=4) if len(times[name]) >= 2 else [ms] * 3
        out[name] = {
            "median_ms": ms,
            "iqr_ms": q[2] - q[0],
            "ms_per_mparam": ms / (numel / 1e6),
            "gbs": bytes_per[name] * numel / (ms * 1e-3) / 1e9,
        }
    return out


def markdown(cases: dict[str, dict[str, dict]]) -> str:
    lines = [
        "| parameters | implementation | median ms / step | IQR ms | ms per 1M params | vs fastest torch | "
        "GB/s (roofline bytes) | of copy BW |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case, res in cases.items():
        copy_gbs = res["copy_gbs"]
        res = {k: v for k, v in res.items() if k != "copy_gbs"}
        torch_best = min(v["median_ms"] for k, v in res.items() if k.startswith("torch") and "median_ms" in v)
        for name, r in res.items():
            if "error" in r:
                lines.append(f"| {case} | {name} | fails: {r['error']} | | | | | |")
                continue
            lines.append(
                f"| {case} | {name} | {r['median_ms']:.2f} | {r['iqr_ms']:.2f} | {r['ms_per_mparam']:.3f} | "
                f"{r['median_ms'] / torch_best:.2f}x | {r['gbs']:.1f} | {100 * r['gbs'] / copy_gbs:.0f}% |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few rounds, full reference check (CI)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)

    if args.quick:
        cases = {"1 x 65536": [(256, 256)], "16 x 4096 + 3 x 1000": [(4096,)] * 16 + [(1000,)] * 3}
        rounds = args.rounds or 5
        check_against_reference([s for shapes in cases.values() for s in shapes])
    else:
        cases = {
            "1 x 4096x4096 (16.8M)": [(4096, 4096)],
            "128 x 4096x32 (16.8M, LoRA-sized)": [(4096, 32)] * 128,
        }
        rounds = args.rounds or 30
        check_against_reference([(4096, 32)] * 2 + [(1000,)])
    results = {case: run_case(shapes, rounds) for case, shapes in cases.items()}
    copy = ", ".join(f"{r['copy_gbs']:.1f}" for r in results.values())

    info = machine()
    header = (
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['versions']['torch']} "
        f"({info['torch_threads']} threads, {info['torch_cpu_capability']}), bitsandbytes "
        f"{info['versions']['bitsandbytes']}. Copy bandwidth (read + write) measured in the same rounds: {copy} GB/s."
    )
    notes = (
        f"fp32 parameters and gradients; lr 1e-3, weight decay 0.01, default betas/eps. Medians of {rounds} "
        "round-robin steps after one warm-up step. GB/s counts the bytes a step must move per element "
        f"({BYTES_32:.0f} for fp32 state, {BYTES_8:.2f} for 8-bit state). qpeft's steps were checked bit for bit "
        "against the pure-torch reference first. 'of copy BW' can pass 100%: copy_ pays a write-allocate read "
        "of its destination that an in-place update (whose written lines were just read) does not."
    )
    name = "optim_cpu_quick" if args.quick else "optim_cpu"
    wait_policy = os.environ.get("OMP_WAIT_POLICY", "")
    if wait_policy:  # torch's OpenMP workers spin (default) or sleep (passive) between torch ops
        name += f"_omp_{wait_policy.lower()}"
        header += f" OMP_WAIT_POLICY={wait_policy}."
    text = f"# {name}\n\n{header}\n\n{markdown(results)}\n\n{notes}\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.md").write_text(text)
    (args.out / f"{name}.json").write_text(
        json.dumps({"machine": info, "rounds": rounds, "cases": results}, indent=2)
    )
    print(text)


if __name__ == "__main__":
    main()
