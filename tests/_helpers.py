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
from qpeft.functional import dequantize_4bit, quantize_4bit
from qpeft.nn import Linear4bit, QLoRALinear

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
U32 = 2.0**-24  # unit roundoff of fp32
ETA32 = 2.0**-150  # absolute error bound of one fp32 rounding in the subnormal range


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


# --- error bounds: the 4-bit GEMV -----------------------------------------------------------


def _gamma(k: int) -> float:
    return k * U32 / (1 - k * U32)


def _ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` at magnitude |v| (float64)."""
    fi = torch.finfo(dtype)
    mag = v.abs().clamp(min=fi.tiny)
    return fi.eps * torch.exp2(torch.floor(torch.log2(mag)))


def gemv_bound(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype, k_roundings: int) -> torch.Tensor:
    """How far an fp32 evaluation of y = x @ w^T may be from the exact value, per element.

    The inputs are exact fp32 numbers (x converted from its dtype exactly, w the fp32
    dequantized weight, which the kernel forms with the same single product as the
    reference), so only the summation rounds. Whatever the order (a tree, blocks,
    fma chains), each product x_k w_k reaches the result through at most h
    roundings when every one of the K terms is at most h levels deep, and then
    |fl(s) - s| <= gamma_h * sum_k |x_k w_k|, gamma_h = h u / (1 - h u), u = 2^-24
    (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., 3.1; an fma
    rounds once where a multiply-add rounds twice, which only helps), plus 2^-150 for
    each of at most 2K roundings that may land in the subnormal range (gamma assumes
    none). A 16-bit output is then rounded once more: half an ulp of the output dtype
    at the result's magnitude.
    """
    x64, w64 = x.double(), w.double()
    a = x64.abs() @ w64.abs().T  # sum_k |x_k w_k|
    k = x.shape[1]
    bound = _gamma(k_roundings) * a + 2 * k * ETA32
    if out_dtype != torch.float32:
        exact = x64 @ w64.T
        bound = bound + 0.5 * _ulp(exact.abs() + bound, out_dtype)
    return bound


def cuda_gemv_roundings(k: int) -> int:
    """Most roundings between any product and the CUDA kernel's result (csrc/cuda/gemv_4bit.cu).

    A lane chains fmaf over its share of the row: on the 16-byte path, 32 per chunk
    for chunks lane, lane + 32, ... of the K/32 chunks (at most 32 * ceil(K/1024));
    on the per-element path, elements lane, lane + 32, ... (at most ceil(K/32) <=
    32 * ceil(K/1024)). The 5-step butterfly then adds 5 more.
    """
    return 32 * -(-k // 1024) + 5


def cpu_gemv_roundings(k: int, blocksize: int) -> int:
    """Most roundings between any product and the C++ CPU kernel's result (csrc/cpu/gemv*.cpp).

    The kernel factors each block's absmax out of its sum: it computes
    sum_b s_b * sum_{k in b} x_k t_k (t the code's table value) where the reference sums
    x_k * fl(t_k s_b). Exactly, the two differ by sum_k x_k (t_k s_b - fl(t_k s_b)), at most
    u * sum|x_k w_k| (u = 2^-24; one rounding per decoded weight: cpu_gemv_bound adds it).
    Each product then reaches the result through at most h roundings: the scalar kernel's
    chain within a block (2 per term: multiply, add), the block's scaling and its add into
    the row total (2 per block), and, in the AVX2 kernel, a shorter lane chain plus a
    3-level horizontal sum; h = 2 * (blocksize + K / blocksize) + 8 covers both.
    """
    return 2 * (blocksize + -(-k // blocksize)) + 8


def cpu_gemv_bound(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype, blocksize: int) -> torch.Tensor:
    """gemv_bound at the CPU kernel's depth plus its one rounding per decoded weight."""
    k = x.shape[1]
    return gemv_bound(x, w, out_dtype, cpu_gemv_roundings(k, blocksize)) + U32 * (
        x.double().abs() @ w.double().abs().T
    )


# --- error bounds: qlora_linear against an fp64 oracle --------------------------------------
# Tolerances are worst-case bounds, derived per output element (u32 = 2^-24):
# - an fp32 dot over n terms: n * u32 * sum|a_i b_i| (one rounding per product and per add);
# - operands the kernel rounds to the activation dtype (dequantized W, t = s * xa * rank_scale,
#   g, dy' = dy * out_scale, xa): u_op * (sum of |contributions|), u_op = 2^-11 (fp16, RNE)
#   or 2^-7 (bf16: the interpreter truncates fp32->bf16; covers RNE's 2^-8 on a GPU);
#   for fp16 the oracle rounds W exactly as the kernel does, so that term vanishes;
# - the final cast: u_out * |y|, u_out = 2^-24 (fp32), 2^-11 (fp16), 2^-7 (bf16, truncating).

U_OP = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-7}
U_OUT = {torch.float32: U32, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-7}

# (dtype, M, N, K, r, quant_type, double_quant, blocksize, bias, rank_scale, out_scale)
CASES = [
    (torch.float32, 37, 45, 83, 8, "nf4", True, 64, True, True, True),
    (torch.float32, 1, 45, 83, 1, "fp4", False, 64, False, False, False),
    (torch.float32, 20, 17, 150, 64, "fp4", True, 32, False, True, True),
    (torch.float32, 1, 3, 5, 1, "nf4", False, 32, True, False, False),  # odd numel: padding nibble
    (torch.float16, 37, 45, 83, 64, "nf4", False, 32, True, False, True),
    (torch.float16, 1, 33, 100, 8, "fp4", True, 64, False, True, False),
    (torch.float16, 20, 50, 47, 1, "nf4", True, 256, True, True, True),  # a quant block spans 5+ rows
    (torch.float16, 5, 45, 200, 8, "nf4", True, 32, False, False, True),  # 282 blocks: nested blocks straddle
    (torch.bfloat16, 37, 45, 83, 8, "fp4", True, 128, True, True, False),
    (torch.bfloat16, 1, 45, 83, 64, "nf4", False, 64, False, False, True),
    (torch.bfloat16, 17, 16, 64, 1, "nf4", True, 64, True, False, False),
    # K % blocksize == 0: the kernels' ALIGNED path (whole quant blocks per row, vector byte loads)
    (torch.float32, 37, 45, 96, 8, "nf4", True, 32, True, True, True),  # two blocks per 64-wide K tile
    (torch.float16, 20, 50, 192, 1, "fp4", False, 64, False, True, False),
    (torch.float16, 5, 72, 256, 8, "nf4", True, 32, True, False, True),  # 576 blocks: nested blocks straddle
    (torch.bfloat16, 1, 45, 256, 64, "nf4", False, 128, False, False, True),  # a block spans two K tiles
]


def case_id(case):
    dt, m, n, k, r, qt, dq, bs, bias, rs, os_ = case
    flags = "".join(f for f, on in (("b", bias), ("R", rs), ("O", os_)) if on) or "-"
    return f"{str(dt)[6:]}-{m}x{n}x{k}-r{r}-{qt}{'-dq' if dq else ''}-bs{bs}-{flags}"


def make_problem(case, seed=0):
    dt, m, n, k, r, qt, dq, bs, has_bias, has_rs, has_os = case
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    packed, state = quantize_4bit(w, bs, qt, double_quant=dq)
    p = {
        "packed": packed,
        "state": state,
        "w": dequantize_4bit(packed, state, torch.float32).double(),  # exact
        "x": torch.randn(m, k, generator=g).to(dt),
        "a": (torch.randn(r, k, generator=g) / k**0.5).to(dt),
        "b": torch.randn(n, r, generator=g).to(dt),
        "bias": torch.randn(n, generator=g).to(dt) if has_bias else None,
        "rank_scale": (torch.rand(r, generator=g) + 0.5) if has_rs else None,
        "out_scale": (torch.rand(n, generator=g) + 0.5).to(dt) if has_os else None,
        "dy": torch.randn(m, n, generator=g).to(dt),
        "scaling": 0.75,
    }
    return p


def _d(t):
    return None if t is None else t.double()


def oracle(p, dt, rounds_operands=True):
    """fp64 values and worst-case error bounds of y, dx, dA, dB, dbias (see the comment above U_OP).

    ``rounds_operands``: the kernel rounds W, t, dy' to ``dt`` before its dots (Triton);
    the reference ("default") does not: it computes in fp32 from the exact operands.
    """
    u_op, u_out = (U_OP[dt] if rounds_operands else 0.0), U_OUT[dt]
    x, a, b, dy, s = _d(p["x"]), _d(p["a"]), _d(p["b"]), _d(p["dy"]), p["scaling"]
    w = p["w"]
    mimic = rounds_operands and dt == torch.float16
    w_op = p["w"].to(dt).double() if mimic else w  # the fp16 kernel multiplies fp16(W)
    u_w = u_op if dt == torch.bfloat16 else 0.0
    m, k = x.shape
    n, r = b.shape
    rs = _d(p["rank_scale"]) if p["rank_scale"] is not None else torch.ones(r, dtype=torch.float64)
    os_ = _d(p["out_scale"]) if p["out_scale"] is not None else torch.ones(n, dtype=torch.float64)
    bias = _d(p["bias"]) if p["bias"] is not None else torch.zeros(n, dtype=torch.float64)
    ax, aa, ab, aw = x.abs(), a.abs(), b.abs(), w.abs()

    # forward
    xa = x @ a.T
    t = s * xa * rs
    pre = x @ w_op.T + t @ b.T + bias
    y = os_ * pre
    s_base = ax @ aw.T  # sum_k |x||w|
    s_t = s * (ax @ aa.T) * rs.abs()  # bound of |t| including its accumulation
    s_lora = s_t @ ab.T
    err_pre = (
        (k + 2) * U32 * s_base
        + u_w * s_base
        + s_lora * (u_op + (k + r + 4) * U32)
        + U32 * (pre.abs() + bias.abs())
    )
    tol_y = os_.abs() * err_pre * (1 + U32) + u_out * y.abs() + U32 * y.abs()
    tol_xa = k * U32 * (ax @ aa.T) + u_out * xa.abs()

    # backward: dy' = dy * out_scale, rounded to the operand dtype when out_scale is set
    dyp = dy * os_
    u_dy = u_op if p["out_scale"] is not None else 0.0
    ady = dyp.abs()
    g = dyp @ b
    s_g = ady @ ab  # sum_n |dy'||b|
    dx = dyp @ w_op + (s * g * rs) @ a
    s_dxb = ady @ aw
    s_dxl = (s * s_g * rs.abs()) @ aa
    tol_dx = (
        (n + 2) * U32 * s_dxb
        + (u_w + u_dy) * s_dxb
        + s_dxl * (u_op + u_dy + (n + r + 4) * U32)
        + u_out * dx.abs()
        + U32 * dx.abs()
    )
    da = (s * g * rs).T @ x
    s_da = (s * s_g * rs.abs()).T @ ax
    tol_da = s_da * (u_dy + (n + m + 4) * U32) + u_out * da.abs()
    db = dyp.T @ (s * xa * rs)
    s_db = ady.T @ (s * (ax @ aa.T) * rs.abs())
    tol_db = s_db * (u_dy + u_out + (k + m + 4) * U32) + u_out * db.abs()  # xa was stored in dt
    dbias = dyp.sum(0)
    tol_dbias = ady.sum(0) * (u_dy + (m + 1) * U32) + u_out * dbias.abs()
    return {
        "y": (y, tol_y),
        "xa": (xa, tol_xa),
        "dx": (dx, tol_dx),
        "dA": (da, tol_da),
        "dB": (db, tol_db),
        "dbias": (dbias, tol_dbias),
    }


GEMV_MAX_ROWS = 8  # qpeft.functional.gemv_4bit takes 1 to 8 rows of x


def cpu_computes_bf16(backend: str, x: torch.Tensor) -> bool:
    """Whether qlora_linear on ``backend`` ("auto": the default for x's device) runs the CPU
    backend's bf16 mode for this x (qpeft/backends/cpu/capability.py)."""
    from qpeft.backends.cpu import capability

    on_cpu = backend == "cpu" or (backend == "auto" and x.device.type == "cpu")
    return on_cpu and capability.compute_dtype(x.dtype) == torch.bfloat16


def backend_oracle(p: dict, backend: str) -> dict:
    """``oracle`` with the bounds of what ``backend`` computes: operands rounded (Triton),
    the CPU backend's bf16 mode (tests/_bf16_bounds.py, needs p["state"]), else fp32."""
    if cpu_computes_bf16(backend, p["x"]):
        from ._bf16_bounds import bf16_oracle

        return bf16_oracle(p)
    return oracle(p, p["x"].dtype, rounds_operands=backend == "triton")


def check_qlora_linear(p: dict, backend: str) -> None:
    """qlora_linear forward and every gradient, run on ``backend``, within the oracle's bounds.

    Triton rounds its operands to the activation dtype before its dots (``rounds_operands``);
    the reference and the CPU backend compute in fp32 from the exactly decoded W. The CPU
    backend may run x @ W^T through its C++ GEMV for 1 to 8 rows: summation depth
    cpu_gemv_roundings(K, blocksize) and one more rounding from factoring each block's absmax
    out (see cpu_gemv_roundings), added to the bound of y.
    """
    import qpeft
    from qpeft.functional import qlora_linear

    dt = p["x"].dtype
    x = p["x"].clone().requires_grad_()
    a = p["a"].clone().requires_grad_()
    b = p["b"].clone().requires_grad_()
    bias = p["bias"].clone().requires_grad_() if p["bias"] is not None else None
    with qpeft.use_backend(backend):
        y = qlora_linear(
            x,
            p["packed"],
            p["state"],
            a,
            b,
            p["scaling"],
            bias,
            rank_scale=p["rank_scale"],
            out_scale=p["out_scale"],
        )
        y.backward(p["dy"])
    cpu_bf16 = cpu_computes_bf16(backend, p["x"])
    ref = backend_oracle(p, backend)
    y_want, tol_y = ref["y"]
    m, k = p["x"].shape
    if backend == "cpu" and m <= GEMV_MAX_ROWS and not cpu_bf16:
        depth = cpu_gemv_roundings(k, p["state"].blocksize) + 1
        s_base = p["x"].double().abs() @ p["w"].abs().T
        os_ = p["out_scale"].double().abs() if p["out_scale"] is not None else 1.0
        tol_y = tol_y + os_ * depth * U32 * s_base * 1.01  # 1.01: gamma_h vs h*u at these h
    assert y.dtype == dt
    assert_within(y.detach(), y_want, tol_y, f"{backend} y")
    assert_within(x.grad, *ref["dx"], f"{backend} dx")
    assert_within(a.grad, *ref["dA"], f"{backend} dA")
    assert_within(b.grad, *ref["dB"], f"{backend} dB")
    if bias is not None:
        assert_within(bias.grad, *ref["dbias"], f"{backend} dbias")


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
