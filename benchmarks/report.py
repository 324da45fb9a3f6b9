"""Reports of a benchmark run: markdown tables, JSON with the machine, PNG plots."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

from .harness import Result


def _qpeft_ms(results: list[Result], group: str, label: str) -> float | None:
    """The fastest qpeft implementation of a case: the ratio column's denominator."""
    times = [
        r.timing.median_ms
        for r in results
        if r.group == group and r.label == label and r.impl.startswith("qpeft") and r.timing
    ]
    return min(times) if times else None


def rate(r: Result) -> tuple[str, float | None]:
    """("GB/s", value) for memory-bound cases, ("GFLOP/s", value) for compute-bound ones."""
    if r.timing is None or r.bound is None:
        return "", None
    seconds = r.timing.median_ms * 1e-3
    if r.bound == "memory":
        return "GB/s", r.nbytes / seconds / 1e9
    return "GFLOP/s", r.flops / seconds / 1e9


def markdown(results: list[Result], limits: dict) -> str:
    """One table per group: median time, the ratio to the fastest qpeft implementation of
    the case (2.00x = twice as slow), the achieved rate and its fraction of the limit
    measured in the same run, and peak memory."""
    out = []
    groups = list(dict.fromkeys(r.group for r in results))
    for group in groups:
        rows = [r for r in results if r.group == group]
        out += [
            f"### {group}",
            "",
            "| case | implementation | median ms | IQR ms | time / qpeft | rate | of limit | peak MB |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in rows:
            if r.timing is None:
                out.append(f"| {r.label} | {r.impl} | not timed: {r.error} | | | | | |")
                continue
            base = _qpeft_ms(results, r.group, r.label)
            ratio = f"{r.timing.median_ms / base:.2f}x" if base else "-"
            unit, value = rate(r)
            limit = limits["copy_gbs"] if unit == "GB/s" else limits.get("gemm_gflops")
            rate_s = f"{value:.1f} {unit}" if value is not None else "-"
            frac = f"{100 * value / limit:.0f}%" if value is not None and limit else "-"
            peak = f"{r.peak_mb:.0f}" if r.peak_mb is not None else "-"
            out.append(
                f"| {r.label} | {r.impl} | {r.timing.median_ms:.3f} | {r.timing.iqr_ms:.3f} | {ratio} "
                f"| {rate_s} | {frac} | {peak} |"
            )
        out.append("")
    return "\n".join(out)


def _isa(info: dict) -> str:
    """The ISA features and qpeft's CPU compute choice, where the run recorded them."""
    if not info.get("cpu_isa"):
        return ""
    bf16 = info.get("qpeft_cpu_bf16")
    mode = "" if bf16 is None else f"; qpeft computes bf16 x in {'bf16' if bf16 else 'fp32'}"
    return f" (ISA: {' '.join(info['cpu_isa'])}{mode})"


def header(info: dict, limits: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    dev = info["gpu"] if info["device"] == "cuda" else f"{info['cpu']}, {info['cores']} cores"
    return (
        f"Device: {info['device']} ({dev}), torch threads {info['torch_threads']}, "
        f"CPU capability {info['torch_cpu_capability']}{_isa(info)}. Versions: {versions}.\n\n"
        f"Limits measured in this run: memory copy {limits['copy_gbs']:.1f} GB/s (read + write), "
        f"{_gemm_limit(limits)}."
    )


def _gemm_limit(limits: dict) -> str:
    """The compute limit's sentence; runs written before the bf16 rate was measured have fp32 only."""
    fp32, bf16 = limits.get("gemm_gflops_fp32"), limits.get("gemm_gflops_bf16")
    if fp32 is None or bf16 is None:
        return f"dense fp32 GEMM {limits['gemm_gflops']:.1f} GFLOP/s (torch.mm 2048^3)"
    return (
        f"dense GEMM (torch.mm 2048^3) fp32 {fp32:.1f} GFLOP/s, bf16 {bf16:.1f} GFLOP/s; "
        f"compute-bound rows are a fraction of the faster, {limits['gemm_gflops']:.1f} GFLOP/s"
    )


def plots(results: list[Result], out_dir: Path, prefix: str) -> list[Path]:
    """One PNG per group with a numeric x (M or size): median time, one line per implementation."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    by_group: dict[str, list[Result]] = defaultdict(list)
    for r in results:
        if r.x is not None and r.timing is not None:
            by_group[r.group].append(r)
    for group, rows in by_group.items():
        if len({r.x for r in rows}) < 2:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for impl in dict.fromkeys(r.impl for r in rows):
            pts = sorted((r.x, r.timing.median_ms) for r in rows if r.impl == impl)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(rows[0].x_name or "size")
        ax.set_ylabel("median time (ms)")
        ax.set_title(group)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{prefix}_{group.replace(' ', '_').replace('/', '-')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write(
    results: list[Result], info: dict, limits: dict, out_dir: Path, name: str, notes: str = ""
) -> tuple[str, list[Path]]:
    """Writes ``name``.md, ``name``.json and the plots into ``out_dir``; returns the markdown
    and the paths written, so that the caller can say where they went."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = f"# {name}\n\n{header(info, limits)}\n\n{markdown(results, limits)}" + (
        f"\n{notes}\n" if notes else ""
    )
    pngs = plots(results, out_dir, name)
    if pngs:
        text += "\nPlots: " + ", ".join(f"[{p.stem}]({p.name})" for p in pngs) + "\n"
    (out_dir / f"{name}.md").write_text(text)
    payload = {"machine": info, "limits": limits, "results": [asdict(r) for r in results]}
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    return text, [out_dir / f"{name}.md", out_dir / f"{name}.json", *pngs]
