"""qpeft's kernel benchmark suite: every op side by side with the installed peers.

    python -m benchmarks [--quick] [--device cpu|cuda] [--ops quant,qlora,...] [--out DIR]

Each case first checks every implementation's result (bit for bit against the
reference where the format is the same, within a stated bound otherwise); a wrong
result or an exception of qpeft or the reference fails the run (exit 1) after the
report is written, so ``--quick`` in CI catches both. A peer that fails its check is
listed as failed, with the reason, and not timed. Then it times the medians (on CPU the
implementations of a case take turns, a quarter second each round, so that a noisy
spell on a shared machine falls on all of them), measures peak memory, and reports time, the ratio to the fastest qpeft implementation, and the achieved rate as
a fraction of the copy bandwidth or GEMM rate measured in the same run, as markdown,
JSON and PNG plots in ``--out`` (default benchmarks/results), and says on stderr where it
wrote them and which optional packages (peers, matplotlib) were missing, so skipped.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
from pathlib import Path

import torch

from . import report, targets
from .cases import MODULES
from .harness import (
    INSTALL_HINT,
    Result,
    copy_bandwidth_gbs,
    gemm_gflops,
    machine,
    missing_optional,
    peak_memory_mb,
    time_cpu_interleaved,
    time_cuda,
)


def run_case(case, device: str, quick: bool) -> tuple[list[Result], list[str]]:
    budget = dict(min_runs=2, min_seconds=0.0) if quick else dict(min_runs=5, min_seconds=1.0)
    results, failures = [], []

    def common(impl):
        return dict(
            group=case.group,
            label=case.label,
            impl=impl.name,
            x=case.x,
            x_name=case.x_name,
            bound=case.bound,
            nbytes=case.nbytes,
            flops=case.flops,
        )

    def failed(impl, exc):
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        if impl.name.startswith("qpeft") or impl.name == "reference":
            failures.append(f"{case.group} | {case.label} | {impl.name}: {msg}")
            traceback.print_exc(file=sys.stderr)
        # a peer that errs or computes a wrong result is a finding about the peer: it is
        # reported in the table (not timed), and does not fail the run
        return Result(timing=None, error=msg, **common(impl))

    checked = []  # every result is checked before anything is timed
    for impl in case.impls:
        try:
            out = impl.run()
            if impl.check is not None:
                impl.check(out)
            del out
            checked.append(impl)
        except Exception as exc:
            results.append(failed(impl, exc))
    budgets = [{**budget, **case.runs.get(impl.name, {})} for impl in checked]
    if device == "cuda":
        timings = []
        for impl, b in zip(checked, budgets):
            try:
                timings.append(time_cuda(impl.run, **b))
            except Exception as exc:
                timings.append(exc)
    else:  # the implementations of a case take turns (see time_cpu_interleaved)
        timings = time_cpu_interleaved([impl.run for impl in checked], budgets)
    for impl, timing in zip(checked, timings):
        try:
            if isinstance(timing, Exception):
                raise timing
            peak = peak_memory_mb(impl.run, device)
        except Exception as exc:
            results.append(failed(impl, exc))
            continue
        results.append(Result(timing=timing, peak_mb=peak, **common(impl)))
        print(f"  {case.group} | {case.label} | {impl.name}: {timing.median_ms:.3f} ms", file=sys.stderr)
    return results, failures


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _unwritable_dir(path: Path) -> str | None:
    """Why results cannot be written into ``path`` (created if missing), or None: checked
    before the run, so that a long run does not end in an error with its results lost."""
    if path.exists() and not path.is_dir():
        return "exists and is not a directory"
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as exc:
        return f"cannot create or write the directory ({exc.strerror or exc})"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every case at tiny sizes, few runs (CI smoke)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--ops",
        nargs="+",
        default=list(MODULES),
        help=f"case modules, space- or comma-separated (quant,matmul): {', '.join(MODULES)}",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument(
        "--threads", type=_at_least_one, default=None, help="torch threads (default: torch's choice)"
    )
    args = parser.parse_args(argv)
    args.ops = [op for item in args.ops for op in item.split(",") if op]
    unknown = [op for op in args.ops if op not in MODULES]
    if unknown or not args.ops:
        parser.error(
            f"--ops: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(MODULES)}"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    problem = _unwritable_dir(args.out)
    if problem:
        parser.error(f"--out {args.out}: {problem}")
    if args.threads:
        torch.set_num_threads(args.threads)  # pinned for the whole run
    missing = missing_optional()
    if missing:  # said once, up front, rather than rows and plots silently absent at the end
        print(
            "not installed, so skipped: "
            + "; ".join(f"{pkg} ({what})" for pkg, what in missing.items())
            + f". {INSTALL_HINT} installs them.",
            file=sys.stderr,
        )

    gemm_size = 256 if args.quick else 2048
    limits = {
        "copy_gbs": copy_bandwidth_gbs(args.device, 16 << 20 if args.quick else 256 << 20),
        "gemm_gflops_fp32": gemm_gflops(args.device, gemm_size, torch.float32),
        "gemm_gflops_bf16": gemm_gflops(args.device, gemm_size, torch.bfloat16),
    }
    # The compute limit is the fastest dense GEMM torch reaches here in either dtype: on a CPU
    # with bf16 units (or a GPU) that is bf16, and an fp32 rate would put bf16 rows above 100%.
    limits["gemm_gflops"] = max(limits["gemm_gflops_fp32"], limits["gemm_gflops_bf16"])
    info = machine(args.device)
    results, failures, sections = [], [], []
    for op in args.ops:
        print(f"== {op}", file=sys.stderr)
        for case in MODULES[op].cases(args.device, args.quick):
            r, f = run_case(case, args.device, args.quick)
            results += r
            failures += f
        # a module may also report what is not a timing (cases/distributed.py: bytes per
        # rank) as a report section, ``notes(device, quick)``; raising fails the run
        extra = getattr(MODULES[op], "notes", None)
        if extra is not None:
            try:
                section = extra(args.device, args.quick)
            except Exception as exc:
                traceback.print_exc(file=sys.stderr)
                failures.append(f"{op} notes: {type(exc).__name__}: {exc}".splitlines()[0][:300])
            else:
                if section:
                    sections.append(section)
    name = f"{args.device}{'_quick' if args.quick else ''}"
    notes = "Every implementation's result was checked before timing (see each case module for the bound)."
    if missing:
        notes += f"\n\nNot installed, so not compared: {', '.join(missing)} ({INSTALL_HINT} installs them)."
    for section in sections:
        notes += "\n\n" + section
    if not args.quick:  # tiny sizes and two runs say nothing about the targets
        notes += "\n\n## Targets\n\n" + targets.evaluate(results, limits)
    text, written = report.write(results, info, limits, args.out, name, notes)
    print(text)
    print(
        f"wrote {len(written)} files to {args.out.resolve()}: {', '.join(p.name for p in written)}",
        file=sys.stderr,
    )
    if failures:
        print("FAILED:\n" + "\n".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
