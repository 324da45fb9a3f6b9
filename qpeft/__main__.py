"""python -m qpeft: the QLoRA demo and the quantization report.

python -m qpeft selftest: every op of every backend available on a device against the
pure-torch reference, with the tests' error bounds (qpeft/selftest.py). python -m qpeft demo: QLoRA fine-tuning of a small Llama-architecture model on text that
ships with qpeft (qpeft/demo.py). python -m qpeft quant-report: NF4 with double
quantization of a 4096x4096 bf16 weight on the fastest backend here, checked bit for bit
against the pure-torch reference, with error and timings.

A bad command line (an unknown device, --device cuda where torch sees no GPU, ...) is
reported on one line of stderr with exit status 2, as argparse does for usage errors.
Docstrings here are plain text: the first paragraph is the --help description.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

import qpeft
import qpeft.functional as qf
from qpeft._formats import BLOCKSIZES_4BIT


def _median_ms(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float(10 * torch.log10(x.pow(2).mean() / (x - y).pow(2).mean()))


def quant_report(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    weight = (torch.randn(args.rows, args.cols, device=device) * 0.02).to(dtype)
    backend = next(
        b
        for b in ("cuda", "cpu", "default")
        if b in qpeft.available_backends() and (b == "default" or (b == "cuda") == (device.type == "cuda"))
    )
    print(
        f"qpeft {qpeft.__version__}: {args.quant_type} blocksize {args.blocksize}, double quant, "
        f"{args.rows}x{args.cols} {args.dtype} on {device} (backend {backend!r}, {torch.get_num_threads()} threads)"
    )

    with qpeft.use_backend(backend):
        packed, state = qf.quantize_4bit(weight, args.blocksize, args.quant_type, double_quant=True)
        restored = qf.dequantize_4bit(packed, state)
    with qpeft.use_backend("default"):
        ref_packed, ref_state = qf.quantize_4bit(weight, args.blocksize, args.quant_type, double_quant=True)
        ref_restored = qf.dequantize_4bit(ref_packed, ref_state)
    same = torch.equal(packed, ref_packed) and torch.equal(restored, ref_restored)

    params = weight.numel()
    stored = packed.numel() + state.absmax.numel() + 4 * state.state2.absmax.numel() + 4
    print(f"  bits per parameter: {8 * stored / params:.3f} ({args.dtype}: {torch.finfo(dtype).bits})")
    err = (restored.float() - weight.float()).abs()
    print(
        f"  mean |error| / mean |w|: {float(err.mean() / weight.float().abs().mean()):.4f}, "
        f"SQNR {_sqnr_db(weight, restored):.2f} dB"
    )
    print(f"  identical to the pure-torch reference: {'yes' if same else 'NO'}")

    rows = []
    for name in dict.fromkeys([backend, "default"]):
        with qpeft.use_backend(name):
            q_ms = _median_ms(lambda: qf.quantize_4bit(weight, args.blocksize, args.quant_type), args.repeat)
            d_ms = _median_ms(lambda: qf.dequantize_4bit(packed, state), args.repeat)
        rows.append((name, q_ms, d_ms))
    base_q, base_d = rows[-1][1], rows[-1][2]
    print(f"  {'backend':<10}{'quantize ms':>14}{'dequantize ms':>16}{'speed-up':>18}")
    for name, q_ms, d_ms in rows:
        print(f"  {name:<10}{q_ms:>14.2f}{d_ms:>16.2f}{f'{base_q / q_ms:.1f}x / {base_d / d_ms:.1f}x':>18}")
    return 0 if same else 1


class UsageError(Exception):
    """A command-line value that cannot work here; main() prints it on one line, exit 2."""


def check_device(value: str) -> torch.device:
    """The torch device a ``--device`` value names, or a UsageError saying why it cannot be
    used here. Shared by every subcommand that takes ``--device``."""
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {value}: unknown device; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            if torch.version.cuda is None and torch.version.hip is None:
                raise UsageError(
                    f"--device {value}: this torch ({torch.__version__}) is a CPU-only build; "
                    "install a CUDA build of torch to use a GPU, or pass --device cpu"
                )
            raise UsageError(f"--device {value}: torch sees no CUDA device here; pass --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(
                f"--device {value}: torch sees {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
            )
    return device


def check_output_dir(value: str) -> str:
    """An ``--out`` directory, created now, before any work is done, so that a long run never
    ends in an error at the moment it saves ('' passes: nothing is saved)."""
    if value and os.path.exists(value) and not os.path.isdir(value):
        raise UsageError(f"--out {value}: exists and is not a directory")
    if value:
        try:
            os.makedirs(value, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--out {value}: cannot create the directory ({exc.strerror or exc})") from None
        try:  # writable for the files to come (a probe file, removed at once)
            with tempfile.TemporaryFile(dir=value, prefix=".qpeft-probe-"):
                pass
        except OSError as exc:
            raise UsageError(f"--out {value}: cannot write files there ({exc.strerror or exc})") from None
    return value


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_device_argument(p: argparse.ArgumentParser) -> None:
    """``--device``, checked by check_device() in main() before the subcommand runs."""
    p.add_argument(
        "--device", default=default_device(), help="cpu, cuda or cuda:N (the GPU when torch sees one)"
    )


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except for flags (an on/off switch's "default: True" reads
    as the opposite of what the flag does)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def _description(doc: str) -> str:
    return doc.split("\n\n")[0].replace("\n", " ")


def build_parser() -> argparse.ArgumentParser:
    from . import demo, selftest

    fmt = _DefaultsFormatter
    parser = argparse.ArgumentParser(prog="python -m qpeft", description=_description(__doc__))
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo",
        help="QLoRA-fine-tune a small causal LM on shipped text (needs transformers)",
        description=_description(demo.__doc__),
        formatter_class=fmt,
    )
    demo.add_arguments(d)
    add_device_argument(d)
    d.set_defaults(func=demo.run)
    t = sub.add_parser(
        "selftest",
        help="check every op of every backend here against the reference (exit 1 on a mismatch)",
        description=_description(selftest.__doc__),
        formatter_class=fmt,
    )
    selftest.add_arguments(t)
    add_device_argument(t)
    t.set_defaults(func=selftest.run)
    p = sub.add_parser(
        "quant-report",
        help="quantize a weight and report error and speed",
        description="Quantize one random weight to NF4 or FP4 with double quantization on the fastest "
        "backend here, check it bit for bit against the pure-torch reference, and report the error and "
        "the median times per backend.",
        formatter_class=fmt,
    )
    p.set_defaults(func=quant_report)
    p.add_argument("--rows", type=demo._at_least(1), default=4096, help="weight rows")
    p.add_argument("--cols", type=demo._at_least(1), default=4096, help="weight columns")
    p.add_argument(
        "--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16", help="weight dtype"
    )
    p.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4", help="4-bit data type")
    p.add_argument(
        "--blocksize", type=int, choices=BLOCKSIZES_4BIT, default=64, help="elements per absmax block"
    )
    add_device_argument(p)
    p.add_argument(
        "--repeat", type=demo._at_least(1), default=5, help="timed runs per measurement (the median is shown)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    from . import demo, selftest

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "device"):
            args.device = check_device(args.device)
        if hasattr(args, "out"):
            args.out = check_output_dir(args.out)
        return args.func(args)
    except (UsageError, selftest.UsageError, demo.UsageError) as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
