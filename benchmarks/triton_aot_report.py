"""Static evidence for the Triton kernels: compile every AOT config for sm_80 and sm_90
without a GPU and report registers, stack, local (spill) and shared memory per config.

    python -m benchmarks.triton_aot_report [--arch 80 90] [--modules quant qlora]
        [--smoke] [--jobs 2] [--out benchmarks/results] [--json PATH|-] [--only REGEX]

Configs come from ``AOT_CONFIGS`` of each module in ``qpeft.triton_kernels`` (format:
triton_kernels/__init__.py). Each is built with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))``; with no device, the metadata's n_regs/n_spills
stay unset, so the figures are read from the cubin with the ``cuobjdump
--dump-resource-usage`` shipped in Triton's wheel (the machine's own ptxas 13.0 rejects
Triton 3.9's PTX, so Triton's bundled ptxas and tools are used throughout). The "fma"
and "ftz" columns count ``fma.*.f32`` and ``.ftz`` instructions in the PTX: the
quantization kernels promise neither (each fp32 step rounds alone, subnormals kept).

--smoke compiles the first and last config of each kernel function (tests/test_triton_aot.py).
Writes ``<out>/triton_aot.md`` and ``.json`` (not with --smoke) and prints the table.
Must run in a process where TRITON_INTERPRET is not 1 (the interpreter replaces
@triton.jit functions); the script clears it before importing triton.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") == "1":
    raise RuntimeError("triton was imported in interpreter mode: run this report in a fresh process")
os.environ.pop("TRITON_INTERPRET", None)

MODULES = ("quant", "qlora")
_RESOURCE = re.compile(r"Function ([\w$]+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _configs(module: str) -> list[dict]:
    mod = importlib.import_module(f"qpeft.triton_kernels.{module}")
    return list(getattr(mod, "AOT_CONFIGS", []))


def _cuobjdump() -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: this Triton wheel ships no cuobjdump")
    return str(path)


def compile_one(module: str, index: int, arch: int) -> dict:
    """Compile AOT_CONFIGS[index] of ``module`` for sm_<arch>; return its resource row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cfg = _configs(module)[index]
    options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"], **cfg.get("options", {})}
    start = time.perf_counter()
    src = ASTSource(
        fn=cfg["fn"], signature=cfg["signature"], constexprs=cfg["constexprs"], attrs=cfg.get("attrs")
    )
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        dump = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
    found = _RESOURCE.findall(dump)
    if len(found) != 1:
        raise RuntimeError(
            f"{cfg['name']} sm_{arch}: expected one function in the cubin, cuobjdump says:\n{dump}"
        )
    _, reg, stack, shared, local = (int(v) if v.isdigit() else v for v in found[0])
    ptx = compiled.asm["ptx"]
    return {
        "module": module,
        "name": cfg["name"],
        "kernel": cfg["fn"].__name__,
        "arch": f"sm_{arch}",
        "num_warps": cfg["num_warps"],
        "num_stages": cfg["num_stages"],
        "constexprs": {k: v for k, v in cfg["constexprs"].items()},
        "default": bool(cfg.get("default", True)),
        "regs": reg,
        "stack_bytes": stack,
        "local_bytes": local,
        "shared_static_bytes": shared,
        "shared_launch_bytes": int(compiled.metadata.shared),  # dynamic shared memory the launch requests
        "ptx_fma_f32": len(re.findall(r"\bfma\.[a-z.]*f32\b", ptx)),
        "ptx_ftz": len(re.findall(r"\.ftz\b", ptx)),
        "compile_s": round(seconds, 2),
    }


def _jobs(modules, archs, smoke: bool, only: str | None = None) -> list[tuple[str, int, int]]:
    jobs = []
    for module in modules:
        by_kernel: dict[str, list[int]] = {}
        for i, cfg in enumerate(_configs(module)):
            if only is None or re.search(only, cfg["name"]):
                by_kernel.setdefault(cfg["fn"].__name__, []).append(i)
        for indices in by_kernel.values():
            chosen = sorted({indices[0], indices[-1]}) if smoke else indices
            configs = _configs(module)
            # an entry with "archs" is one arch's default config: compiled for that arch only
            jobs += [
                (module, i, arch) for i in chosen for arch in archs if arch in configs[i].get("archs", archs)
            ]
    return jobs


def run(modules=MODULES, archs=(80, 90), smoke=False, jobs=2, only: str | None = None) -> dict:
    """``only``: a regular expression; only the configs whose name it matches (re.search)."""
    import triton

    available, skipped = [], {}
    for module in modules:
        try:
            configs = _configs(module)
        except ImportError as exc:  # a kernel module not written yet: say so in the report
            skipped[module] = f"import failed: {exc}"
            continue
        if not configs:
            skipped[module] = "exports no AOT_CONFIGS"
            continue
        available.append(module)
    work = _jobs(available, archs, smoke, only)
    start = time.perf_counter()
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            rows = list(pool.map(compile_one, *zip(*work))) if work else []
    else:
        rows = [compile_one(*job) for job in work]
    return {
        "triton": triton.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, no GPU (AOT compile only)",
        "archs": [f"sm_{a}" for a in archs],
        "smoke": smoke,
        "skipped_modules": skipped,
        "wall_s": round(time.perf_counter() - start, 1),
        "rows": rows,
    }


def markdown(report: dict) -> str:
    lines = [
        "# Triton kernels: ahead-of-time resource usage",
        "",
        f"Triton {report['triton']}, compiled for {', '.join(report['archs'])} with no GPU "
        "(`triton.compile` + explicit `GPUTarget`); REG/STACK/LOCAL/SHARED from the cubin via the "
        "`cuobjdump --dump-resource-usage` in Triton's wheel. Static evidence only: no timing was measured.",
        "",
        "- REG: registers per thread; STACK/LOCAL: bytes per thread (nonzero LOCAL = spills or local arrays).",
        "- SHARED static: from the cubin; SHARED launch: the dynamic shared memory the launch requests "
        "(Triton's reduction/layout-conversion scratch).",
        "- fma / ftz: `fma.*.f32` and `.ftz` instructions in the PTX (the quantization kernels must show 0 and 0).",
        "",
    ]
    for module, why in report["skipped_modules"].items():
        lines.append(f"- module `{module}` not reported: {why}")
    lines += [
        "",
        "| config | kernel | arch | warps | stages | REG | STACK | LOCAL | SHARED static | SHARED launch | fma | ftz |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["rows"]:
        flag = "" if r["default"] else " (non-default)"
        lines.append(
            f"| {r['name']}{flag} | {r['kernel']} | {r['arch']} | {r['num_warps']} | {r['num_stages']} | {r['regs']} "
            f"| {r['stack_bytes']} | {r['local_bytes']} | {r['shared_static_bytes']} | {r['shared_launch_bytes']} "
            f"| {r['ptx_fma_f32']} | {r['ptx_ftz']} |"
        )
    spilling = [r for r in report["rows"] if r["local_bytes"] or r["stack_bytes"]]
    lines += [
        "",
        f"{len(report['rows'])} compilations in {report['wall_s']} s; "
        + (
            f"{len(spilling)} with local memory or stack: "
            + ", ".join(f"{r['name']} {r['arch']}" for r in spilling)
            if spilling
            else "none uses local memory or stack (no spills)."
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--modules", nargs="+", default=list(MODULES))
    parser.add_argument("--smoke", action="store_true", help="the first and last config of each kernel only")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument(
        "--json", help="also write the JSON report here ('-' for stdout, table then on stderr)"
    )
    parser.add_argument(
        "--only",
        metavar="REGEX",
        help="compile only the configs whose name matches and merge them into OUT/triton_aot.json: "
        "rows of the same name and arch are replaced, matching rows with no new one dropped",
    )
    args = parser.parse_args(argv)
    report = run(args.modules, tuple(args.arch), args.smoke, args.jobs, args.only)
    if args.only and not args.smoke:
        old = json.loads((args.out / "triton_aot.json").read_text())
        fresh = {(r["name"], r["arch"]): r for r in report["rows"]}
        rows = []
        for r in old["rows"]:
            key = (r["name"], r["arch"])
            if key in fresh:
                rows.append(fresh.pop(key))
            elif not re.search(args.only, r["name"]):
                rows.append(r)
        report = dict(old, rows=rows + list(fresh.values()), triton=report["triton"])
    table = markdown(report)
    print(table, file=sys.stderr if args.json == "-" else sys.stdout)
    if not args.smoke:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "triton_aot.md").write_text(table)
        (args.out / "triton_aot.json").write_text(json.dumps(report, indent=1) + "\n")
    if args.json == "-":
        print(json.dumps(report))
    elif args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
