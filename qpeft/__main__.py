"""``python -m qpeft``: the QLoRA demo and the quantization report.

``python -m qpeft demo``: QLoRA fine-tuning of a small Llama-architecture model on text that
ships with qpeft (qpeft/demo.py). ``python -m qpeft quant-report``: NF4 with double
quantization of a 4096x4096 bf16 weight on the fastest backend here, checked bit for bit
against the pure-torch reference, with error and timings.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import qpeft
import qpeft.functional as qf


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
    print(f"  bits per parameter: {8 * stored / params:.3f} (bf16: 16)")
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


def main(argv: list[str] | None = None) -> int:
    from . import demo

    parser = argparse.ArgumentParser(prog="python -m qpeft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="QLoRA-fine-tune a small causal LM on shipped text (needs transformers)")
    demo.add_arguments(d)
    d.set_defaults(func=demo.run)
    p = sub.add_parser("quant-report", help="quantize a weight and report error and speed")
    p.set_defaults(func=quant_report)
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4")
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
