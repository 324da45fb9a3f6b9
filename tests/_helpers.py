"""Shared by the tests: assertions that print the first mismatches, the derived error
bounds (GEMV, the fp64 oracle of qlora_linear), and model builders for the module,
interop, MiniLM and device tests. Only public qpeft API is used here."""

from __future__ import annotations

import copy
import itertools
import os

import pytest
import torch
from torch import nn

import qpeft.functional as qf
from qpeft.nn import Linear4bit, QLoRALinear
from qpeft.testing import (  # noqa: F401  (re-exported: the test files import them from here)
    CASES,
    ETA32,
    GEMV_MAX_ROWS,
    U32,
    U_OP,
    U_OUT,
    backend_oracle,
    case_id,
    cpu_computes_bf16,
    cpu_gemv_bound,
    cpu_gemv_roundings,
    cuda_gemv_roundings,
    gemv_bound,
    gemv_tolerance,
    make_problem,
    oracle,
    qlora_linear_results,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# --- assertions -------------------------------------------------------------------------------


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor, for exact comparison (distinguishes -0.0, NaN payloads)."""
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().reshape(-1).view(view)


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    diff = bits(actual) != bits(expected)
    if bool(diff.any()):
        idx = diff.reshape(-1).nonzero()[:8, 0]
        a, e = actual.reshape(-1)[idx], expected.reshape(-1)[idx]
        pytest.fail(
            f"{what}: {int(diff.sum())} of {diff.numel()} elements differ; first at flat "
            f"{idx.tolist()}: got {a.tolist()} expected {e.tolist()}"
        )


def assert_same_values(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Bit-identical where the expected value is not NaN, NaN where it is NaN.

    Only the payload of NaNs may differ: it is not part of any format. torch's fp32->bf16
    cast writes 0x7fc0 / 0xffff, a GPU's cvt (and so the CUDA emulation) the canonical 0x7fff.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if actual.is_floating_point():
        nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
        if not torch.equal(nan_a, nan_e):
            idx = (nan_a != nan_e).reshape(-1).nonzero()[:8, 0]
            pytest.fail(
                f"{what}: NaN positions differ; first at flat {idx.tolist()}: got "
                f"{actual.reshape(-1)[idx].tolist()} expected {expected.reshape(-1)[idx].tolist()}"
            )
        actual = actual.masked_fill(nan_a, 0)
        expected = expected.masked_fill(nan_e, 0)
    assert_bits_equal(actual, expected, what)


def assert_within(actual: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor, what: str) -> None:
    """|actual - expected| <= tol element-wise (expected and tol in fp64); NaN fails."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected).abs()
    bad = ~(err <= tol)
    if bool(bad.any()):
        i = bad.reshape(-1).nonzero()[:5, 0]
        pytest.fail(
            f"{what}: {int(bad.sum())} of {bad.numel()} beyond the bound; first at flat {i.tolist()}: got "
            f"{actual.reshape(-1)[i].tolist()} expected {expected.reshape(-1)[i].tolist()} "
            f"(|err| {err.reshape(-1)[i].tolist()} > tol {tol.reshape(-1)[i].tolist()})"
        )


def reference(fn, *args, **kwargs):
    """fn(*args, **kwargs) with every op on the pure-torch reference backend."""
    import qpeft

    with qpeft.use_backend("default"):
        return fn(*args, **kwargs)


def assert_same_quantization(x, blocksize, quant_type, double_quant, what) -> None:
    """quantize_4bit with the current backend, and its dequantization to every dtype, bit for
    bit the reference's (finite inputs)."""
    p_ref, s_ref = reference(qf.quantize_4bit, x, blocksize, quant_type, double_quant)
    packed, state = qf.quantize_4bit(x, blocksize, quant_type, double_quant)
    assert_bits_equal(packed, p_ref, f"{what} packed")
    assert_bits_equal(state.absmax, s_ref.absmax, f"{what} absmax")
    if double_quant:
        assert_bits_equal(state.offset, s_ref.offset, f"{what} offset")
        assert_bits_equal(state.state2.absmax, s_ref.state2.absmax, f"{what} nested absmax")
    for dtype in DTYPES:
        out = qf.dequantize_4bit(packed, state, out_dtype=dtype)
        ref = reference(qf.dequantize_4bit, p_ref, s_ref, out_dtype=dtype)
        assert_bits_equal(out, ref, f"{what} dequantized to {dtype}")


# --- error bounds: derived in qpeft/testing.py, shared with `python -m qpeft selftest` --------


def check_qlora_linear(p: dict, backend: str) -> None:
    """qlora_linear forward and every gradient, run on ``backend``, within the fp64 oracle's
    bounds (qpeft.testing.qlora_linear_results)."""
    for name, got, want, tol in qlora_linear_results(p, backend):
        assert_within(got, want, tol, f"{backend} {name}")


# --- model builders ------------------------------------------------------------------------


def bnb_linear(
    lin: nn.Linear, quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64
) -> nn.Module:
    """bitsandbytes' Linear4bit holding ``lin``'s weight, quantized on CPU (fp32 compute)."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        lin.in_features,
        lin.out_features,
        bias=lin.bias is not None,
        compute_dtype=torch.float32,
        compress_statistics=double_quant,
        quant_type=quant_type,
    )
    layer.weight = bnb.nn.Params4bit(
        lin.weight.data.clone(),
        requires_grad=False,
        compress_statistics=double_quant,
        quant_type=quant_type,
        blocksize=blocksize,
    )
    if lin.bias is not None:
        layer.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")  # bitsandbytes quantizes on the move to a device


def replace_linears(model: nn.Module, names: list[str], make) -> nn.Module:
    for name in names:
        parent, _, attr = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, attr, make(getattr(holder, attr)))
    return model


def linear_names(model: nn.Module, exclude: tuple[str, ...] = ("lm_head",)) -> list[str]:
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] not in exclude
    ]


def dequantized_copy(base: nn.Module, converted: nn.Module, dtype=torch.float32) -> nn.Module:
    """``base`` with each converted layer's weight replaced by its dequantized 4-bit weight."""
    out = copy.deepcopy(base).to(dtype)
    for name, m in converted.named_modules():
        if name.endswith(".base_layer"):  # reached through its wrapper already
            continue
        layer = m.base_layer if isinstance(m, QLoRALinear) else m
        if isinstance(layer, Linear4bit):
            with torch.no_grad():
                out.get_submodule(name).weight.copy_(layer.dequantize(torch.float32))
    return out


def rms(t: torch.Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt())


def assert_close_to_hf(ours: torch.Tensor, hf: torch.Tensor, ref64: torch.Tensor, what: str) -> None:
    """FlashAttention's rule: both are fp32 evaluations of one model; ours may deviate from the
    fp64 evaluation of that model by at most twice what the HF implementation deviates (a
    different summation order of the same fp32 operations), plus one fp32 ulp of the values
    so that a lucky exact HF result does not demand an exact ours."""
    e_ours, e_hf = rms(ours - ref64), rms(hf - ref64)
    bound = 2 * e_hf + U32 * rms(ref64)
    assert e_ours <= bound, f"{what}: rms error vs fp64 {e_ours:.3e} > 2 x HF's {e_hf:.3e} + ulp"


# --- device tests: which backends serve which device ------------------------------------
# On CUDA every backend that can run there; on CPU the native one and the reference, plus
# (forced) the CUDA kernels in the emulation harness and, only without a GPU, Triton under
# its interpreter (conftest sets TRITON_INTERPRET=1 only then: on a GPU machine the Triton
# kernels run compiled, on CUDA tensors).
CUDA_BACKENDS = ("triton", "cuda", "default")
CPU_BACKENDS = ("cpu", "default", "cuda_emulated") + (
    ("triton",) if os.environ.get("TRITON_INTERPRET") == "1" else ()
)


def backends_for(op: str, device: str) -> list[str]:
    """The backends of ``device`` that registered a kernel for ``qpeft::op``."""
    from qpeft._dispatch import kernels_of

    return [b for b in (CUDA_BACKENDS if device == "cuda" else CPU_BACKENDS) if op in kernels_of(b)]


def device_cases(op: str, *axes: list, cpu: int = 1) -> list:
    """pytest params ``(device, backend, *combo)`` over the product of ``axes``: every combo
    on every CUDA backend of ``op`` (skipped without a GPU), and only the first ``cpu``
    combos on CPU, where the op's own test files already cover the grid."""
    from .conftest import NO_CUDA

    combos = list(itertools.product(*axes))
    out = []
    for device in ("cuda", "cpu"):
        for backend in backends_for(op, device):
            for combo in combos if device == "cuda" else combos[:cpu]:
                ident = "-".join([device, backend, *(str(c).replace("torch.", "") for c in combo)])
                marks = [NO_CUDA] if device == "cuda" else []
                out.append(pytest.param(device, backend, *combo, id=ident, marks=marks))
    return out


def within_reference(ours: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor, what: str) -> None:
    """``ours`` and ``ref`` (the reference backend) evaluate one function in one dtype with
    different summation orders; ``exact`` is its fp64 value. ours may deviate from exact by
    at most twice what the reference deviates, plus one ulp of ours' dtype (so that a lucky
    exact reference does not demand an exact ours) -- the rule of assert_close_to_hf."""
    ulp = torch.finfo(ours.dtype).eps
    ours, ref, exact = (t.detach().cpu().double() for t in (ours, ref, exact))
    e_ours, e_ref = rms(ours - exact), rms(ref - exact)
    bound = 2 * e_ref + ulp * rms(exact)
    assert e_ours <= bound, f"{what}: rms error vs fp64 {e_ours:.3e} > 2 x the reference's {e_ref:.3e} + ulp"


class _FactoriesOnDevice(torch.overrides.TorchFunctionMode):
    """Tensors made without a device land on ``device``; one drawn from a CPU generator is
    drawn on CPU and moved (the seed keeps its values on any machine)."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = device
        from torch.utils._device import _device_constructors

        self.factories = _device_constructors()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.factories and kwargs.get("device") is None:
            gen = kwargs.get("generator")
            if gen is not None and gen.device.type == "cpu":
                return func(*args, **kwargs).to(self.device)
            kwargs["device"] = self.device
        return func(*args, **kwargs)


def triton_test_device():
    """The Triton tests' tensors: on a GPU machine CUDA tensors (the kernels compiled, as
    they run in training); without one CPU tensors (conftest set TRITON_INTERPRET=1)."""
    import contextlib

    return _FactoriesOnDevice("cuda") if torch.cuda.is_available() else contextlib.nullcontext()
