"""The CPU compute dtype by capability (issue 13): qpeft's ``Linear4bit`` and QLoRA layer in
the dtype ``qpeft/backends/cpu/capability.py`` picks for bf16 x on this CPU, and forced to
fp32 (``QPEFT_CPU_COMPUTE=fp32``) for A/B, against torch bf16 and fp32 ``F.linear`` on the
dequantized weight and against PEFT + bitsandbytes in both compute dtypes.

The machine block of the report records the ISA (``cpu_isa``: what torch's cpuinfo saw)
and whether qpeft's auto mode computes in bf16 here (``qpeft_cpu_bf16``). On a CPU at the
amx level the auto mode runs qpeft's AMX kernel, and the bf16 mode on oneDNN's panels (the
level capped at avx512_bf16) is added for A/B (benchmarks/amx_ab.py: the kernels alone). Checks: as
cases/qlora.py (same packed weight: relative error < 2^-6 of the fp64 product with the
exactly decoded W; the bf16 mode's errors are ~2e-3, tests/_bf16_bounds.py).
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

import qpeft
from qpeft import _native
from qpeft.backends.cpu import amx, capability, dpbf16

from ..harness import Case, Impl
from ..targets import AUTO_MODES
from .peers import optional
from .qlora import SAME_FORMAT_REL, Layer, _rel


@contextlib.contextmanager
def _compute(choice: str | None):
    """QPEFT_CPU_COMPUTE=choice for the call (None: leave it as it is: auto)."""
    if choice is None:
        yield
        return
    old = os.environ.get(capability.COMPUTE_ENV)
    os.environ[capability.COMPUTE_ENV] = choice
    try:
        yield
    finally:
        if old is None:
            del os.environ[capability.COMPUTE_ENV]
        else:
            os.environ[capability.COMPUTE_ENV] = old


def _auto_name() -> str:
    if capability.compute_dtype(torch.bfloat16) != torch.bfloat16:
        return AUTO_MODES[0]
    if amx.active():
        return AUTO_MODES[2]
    return AUTO_MODES[3] if dpbf16.active() else AUTO_MODES[1]


@contextlib.contextmanager
def _onednn_panels():
    """The bf16 mode on oneDNN's panels instead of qpeft's AMX kernel: the kernels' level
    capped at avx512_bf16 for the call (qpeft._C.set_isa, as QPEFT_CPU_ISA=avx512_bf16), and
    that level's vdpbf16ps kernel switched off (dpbf16.MAX_ROWS = 0)."""
    mod = _native.cpu_module()
    prev = mod.set_isa("avx512_bf16")
    rows, dpbf16.MAX_ROWS = dpbf16.MAX_ROWS, 0
    try:
        yield
    finally:
        mod.set_isa(prev)
        dpbf16.MAX_ROWS = rows


def _amx_level() -> bool:
    """Whether this CPU has the amx level (the A/B of the AMX kernel against oneDNN's
    panels is then added to the cases)."""
    try:
        return _native.cpu_info()["detected_level"] == "amx" and amx.active()
    except ImportError:
        return False


def _linear4bit_cases(device: str, quick: bool) -> list[Case]:
    bnb, bnbF = optional("bitsandbytes"), optional("bitsandbytes.functional")
    n = k = 256 if quick else 4096
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)
    lin = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w.float())
    q = qpeft.nn.Linear4bit.from_linear(lin)  # the same packed weight as quantize_4bit(w)
    packed, state = q.weight.packed, q.quant_state
    w32 = q.dequantize(torch.float32)
    w16 = w32.to(torch.bfloat16)
    out = []
    for m in [1, 16] if quick else [1, 16, 512]:
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)
        want = (x.double() @ w32.double().T).float()

        def same(y, want=want):
            assert _rel(y, want) < SAME_FORMAT_REL, f"relative error {_rel(y, want):.2e}"

        def run(x=x, choice=None):
            with torch.no_grad(), _compute(choice):
                return q(x)

        def run_panels(x=x):
            with _onednn_panels():
                return run(x)

        impls = [
            Impl(f"qpeft Linear4bit ({_auto_name()} auto)", run, same),
            *([Impl("qpeft Linear4bit (bf16, oneDNN panels)", run_panels, same)] if _amx_level() else []),
            Impl("qpeft Linear4bit (fp32 forced)", lambda x=x, run=run: run(x, "fp32"), same),
            Impl("torch bf16 F.linear (dequantized W)", lambda x=x: F.linear(x, w16), same),
            Impl("torch fp32 F.linear (dequantized W)", lambda x=x: F.linear(x.float(), w32), same),
        ]
        if bnb is not None and bnbF is not None:
            bstate = bnbF.QuantState.from_dict(state.as_dict(packed=True), device=device)
            impls.append(
                Impl(
                    "bitsandbytes matmul_4bit", lambda x=x, b=bstate: bnb.matmul_4bit(x, packed.t(), b), same
                )
            )
        out.append(
            Case(
                "Linear4bit by ISA",
                f"M={m} {n}x{k}",
                impls,
                x=m,
                x_name="M",
                bound="compute",
                flops=2 * m * n * k,
            )
        )
    return out


def _layer_case(device: str, quick: bool) -> Case:
    m, n, k = (16, 256, 256) if quick else (512, 4096, 4096)
    layer = Layer(m, n, k, device)

    def fwdbwd(fwd, choice=None):
        def run():
            with _compute(choice):
                x = layer.x.clone().requires_grad_()
                y = fwd(x)
                y.backward(layer.dy)
                return y.detach(), x.grad

        return run

    impls = []
    fwd = layer.qpeft("cpu")[0]
    impls.append(Impl(f"qpeft cpu ({_auto_name()} auto)", fwdbwd(fwd), layer.check(True)))
    if _amx_level():
        auto = fwdbwd(fwd)

        def panels():
            with _onednn_panels():
                return auto()

        impls.append(Impl("qpeft cpu (bf16, oneDNN panels)", panels, layer.check(True)))
    impls.append(Impl("qpeft cpu (fp32 forced)", fwdbwd(fwd, "fp32"), layer.check(True)))

    def fp32_x_medium():
        # fp32 x (the same values) under torch.set_float32_matmul_precision("medium"): the
        # user's opt-in to bf16 for fp32 matmuls, which the layer follows on a CPU with bf16
        # dot products (docs/design.md, "CPU compute dtype"); the same check as the bf16 rows
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("medium")
        try:
            x = layer.x.float().requires_grad_()
            y = fwd(x)
            y.backward(layer.dy.float())
            return y.detach(), x.grad
        finally:
            torch.set_float32_matmul_precision(before)

    impls.append(Impl("qpeft cpu (fp32 x, matmul precision medium)", fp32_x_medium, layer.check(True)))
    for dt, name in ((torch.bfloat16, "peft+bnb bf16"), (torch.float32, "peft+bnb fp32")):
        made = layer.peft_bnb(dt)
        if made is not None:
            impls.append(Impl(name, fwdbwd(made[0]), layer.check(True)))
    from .qlora import R, _flops

    return Case(
        "QLoRA layer fwd+bwd by ISA",
        f"M={m} {n}x{k} r={R}",
        impls,
        bound="compute",
        flops=_flops(m, n, k, "fwdbwd"),
        runs={"peft+bnb fp32": {"min_runs": 3, "min_seconds": 0.0}},
    )


def cases(device: str, quick: bool) -> list[Case]:
    if device != "cpu":
        return []  # the compute-dtype choice is the CPU backend's
    return [*_linear4bit_cases(device, quick), _layer_case(device, quick)]
