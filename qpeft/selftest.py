"""python -m qpeft selftest: every op of every backend on one device, against the reference.

For each backend that can run on the device (``qpeft.available_backends()``, the kernel
tables of qpeft._dispatch) and each op in its table: a grid of shapes (odd sizes, partial
blocks, 1 to 4096 rows; --quick: fewer; --tiny: one or two small shapes per op, for
the .ci/gpu rehearsal on CPU), fp32/fp16/bf16, LoRA ranks 8 to 64, checked
against the pure-torch reference ("default") with the bounds the tests use
(qpeft/testing.py): bit for bit for 4-bit (NF4/FP4, with and without double quantization)
and 8-bit blockwise quantization and dequantization and the optimizer step ops; the
derived summation bound for gemv_4bit; the fp64 oracle's bounds for qlora_linear forward and
backward; the optimizer classes' bounds for a few paged optimizer steps (32-bit and 8-bit
state). Prints one table row per op, backend and dtype (worst error against its bound,
time) and exits 1 on any mismatch or error, naming the op.
"""

# ruff: noqa: B023
# (B023: each case's closure is called at once, inside Runner.guarded, never after its loop
# variables move on.)
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import _dispatch, optim, testing
from . import functional as qf
from ._formats import dynamic_map
from ._optim_math import state_blocks

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
QUANT_TYPES = ("nf4", "fp4")
# Backends never run without a request: the emulator runs each CUDA thread as a fiber, so it
# gets the small shapes only (numel cap), like its tests.
EMULATED_MAX_NUMEL = 1 << 14


@dataclass
class Row:
    """One line of the table: the worst result of one op, backend and dtype over its grid."""

    op: str
    backend: str
    dtype: str
    cases: int = 0
    shapes: set = field(default_factory=set)
    err: float = 0.0  # the worst case's max |error| ...
    bound: float = 0.0  # ... and the bound at that element
    ratio: float = 0.0  # max |error| / bound over all elements (0/0 = 0)
    seconds: float = 0.0  # the backend's time over the grid (reference excluded)
    failures: list[str] = field(default_factory=list)

    def add(self, shape: str, err: float, bound: float, ratio: float, what: str) -> None:
        self.cases += 1
        self.shapes.add(shape)
        if ratio > self.ratio or self.cases == 1:
            self.err, self.bound, self.ratio = err, bound, ratio
        if not ratio <= 1.0:
            self.failures.append(f"{what}: max |error| {err:.3e} > bound {bound:.3e}")

    @property
    def ok(self) -> bool:
        return not self.failures


def _compare(got: torch.Tensor, want: torch.Tensor, tol: torch.Tensor | float) -> tuple[float, float, float]:
    """(max |got - want|, the bound there, worst |err| / bound); NaN anywhere in got where want
    is finite is an infinite error. tol 0: bit for bit (a -0.0 for 0.0 counts as a mismatch)."""
    if got.shape != want.shape:
        return math.inf, 0.0, math.inf
    if isinstance(tol, (int, float)) and tol == 0:
        if got.dtype != want.dtype:
            return math.inf, 0.0, math.inf
        g, w = got.contiguous().reshape(-1), want.contiguous().reshape(-1)
        view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[g.element_size()]
        differ = g.view(view) != w.view(view)
        if not bool(differ.any()):
            return 0.0, 0.0, 0.0
        err = (g[differ].double() - w[differ].double()).abs()
        err = torch.where(torch.isnan(err), math.inf, err)
        return max(float(err.max()), 2.0**-149), 0.0, math.inf  # a -0.0 vs 0.0 still fails
    err = (got.double() - want.double()).abs()
    tol = torch.as_tensor(tol, dtype=torch.float64, device=err.device).expand_as(err)
    err = torch.where(torch.isnan(err), math.inf, err)
    ratio = torch.where(err == 0, 0.0, err / tol)  # tol 0 with err > 0: inf
    i = int(ratio.reshape(-1).argmax()) if ratio.numel() else 0
    if not ratio.numel():
        return 0.0, 0.0, 0.0
    return float(err.reshape(-1)[i]), float(tol.reshape(-1)[i]), float(ratio.reshape(-1)[i])


class Runner:
    def __init__(self, device: torch.device, backends: list[str], grid: str = "full") -> None:
        """grid: "full", "quick" (fewer shapes) or "tiny" (the first shape or two of each op)."""
        self.device, self.backends, self.grid = device, backends, grid
        self.quick = grid != "full"
        self.tiny = grid == "tiny"
        self.rows: dict[tuple[str, str, str], Row] = {}
        self.errors: list[str] = []

    def row(self, op: str, backend: str, dtype: str) -> Row:
        return self.rows.setdefault((op, backend, dtype), Row(op, backend, dtype))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, backend: str, fn: Callable):
        self._sync()
        t0 = time.perf_counter()
        with _dispatch.use_backend(backend):
            result = fn()
        self._sync()
        return result, time.perf_counter() - t0

    def guarded(self, op: str, backend: str, dtype: str, what: str, fn: Callable[[], None]) -> None:
        """Run one case; an exception is a failure of the op, reported with the case."""
        try:
            fn()
        except Exception as exc:  # a kernel that raises is a failed check, not a crash of the run
            msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            row = self.row(op, backend, dtype)
            row.cases += 1
            row.ratio = math.inf
            row.failures.append(f"{what}: raised {msg}")

    def has(self, backend: str, *ops: str) -> bool:
        table = _dispatch.kernels_of(backend)
        return all(op in table for op in ops)

    def small(self, backend: str, numel: int) -> bool:
        return backend != "cuda_emulated" or numel <= EMULATED_MAX_NUMEL

    # --- 4-bit quantization -------------------------------------------------------------------

    def quant_4bit(self) -> None:
        shapes = [((1, 1), 64), ((3, 5), 32), ((37, 83), 128), ((64, 64), 256), ((257, 255), 4096)]
        if not self.quick:
            shapes += [((7, 33), 64), ((1, 4096), 64), ((4096, 256), 64), ((1000, 1000), 128)]
        if self.tiny:
            shapes = [((3, 5), 32), ((37, 83), 128)]
        for (m, k), bs in shapes:
            for dname, dt in DTYPES.items():
                for qt in QUANT_TYPES:
                    for dq in (False, True):
                        g = torch.Generator().manual_seed(m * 7919 + k)
                        x = torch.randn(m, k, generator=g).to(dt).to(self.device)
                        self._case_4bit(x, bs, qt, dq, dname)

    def _case_4bit(self, x, bs, qt, dq, dname) -> None:
        shape = "x".join(map(str, x.shape))
        what = f"{shape} {dname} {qt}{' dq' if dq else ''} bs{bs}"
        with _dispatch.use_backend("default"):
            p_ref, s_ref = qf.quantize_4bit(x, bs, qt, dq)
            deq_ref = {n: qf.dequantize_4bit(p_ref, s_ref, out_dtype=t) for n, t in DTYPES.items()}
        for b in self.backends:
            if not self.small(b, x.numel()):
                continue
            if self.has(b, "quantize_4bit"):

                def quantize(b=b):
                    (packed, state), sec = self.timed(b, lambda: qf.quantize_4bit(x, bs, qt, dq))
                    pairs = [(packed, p_ref), (state.absmax, s_ref.absmax)]
                    if dq:
                        pairs += [(state.offset, s_ref.offset), (state.state2.absmax, s_ref.state2.absmax)]
                    self._exact("quantize_4bit", b, dname, shape, what, pairs, sec)

                self.guarded("quantize_4bit", b, dname, what, quantize)
            op = "dequantize_4bit_nested" if dq else "dequantize_4bit"
            if self.has(b, op):

                def dequantize(b=b, op=op):
                    for n, t in DTYPES.items():
                        out, sec = self.timed(b, lambda t=t: qf.dequantize_4bit(p_ref, s_ref, out_dtype=t))
                        self._exact(op, b, dname, shape, f"{what} -> {n}", [(out, deq_ref[n])], sec)

                self.guarded(op, b, dname, what, dequantize)

    def _exact(self, op, backend, dname, shape, what, pairs, seconds) -> None:
        row = self.row(op, backend, dname)
        row.seconds += seconds
        worst = (0.0, 0.0, 0.0)
        for got, want in pairs:
            r = _compare(got, want, 0)
            if r[2] > worst[2]:
                worst = r
        row.add(shape, *worst, what)

    # --- 8-bit blockwise ----------------------------------------------------------------------

    def quant_8bit(self) -> None:
        shapes = [((1, 1), 64), ((3, 5), 32), ((37, 83), 256), ((64, 64), 4096), ((257, 255), 2048)]
        if not self.quick:
            shapes += [((1, 4096), 256), ((4096, 256), 4096), ((1000, 1000), 256)]
        if self.tiny:
            shapes = [((3, 5), 32), ((37, 83), 256)]
        code = dynamic_map(True, self.device)
        for (m, k), bs in shapes:
            for dname, dt in DTYPES.items():
                g = torch.Generator().manual_seed(m * 31 + k)
                x = torch.randn(m, k, generator=g).to(dt).to(self.device)
                shape, what = f"{m}x{k}", f"{m}x{k} {dname} bs{bs}"
                with _dispatch.use_backend("default"):
                    q_ref, s_ref = qf.quantize_blockwise(x, bs, code)
                    deq_ref = {n: qf.dequantize_blockwise(q_ref, s_ref, t) for n, t in DTYPES.items()}
                for b in self.backends:
                    if not self.small(b, x.numel()):
                        continue
                    if self.has(b, "quantize_blockwise"):

                        def quantize(b=b, x=x, bs=bs, q_ref=q_ref, s_ref=s_ref, shape=shape, what=what):
                            (q, s), sec = self.timed(b, lambda: qf.quantize_blockwise(x, bs, code))
                            pairs = [(q, q_ref), (s.absmax, s_ref.absmax)]
                            self._exact("quantize_blockwise", b, dname, shape, what, pairs, sec)

                        self.guarded("quantize_blockwise", b, dname, what, quantize)
                    if self.has(b, "dequantize_blockwise"):

                        def dequantize(
                            b=b, q_ref=q_ref, s_ref=s_ref, deq_ref=deq_ref, shape=shape, what=what
                        ):
                            for n, t in DTYPES.items():
                                out, sec = self.timed(b, lambda t=t: qf.dequantize_blockwise(q_ref, s_ref, t))
                                self._exact(
                                    "dequantize_blockwise",
                                    b,
                                    dname,
                                    shape,
                                    f"{what} -> {n}",
                                    [(out, deq_ref[n])],
                                    sec,
                                )

                        self.guarded("dequantize_blockwise", b, dname, what, dequantize)

    # --- gemv_4bit ----------------------------------------------------------------------------

    def gemv(self) -> None:
        nk = [(1, 1), (45, 83), (33, 100), (256, 1024)]
        if not self.quick:
            nk += [(17, 4096), (1024, 4096)]
        rows = (1, 3, 8) if not self.quick else (1, 8)
        if self.tiny:
            nk, rows = [(45, 83)], (1, 8)
        i = 0
        for n, k in nk:
            for m in rows:
                for dname, dt in DTYPES.items():
                    i += 1
                    qt, dq, bs = QUANT_TYPES[i % 2], bool(i % 3), (32, 64, 128, 4096)[i % 4]
                    g = torch.Generator().manual_seed(i)
                    w = torch.randn(n, k, generator=g).to(self.device)
                    x = torch.randn(m, k, generator=g).to(dt).to(self.device)
                    what = f"{m}x{n}x{k} {dname} {qt}{' dq' if dq else ''} bs{bs}"
                    with _dispatch.use_backend("default"):
                        packed, state = qf.quantize_4bit(w, bs, qt, dq)
                        w_deq = qf.dequantize_4bit(packed, state, torch.float32)
                        y_ref = qf.gemv_4bit(x, packed, state)
                    for b in self.backends:
                        if not self.has(b, "gemv_4bit") or not self.small(b, n * k):
                            continue

                        def check(b=b, x=x, packed=packed, state=state, w_deq=w_deq, y_ref=y_ref, what=what):
                            y, sec = self.timed(b, lambda: qf.gemv_4bit(x, packed, state))
                            # both within their bounds of the exact product (tests/test_backends.py)
                            tol = testing.gemv_tolerance(b, x, w_deq, dt, bs)
                            tol = tol + testing.gemv_tolerance("default", x, w_deq, dt, bs)
                            row = self.row("gemv_4bit", b, dname)
                            row.seconds += sec
                            row.add(f"{m}x{n}x{k}", *_compare(y, y_ref, tol), what)

                        self.guarded("gemv_4bit", b, dname, what, check)

    # --- qlora_linear forward and backward ------------------------------------------------------

    def qlora(self) -> None:
        # (M, N, K, r, quant_type, double_quant, blocksize, bias, rank_scale, out_scale)
        cases = [
            (1, 45, 83, 8, "fp4", False, 64, False, False, False),
            (37, 45, 83, 64, "nf4", True, 64, True, True, True),
            (20, 50, 192, 16, "nf4", True, 256, True, False, True),
        ]
        if not self.quick:
            cases += [
                (4, 33, 100, 8, "fp4", True, 32, False, True, False),
                (256, 96, 256, 32, "nf4", False, 128, True, True, False),
                (4096, 64, 256, 8, "nf4", True, 64, True, False, True),
            ]
        if self.tiny:
            cases = cases[:2]
        ops = ("qlora_linear", "qlora_linear_backward")
        for dname, dt in DTYPES.items():
            for case in cases:
                m, n, k, r = case[:4]
                p = testing.make_problem((dt, *case), seed=m + n + k, device=self.device)
                what = f"{m}x{n}x{k} r{r} {dname} {case[4]}{' dq' if case[5] else ''} bs{case[6]}"
                for b in self.backends:
                    if not self.has(b, *ops):
                        continue

                    def check(b=b, p=p, what=what, shape=f"{m}x{n}x{k} r{r}"):
                        results, sec = self.timed(b, lambda: testing.qlora_linear_results(p, b))
                        row = self.row("qlora_linear+backward", b, dname)
                        row.seconds += sec
                        worst = (0.0, 0.0, 0.0, "")
                        for name, got, want, tol in results:
                            e = _compare(got, want, tol)
                            if e[2] >= worst[2]:
                                worst = (*e, name)
                        row.add(shape, *worst[:3], f"{what} ({worst[3]}, against the fp64 oracle)")

                    self.guarded("qlora_linear+backward", b, dname, what, check)

    # --- optimizer steps ------------------------------------------------------------------------

    def optim_ops(self) -> None:
        sizes = [1, 257, 5000] if self.quick else [1, 7, 257, 4096, 5000, 70001]
        if self.tiny:
            sizes = [1, 257]
        signed, unsigned = dynamic_map(True, self.device), dynamic_map(False, self.device)
        zero = int((signed == 0).nonzero()[0, 0])
        ops = ("adamw32", "adamw8bit", "lion32", "lion8bit")

        def new_state(op, n):
            dev = self.device
            if op == "adamw32":
                return [torch.zeros(n, device=dev), torch.zeros(n, device=dev)]
            if op == "lion32":
                return [torch.zeros(n, device=dev)]
            nb = state_blocks(n)
            q1 = torch.full((n,), zero, dtype=torch.uint8, device=dev)
            if op == "lion8bit":
                return [q1, torch.zeros(nb, device=dev)]
            return [
                q1,
                torch.zeros(nb, device=dev),
                torch.zeros(n, dtype=torch.uint8, device=dev),
                torch.zeros(nb, device=dev),
            ]

        def step(op, p, g, state, i):
            q = torch.ops.qpeft
            if op == "adamw32":
                q.adamw32_step_(p, g, *state, 1e-2, 0.9, 0.999, 1e-8, 0.1, i)
            elif op == "adamw8bit":
                q.adamw8bit_step_(p, g, *state, signed, unsigned, 1e-2, 0.9, 0.999, 1e-8, 0.1, i)
            elif op == "lion32":
                q.lion32_step_(p, g, *state, 1e-2, 0.9, 0.99, 0.1)
            else:
                q.lion8bit_step_(p, g, *state, signed, 1e-2, 0.9, 0.99, 0.1)

        def multi(op, ps, gs, states, i):
            q = torch.ops.qpeft
            cols = [list(c) for c in zip(*states)]
            if op == "adamw32":
                q.adamw32_multi_step_(ps, gs, *cols, 1e-2, 0.9, 0.999, 1e-8, 0.1, [i] * len(ps))
            elif op == "adamw8bit":
                q.adamw8bit_multi_step_(
                    ps, gs, *cols, signed, unsigned, 1e-2, 0.9, 0.999, 1e-8, 0.1, [i] * len(ps)
                )
            elif op == "lion32":
                q.lion32_multi_step_(ps, gs, *cols, 1e-2, 0.9, 0.99, 0.1)
            else:
                q.lion8bit_multi_step_(ps, gs, *cols, signed, 1e-2, 0.9, 0.99, 0.1)

        for dname, dt in DTYPES.items():
            for op in ops:
                for n in sizes:
                    g = torch.Generator().manual_seed(n)
                    p0 = torch.randn(n, generator=g).to(dt).to(self.device)
                    grads = [torch.randn(n, generator=g).to(dt).to(self.device) for _ in range(3)]

                    def run(backend, op=op, p0=p0, grads=grads):
                        p, state = p0.clone(), new_state(op, p0.numel())
                        with _dispatch.use_backend(backend):
                            for i, gr in enumerate(grads):
                                step(op, p, gr, state, i + 1)
                        return [p, *state]

                    want = run("default")
                    what = f"n={n} {dname} 3 steps"
                    for b in self.backends:
                        if not self.has(b, f"{op}_step_") or not self.small(b, n):
                            continue

                        def check(b=b, op=op, want=want, n=n, what=what, run=run):
                            got, sec = self.timed(b, lambda: run(b))
                            row = self.row(f"{op}_step_", b, dname)
                            row.seconds += sec
                            worst = max(
                                (_compare(a, w, testing.OPTIM_STEP_ATOL) for a, w in zip(got, want)),
                                key=lambda e: e[2],
                            )
                            row.add(f"n={n}", *worst, what)

                        self.guarded(f"{op}_step_", b, dname, what, check)
                # the multi-tensor op: two tensors in one call, each equal to the single-tensor reference
                n1, n2 = sizes[-1], sizes[1]
                g = torch.Generator().manual_seed(7)
                p0s = [torch.randn(n, generator=g).to(dt).to(self.device) for n in (n1, n2)]
                grads = [
                    [torch.randn(p.numel(), generator=g).to(dt).to(self.device) for p in p0s]
                    for _ in range(3)
                ]
                wants = []
                for j, p0 in enumerate(p0s):
                    p, state = p0.clone(), new_state(op, p0.numel())
                    with _dispatch.use_backend("default"):
                        for i, gr in enumerate(grads):
                            step(op, p, gr[j], state, i + 1)
                    wants += [p, *state]
                what = f"n={n1}+{n2} {dname} 3 steps"
                for b in self.backends:
                    name = f"{op}_multi_step_"
                    if not self.has(b, name) or not self.small(b, n1):
                        continue

                    def check_multi(b=b, op=op, p0s=p0s, grads=grads, wants=wants, what=what, name=name):
                        ps = [p.clone() for p in p0s]
                        states = [new_state(op, p.numel()) for p in ps]

                        def go():
                            for i, gr in enumerate(grads):
                                multi(op, ps, gr, states, i + 1)

                        _, sec = self.timed(b, go)
                        got = [t for p, s in zip(ps, states) for t in (p, *s)]
                        row = self.row(name, b, dname)
                        row.seconds += sec
                        worst = max(
                            (_compare(a, w, testing.OPTIM_STEP_ATOL) for a, w in zip(got, wants)),
                            key=lambda e: e[2],
                        )
                        row.add(f"n={n1}+{n2}", *worst, what)

                    self.guarded(name, b, dname, what, check_multi)

    def optimizers(self) -> None:
        """Paged optimizers (all state paged: page_min_numel=0), 3 steps on the device with each
        step backend forced, against the reference optimizer on CPU (tests/test_device_training.py)."""
        classes = {
            "PagedAdamW": (optim.PagedAdamW, {"page_min_numel": 0}, "32bit"),
            "PagedAdamW8bit": (optim.PagedAdamW8bit, {"min_8bit_size": 1, "page_min_numel": 0}, "8bit"),
            "PagedLion": (optim.PagedLion, {"page_min_numel": 0}, "32bit"),
            "PagedLion8bit": (optim.PagedLion8bit, {"min_8bit_size": 1, "page_min_numel": 0}, "8bit"),
        }
        sizes = (5000, 300, 17) if self.quick else (70001, 5000, 300, 17)
        if self.tiny:
            sizes = (300, 17)

        def run(cls, kwargs, device, backend):
            g = torch.Generator().manual_seed(0)
            params = [torch.randn(n, generator=g).to(device).requires_grad_() for n in sizes]
            grads = [[torch.randn(p.shape, generator=g).to(device) for p in params] for _ in range(3)]
            opt = cls(params, lr=1e-2, **kwargs)
            with _dispatch.use_backend(backend):
                for step_grads in grads:
                    for p, gr in zip(params, step_grads):
                        p.grad = gr
                    opt.step()
            return [p.detach() for p in params]

        for name, (cls, kwargs, kind) in classes.items():
            want = run(cls, kwargs, "cpu", "default")
            what = f"{name}, params {'+'.join(map(str, sizes))}, 3 steps"
            for b in self.backends:
                if not self.has(b, "adamw32_step_") or not self.small(b, sizes[0]):
                    continue

                def check(b=b, cls=cls, kwargs=kwargs, kind=kind, want=want, what=what, name=name):
                    got, sec = self.timed(b, lambda: run(cls, kwargs, self.device, b))
                    row = self.row(name, b, "fp32")
                    row.seconds += sec
                    atol, rtol = testing.OPTIM_CLASS_ATOL[kind], testing.OPTIM_CLASS_RTOL
                    worst = max(
                        (_compare(p.cpu(), w, atol + rtol * w.abs()) for p, w in zip(got, want)),
                        key=lambda e: e[2],
                    )
                    row.add("+".join(map(str, sizes)), *worst, what)

                self.guarded(name, b, "fp32", what, check)

    # --- report ---------------------------------------------------------------------------------

    def table(self) -> str:
        head = ("op", "backend", "dtype", "cases", "shapes", "max |err|", "bound", "err/bound", "time ms", "")
        lines = []
        for row in self.rows.values():
            shapes = sorted(row.shapes, key=lambda s: (len(s), s))
            summary = (
                f"{len(shapes)}: {shapes[0]}..{shapes[-1]}"
                if len(shapes) > 1
                else (shapes[0] if shapes else "-")
            )
            bound = "exact" if row.bound == 0 and row.ratio in (0.0, math.inf) else f"{row.bound:.2e}"
            lines.append(
                (
                    row.op,
                    row.backend,
                    row.dtype,
                    str(row.cases),
                    summary,
                    f"{row.err:.2e}",
                    bound,
                    f"{row.ratio:.3f}" if math.isfinite(row.ratio) else "inf",
                    f"{row.seconds * 1e3:.1f}",
                    "ok" if row.ok else "FAIL",
                )
            )
        widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
        fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
        return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)])


class UsageError(Exception):
    """A selftest option that cannot work here; ``python -m qpeft`` prints it on one line, exit 2.
    (Not qpeft.__main__'s class: under ``python -m`` that module runs as ``__main__``, and an
    import of qpeft.__main__ would make a second, different class.)"""


CHECKS = {
    "quant4": Runner.quant_4bit,
    "quant8": Runner.quant_8bit,
    "gemv": Runner.gemv,
    "qlora": Runner.qlora,
    "optim_ops": Runner.optim_ops,
    "optimizers": Runner.optimizers,
}


def backends_on(device: torch.device) -> list[str]:
    """Every backend other than the reference that is available and runs on ``device``."""
    return [
        b
        for b in _dispatch.available_backends()
        if b != "default" and device.type in _dispatch.serves(b) and _dispatch.kernels_of(b)
    ]


def add_arguments(p: argparse.ArgumentParser) -> None:
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer shapes (seconds on CPU)")
    size.add_argument(
        "--tiny", action="store_true", help="one or two small shapes per op (the .ci/gpu --rehearse run)"
    )
    p.add_argument("--checks", default=",".join(CHECKS), help="comma-separated checks to run")
    p.add_argument(
        "--backends",
        default="all",
        help="comma-separated backends to check; all: every one available on the device but the reference",
    )


def run(args: argparse.Namespace) -> int:
    device = args.device
    checks = [c for c in args.checks.split(",") if c]
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise UsageError(f"--checks: unknown {', '.join(unknown)}; known: {', '.join(CHECKS)}")
    if not checks:  # checking nothing must not report "all passed"
        raise UsageError(f"--checks: {args.checks!r} names no check; give one or more of {', '.join(CHECKS)}")
    available = backends_on(device)
    if args.backends not in ("all", ""):
        backends = [b for b in args.backends.split(",") if b]
        missing = [b for b in backends if b not in available]
        if missing:
            raise UsageError(
                f"--backends: {', '.join(missing)} cannot run on {device.type} here "
                f"(available: {', '.join(available) or 'none'})"
            )
    else:
        backends = available
    import qpeft

    grid = "tiny" if getattr(args, "tiny", False) else "quick" if args.quick else "full"
    print(
        f"qpeft {qpeft.__version__} selftest on {device} ({grid} grid): backends "
        f"{', '.join(backends) or 'none'} against the reference 'default'; bounds from qpeft/testing.py"
    )
    if device.type == "cuda":
        print(
            f"  {torch.cuda.get_device_name(device)}, torch {torch.__version__} (CUDA {torch.version.cuda})"
        )
    if not backends:
        print("no backend other than the reference can run here: nothing to check", file=sys.stderr)
        return 1
    runner = Runner(device, backends, grid)
    t0 = time.perf_counter()
    for name in checks:
        t1 = time.perf_counter()
        with torch.no_grad() if name != "qlora" else contextlib.nullcontext():
            CHECKS[name](runner)
        # progress, so that a run stopped by a time limit (.ci/gpu) still says how far it got
        print(f"selftest: {name} done in {time.perf_counter() - t1:.1f} s", file=sys.stderr, flush=True)
    print(runner.table())
    failed = [r for r in runner.rows.values() if not r.ok]
    print(
        f"{len(runner.rows)} rows, {sum(r.cases for r in runner.rows.values())} cases in {time.perf_counter() - t0:.1f} s"
    )
    if failed:
        print(f"FAILED: {len(failed)} of {len(runner.rows)} rows", file=sys.stderr)
        for r in failed:
            for f in r.failures[:3]:
                print(f"  {r.op} [{r.backend}, {r.dtype}] {f}", file=sys.stderr)
        return 1
    print("selftest: all passed")
    return 0
