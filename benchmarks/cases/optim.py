"""Optimizer step time per parameter set: qpeft's fused steps (fp32 and 8-bit state)
against torch.optim.AdamW (single-tensor, foreach, fused) and bitsandbytes' AdamW8bit.

Two parameter sets of one size: one large tensor (streaming: the roofline case) and
many LoRA-sized tensors (where per-tensor overhead shows). fp32 parameters and
gradients, lr 1e-3, weight decay 0.01, default betas/eps; one timed call is one step.
The memory bound counts the bytes a step must move per element: 28 for fp32 state
(read p, g, m, v; write p, m, v) and 16 + 16/256 for 8-bit state (read p, g and two
codes, write p and two codes, two fp32 absmax per 256 elements read and written).

Checks, on one step from the same start: qpeft equals its pure-torch reference bit for
bit; every fp32-state step's new parameters are within 8 ulps, element by element, of
torch.optim.AdamW(foreach=False)'s, the ulp taken at the scale of the step's operands, the
larger of |p| and |new p|. Implementations that compute the same formula may round each
link of its chain differently (torch's own single-tensor step is not reproducible to the
bit on this VM's 2-thread runs, and its fused step differs from it as much as qpeft's):
m and v (one ulp each, v's halved by the square root), the square root, + eps, the
division, the lr / bias-correction product, the decayed p and the final p, each by at most
one ulp of its own magnitude, none above that scale: 8 in all; measured 4 for both
qpeft's and torch's fused step. Where p and the step nearly cancel the new p is far
smaller than its operands, so its own ulp is not the unit (a run measured 64 of them); a
wrong lr or weight decay is thousands of ulps of the operands' scale off. 8-bit steps are within 5%
(relative norm) of torch's update: the dynamic maps round a state by at most ~2% of itself
(bitsandbytes' 8-bit blockwise bounds: relative 0.018), which moves m / sqrt(v) by about
as much, with room for the blocks' absmax.
"""

from __future__ import annotations

import torch

import qpeft
import qpeft.optim as qo

from ..harness import Case, Impl
from .peers import optional

BYTES_32 = 28
BYTES_8 = 16 + 16 / 256
HP = dict(lr=1e-3, weight_decay=0.01)


def _params(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * 1e-2
    return ps


def _update(factory, shapes, backend=None):
    """The parameter change of one step from the seeded start."""
    ps = _params(shapes, seed=1)
    start = [p.detach().clone() for p in ps]
    opt = factory(ps)
    if backend is None:
        opt.step()
    else:
        with qpeft.use_backend(backend):
            opt.step()
    return torch.cat([(p.detach() - s).reshape(-1) for p, s in zip(ps, start)])


def _ulps(got: torch.Tensor, want: torch.Tensor, shapes) -> float:
    """The largest difference of two updates from the seeded start, in ulps of the step's
    operand scale, the larger of |start| and |start + update| (module docstring)."""
    start = torch.cat([p.detach().reshape(-1) for p in _params(shapes, seed=1)])
    scale = torch.maximum(start.abs(), (start + want).abs())
    ulp = torch.nextafter(scale, torch.full_like(scale, float("inf"))) - scale
    return float(((got - want).abs() / ulp).max())


def _checker(factory, shapes, exact_ref: bool, rel: float | None):
    """``rel`` None: within one ulp of torch's new parameters per element; else within ``rel``
    of torch's update in relative norm."""

    def torch_update():
        return _update(lambda ps: torch.optim.AdamW(ps, foreach=False, **HP), shapes)

    def check(_):
        got, want = _update(factory, shapes), torch_update()
        if exact_ref:
            ref = _update(factory, shapes, "default")
            assert torch.equal(got, ref), "differs from the pure-torch reference"
        if rel is None:
            ulps = _ulps(got, want, shapes)
            assert ulps <= 8.0, f"new parameters differ from torch AdamW's by {ulps:.3g} ulp (bound 8)"
            return
        err = float((got - want).norm() / want.norm())
        assert err < rel, f"update differs from torch AdamW by {err:.2e} (bound {rel:g})"

    return check


def cases(device: str, quick: bool) -> list[Case]:
    if device != "cpu":
        return []  # the paged / CUDA steps need a GPU run of their own (not measured here)
    bnb = optional("bitsandbytes")
    sets = (
        {"1 x 256x256": [(256, 256)], "16 x 4096 + 3 x 1000": [(4096,)] * 16 + [(1000,)] * 3}
        if quick
        else {"1 x 4096x4096": [(4096, 4096)], "128 x 4096x32 (LoRA-sized)": [(4096, 32)] * 128}
    )
    out = []
    for label, shapes in sets.items():
        numel = sum(torch.Size(s).numel() for s in shapes)
        check_shapes = shapes[:2]

        def step_of(factory, shapes=shapes):
            opt = factory(_params(shapes))
            return opt.step

        fp32 = {
            "qpeft AdamW": (lambda ps: qo.AdamW(ps, **HP), True),
            "torch AdamW foreach=False": (lambda ps: torch.optim.AdamW(ps, foreach=False, **HP), False),
            "torch AdamW foreach=True": (lambda ps: torch.optim.AdamW(ps, foreach=True, **HP), False),
            "torch AdamW fused=True": (lambda ps: torch.optim.AdamW(ps, fused=True, **HP), False),
        }
        impls = [
            Impl(name, step_of(f), _checker(f, check_shapes, exact, None))
            for name, (f, exact) in fp32.items()
        ]
        out.append(
            Case(
                "optimizer step, fp32 state",
                label,
                impls,
                x=numel,
                x_name="parameters",
                bound="memory",
                nbytes=BYTES_32 * numel,
            )
        )

        eight = {"qpeft AdamW8bit": (lambda ps: qo.AdamW8bit(ps, **HP), True)}
        if bnb is not None:
            eight["bitsandbytes AdamW8bit"] = (lambda ps: bnb.optim.AdamW8bit(ps, **HP), False)
        # 8-bit state starts at 4096 elements: check on a tensor that has it
        big = [max(shapes, key=lambda s: torch.Size(s).numel())]
        impls = [Impl(name, step_of(f), _checker(f, big, exact, 0.05)) for name, (f, exact) in eight.items()]
        out.append(
            Case(
                "optimizer step, 8-bit state",
                label,
                impls,
                x=numel,
                x_name="parameters",
                bound="memory",
                nbytes=int(BYTES_8 * numel),
            )
        )
    return out
