"""qlora_linear (fused 4-bit dequant + LoRA GEMM): the Triton kernels against an fp64 oracle,
beyond the per-case checks every backend gets (test_backends.py).

Without a GPU the Triton kernels run in the interpreter (conftest sets TRITON_INTERPRET=1)
with one fixed tile config (BLOCK_M = BLOCK_N = 16, BLOCK_K = 64), so the shapes below (M, N,
K not multiples of 16/64; K not a multiple of the quant blocksize, so quant blocks straddle
rows of W; and K a multiple of it, the kernels' ALIGNED path) hit every mask edge. The oracle is computed in fp64 from the exact inputs and the exactly dequantized W
(fp32 decode values are exact in fp64).

The oracle and its worst-case bounds (derived in tests/_helpers.py, above U_OP) are shared
with the CPU and reference backends, whose forward and gradient checks over the same CASES are
test_backends.py::test_qlora_linear_cases.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import qpeft
from qpeft.functional import qlora_linear, quantize_4bit

from ._helpers import CASES, assert_within, triton_test_device
from ._helpers import make_problem as _problem
from ._helpers import oracle as _oracle


@pytest.fixture(autouse=True)
def _on_triton_device(request):
    # Tests over the CPU `backend` fixture keep CPU tensors; the Triton ones follow the GPU.
    with contextlib.nullcontext() if "backend" in request.fixturenames else triton_test_device():
        yield


def test_strided_batched_mixed_dtypes():
    """x [2, 5, K] viewed out of a wider buffer (row stride K + 3), fp32 LoRA weights with a
    bf16 x (PEFT keeps adapters in fp32): y in x's dtype, gradients in each parameter's dtype.
    A and B hold bf16-representable values, so the kernel's cast to bf16 is exact and the
    bf16 bounds apply unchanged."""
    case = (torch.bfloat16, 10, 45, 128, 8, "nf4", True, 64, True, True, False)
    p = _problem(case, seed=4)
    ref = _oracle(p, torch.bfloat16)
    k = p["x"].shape[1]
    wide = torch.zeros(2, 5, k + 3, dtype=torch.bfloat16)
    wide[..., :k] = p["x"].reshape(2, 5, k)
    x = wide[..., :k].requires_grad_()
    a = p["a"].float().requires_grad_()
    b = p["b"].float().requires_grad_()
    with qpeft.use_backend("triton"):
        y = qlora_linear(
            x, p["packed"], p["state"], a, b, p["scaling"], p["bias"], rank_scale=p["rank_scale"]
        )
        y.backward(p["dy"].reshape(2, 5, -1))
    assert y.shape == (2, 5, 45) and y.dtype == torch.bfloat16
    assert_within(y.detach().reshape(10, 45), *ref["y"], "y")
    assert x.grad.dtype == torch.bfloat16 and a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    assert_within(x.grad.reshape(10, k), *ref["dx"], "dx")
    assert_within(a.grad, *ref["dA"], "dA")
    # dB = s * dy'^T @ xa: xa is stored in bf16 either way; the fp32 result skips the final bf16 cast.
    assert_within(b.grad, *ref["dB"], "dB")


def _strided(t):
    """An equal tensor that is a stride-2 view (every second element of a wider buffer)."""
    if t is None:
        return None
    wide = torch.zeros((*t.shape, 2), dtype=t.dtype, device=t.device)
    wide[..., 0] = t
    return wide[..., 0]


@pytest.mark.parametrize("double_quant", [True, False])
def test_strided_weight_statistics_and_bias(double_quant):
    """The op's flat inputs (codes, absmax, nested statistics, offset, bias, rank_scale,
    out_scale) given as strided views compute what their contiguous copies compute, forward
    and dx: the kernels index them as flat arrays, so the backend makes them contiguous (a
    stride-2 bias once gave y off by 2.9, strided codes by 47)."""
    from qpeft.functional import _quant_args

    torch.manual_seed(0)
    n, k, r, m = 33, 128, 3, 20
    packed, st = quantize_4bit(torch.randn(n, k), 64, "nf4", double_quant)
    absmax, na, nc, off, (bs, nbs, qt, _, _) = _quant_args(st)
    x, dy = torch.randn(m, k), torch.randn(m, n)
    a, b = torch.randn(r, k), torch.randn(n, r)
    bias, rank_scale, out_scale = (torch.rand(s) + 0.5 for s in (n, r, n))
    quant = (packed, absmax, na, nc, off)
    runs = []
    for wrap in (lambda t: t, _strided):
        pk, am, nab, ncd, of = (wrap(t) for t in quant)
        assert wrap is not _strided or not pk.is_contiguous()
        with qpeft.use_backend("triton"):
            y, xa = torch.ops.qpeft.qlora_linear(
                x, pk, am, nab, ncd, of, bs, nbs, qt, n, k, a, b, 0.5,
                wrap(bias), wrap(rank_scale), wrap(out_scale), True,
            )  # fmt: skip
            dx = torch.ops.qpeft.qlora_linear_backward(
                dy, x, pk, am, nab, ncd, of, bs, nbs, qt, n, k, a, b, xa, 0.5,
                wrap(rank_scale), wrap(out_scale), True, False, False, False,
            )[0]  # fmt: skip
        runs.append((y, dx))
    assert torch.equal(runs[1][0], runs[0][0]) and torch.equal(runs[1][1], runs[0][1])


def test_no_grad_inference_skips_xa():
    p = _problem(CASES[1])
    with torch.no_grad(), qpeft.use_backend("triton"):
        y = qlora_linear(p["x"], p["packed"], p["state"], p["a"], p["b"], p["scaling"])
    assert not y.requires_grad
    assert_within(y, *_oracle(p, torch.float32)["y"], "y")


def _op_args(p, return_xa):
    st = p["state"]
    nested = (st.state2.absmax, st.state2.code, st.offset.reshape(1)) if st.nested else (None, None, None)
    n, k = st.shape
    nested_bs = st.state2.blocksize if st.nested else 256
    return (
        p["x"],
        p["packed"],
        st.absmax,
        *nested,
        st.blocksize,
        nested_bs,
        st.quant_type,
        n,
        k,
        p["a"],
        p["b"],
        p["scaling"],
        p["bias"],
        p["rank_scale"],
        p["out_scale"],
        return_xa,
    )


@pytest.mark.parametrize("backend", ["default", "triton"])
def test_op_xa_and_empty_outputs(backend):
    case = CASES[0]
    p = _problem(case, seed=1)
    ref = _oracle(p, case[0], rounds_operands=backend == "triton")
    with qpeft.use_backend(backend):
        y, xa = torch.ops.qpeft.qlora_linear(*_op_args(p, True))
        assert_within(xa, *ref["xa"], "xa")
        assert_within(y, *ref["y"], "y")
        y2, empty = torch.ops.qpeft.qlora_linear(*_op_args(p, False))
        assert empty.numel() == 0 and torch.equal(y, y2)
        args = _op_args(p, False)
        grads = torch.ops.qpeft.qlora_linear_backward(
            p["dy"],
            *args[:11],
            p["a"],
            p["b"],
            xa,
            p["scaling"],
            p["rank_scale"],
            p["out_scale"],
            False,
            True,
            False,
            False,
        )
    assert [g.numel() == 0 for g in grads] == [True, False, True, True]
    assert_within(grads[1], *ref["dA"], "dA")


@pytest.mark.parametrize("backend", ["default", "triton"])
def test_opcheck(backend):
    """Schemas, fake impls and no aliasing of both ops (torch.library.opcheck), per backend."""
    case = CASES[6]
    p = _problem(case, seed=2)
    ref = _oracle(p, case[0], rounds_operands=backend == "triton")
    with qpeft.use_backend(backend):
        y, xa = torch.ops.qpeft.qlora_linear(*_op_args(p, True))
        torch.library.opcheck(torch.ops.qpeft.qlora_linear.default, _op_args(p, True))
        bargs = (
            p["dy"],
            *_op_args(p, False)[:11],
            p["a"],
            p["b"],
            xa,
            p["scaling"],
            p["rank_scale"],
            p["out_scale"],
            True,
            True,
            True,
            True,
        )
        torch.library.opcheck(torch.ops.qpeft.qlora_linear_backward.default, bargs)
    assert_within(y, *ref["y"], f"{backend} y")


def test_gradcheck_fp64_reference():
    """Exact fp64 gradients of the reference path (gradcheck's finite differences)."""
    g = torch.Generator().manual_seed(3)
    n, k, r, m = 5, 7, 2, 3
    packed, state = quantize_4bit(torch.randn(n, k, generator=g), 32, "nf4", double_quant=True)
    x = torch.randn(2, m, k, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(r, k, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, r, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(n, generator=g, dtype=torch.float64, requires_grad=True)
    rs = torch.rand(r, generator=g, dtype=torch.float64)
    os_ = torch.rand(n, generator=g, dtype=torch.float64)

    def f(x, a, b, bias):
        return qlora_linear(x, packed, state, a, b, 0.5, bias, rank_scale=rs, out_scale=os_)

    with qpeft.use_backend("default"):
        assert torch.autograd.gradcheck(f, (x, a, b, bias))


def test_errors():
    p = _problem(CASES[1])
    st = p["state"]
    x, a, b = p["x"], p["a"], p["b"]
    with pytest.raises(ValueError, match="input features"):
        qlora_linear(x[:, :-1], p["packed"], st, a, b, 1.0)
    with pytest.raises(ValueError, match="rank mismatch"):
        qlora_linear(x, p["packed"], st, torch.zeros(2, x.shape[1]), b, 1.0)
    with pytest.raises(ValueError, match="lora_B must be"):
        qlora_linear(x, p["packed"], st, a, b.T, 1.0)
    with pytest.raises(ValueError, match="is on meta"):
        qlora_linear(x, p["packed"], st, a.to("meta"), b, 1.0)
    with pytest.raises(ValueError, match="bias must have shape"):
        qlora_linear(x, p["packed"], st, a, b, 1.0, torch.zeros(3))
    with pytest.raises(NotImplementedError, match="rank_scale"):
        qlora_linear(x, p["packed"], st, a, b, 1.0, rank_scale=torch.ones(a.shape[0], requires_grad=True))
    with qpeft.use_backend("triton"), pytest.raises(TypeError, match="fp16, bf16 or fp32"):
        qlora_linear(x.double(), p["packed"], st, a, b, 1.0)


def test_fp64_default_mode_runs_on_the_next_backend():
    """Unforced, the Triton QLoRA ops hand fp64 activations (gradcheck) to the next backend
    of the device's default order instead of raising: on CUDA the CUDA C++ SIMT kernel (or
    the reference without that module); forced, they raise (test_errors)."""
    from qpeft import _dispatch
    from qpeft.backends.triton import qlora as tq

    p = _problem(CASES[1])
    st = p["state"]
    x, a, b = p["x"].double(), p["a"].double(), p["b"].double()
    n, k = st.shape
    args = (p["packed"], st.absmax, None, None, None, st.blocksize, 256, st.quant_type, n, k)
    want = torch.ops.qpeft.qlora_linear(x, *args, a, b, 0.5, None, None, None, True)
    got = tq.qlora_linear(x, *args, a, b, 0.5, None, None, None, True)  # CPU: the cpu backend next
    assert got[0].dtype == torch.float64 and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    dy = torch.randn_like(want[0])
    bwd = tq.qlora_linear_backward(dy, x, *args, a, b, got[1], 0.5, None, None, True, True, True, False)
    ref = torch.ops.qpeft.qlora_linear_backward(
        dy, x, *args, a, b, want[1], 0.5, None, None, True, True, True, False
    )
    for g, r in zip(bwd[:3], ref[:3], strict=True):
        assert g.dtype == torch.float64 and torch.equal(g, r)
    cuda_next = _dispatch.kernel_after("qlora_linear", "cuda", "triton")
    if _dispatch.unavailable_reason("cuda") is None:
        assert cuda_next is _dispatch.kernels_of("cuda")["qlora_linear"]
    else:
        assert cuda_next is _dispatch.kernels_of("default")["qlora_linear"]


def test_aot_configs_are_well_formed():
    """AOT_CONFIGS name every kernel argument in order; constexprs are marked in the signature."""
    from qpeft.backends.triton.qlora import _kernels

    kern = _kernels()
    assert kern.AOT_CONFIGS
    for cfg in kern.AOT_CONFIGS:
        keys = {"name", "fn", "signature", "constexprs", "num_warps", "num_stages", "attrs"}
        # "archs": one arch's own default tile; "default": False for an entry compiled as
        # evidence only (the PRE_LORA variant off PRE_LORA_ARCHS; triton_kernels/__init__.py)
        assert keys <= set(cfg) <= keys | {"archs", "default"}
        assert isinstance(cfg.get("default", True), bool)
        assert set(cfg.get("archs", (80, 90))) <= {80, 90}
        assert list(cfg["signature"]) == cfg["fn"].arg_names, cfg["name"]
        for name in cfg["constexprs"]:
            assert cfg["signature"][name] == "constexpr", (cfg["name"], name)
        assert all((v == "constexpr") == (k in cfg["constexprs"]) for k, v in cfg["signature"].items())


# --- register decode (docs/design.md, "Fused kernels: register decode") ----------------------


def _launchers():
    from qpeft.backends.triton.qlora import _kernels

    return _kernels()


@pytest.mark.parametrize(
    ("dtype", "n", "k", "quant_type", "double_quant", "blocksize"),
    [
        (torch.bfloat16, 45, 160, "nf4", True, 32),  # partial N and K tiles, two blocks per K tile
        (torch.float16, 17, 128, "fp4", False, 128),  # a block spans two K tiles
    ],
)
def test_register_decode_is_the_reference_dequantize(dtype, n, k, quant_type, double_quant, blocksize):
    """The fused kernels' W tile is bit for bit the reference dequantize: one-hot rows of x
    (forward) and dy = I (dx) make every output one product 1 * w plus exact zeros in fp32,
    so y and dx are entries of W exactly (+-0 compare equal: the accumulator starts at +0)."""
    kern = _launchers()
    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=g) * 3
    w[0, :7] = 0.0  # whole-zero runs and exact zeros
    packed, st = quantize_4bit(w, blocksize, quant_type, double_quant=double_quant)
    with qpeft.use_backend("default"):
        ref = qpeft.functional.dequantize_4bit(packed, st, dtype).cpu()
    dev = packed.device
    nested = (st.state2.absmax, st.state2.code, st.offset.reshape(1)) if st.nested else (None, None, None)
    nbs = st.state2.blocksize if st.nested else 256
    code = st.code.to(device=dev, dtype=torch.float32)
    assert kern._lut(dtype, packed, k, blocksize)  # the register decode is the path under test
    # forward: 16 one-hot rows picking columns spread over every K tile (one M tile: the
    # interpreter is slow); dx: dy = I, all of W
    cols = torch.linspace(0, k - 1, 16).round().long()
    x = torch.zeros(16, k, dtype=dtype)
    x[torch.arange(16), cols] = 1
    y, _ = kern.qlora_forward(
        x.to(dev), packed, st.absmax, *nested, code, blocksize, nbs, n, k,
        None, None, 1.0,
    )  # fmt: skip
    dx, _ = kern.qlora_dx(
        torch.eye(n, dtype=dtype), packed, st.absmax, *nested, code, blocksize, nbs, n, k,
        None, None, 1.0,
    )  # fmt: skip
    assert torch.equal(y.cpu().T, ref[:, cols]), "forward W tile"
    assert torch.equal(dx.cpu(), ref), "dx W tile"


@pytest.mark.parametrize(
    ("dtype", "n", "k", "quant_type", "double_quant", "blocksize"),
    [
        (torch.bfloat16, 45, 256, "nf4", True, 32),  # partial N tile, four blocks per 128-code chunk
        (torch.float16, 17, 384, "fp4", False, 64),  # partial last K tile (128-wide tiles), two per chunk
        (torch.bfloat16, 9, 256, "nf4", True, 256),  # a block spans two chunks (and two K tiles)
        (torch.float32, 5, 128, "nf4", True, 64),  # no register decode: decoded from a bitsandbytes copy
    ],
)
def test_fragment_layout_decodes_like_bitsandbytes_order(dtype, n, k, quant_type, double_quant, blocksize):
    """A weight in the GPU fragment layout (qpeft/layout.py) gives the launchers the same W
    bit for bit: read in place by the register decode (LUT = 2, the tile permuted back to k
    order in registers) or, where that does not apply, through an unrepacked copy. One-hot
    rows and dy = I as in test_register_decode_is_the_reference_dequantize."""
    from qpeft.layout import repack_4bit

    kern = _launchers()
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g) * 3
    packed, st = quantize_4bit(w, blocksize, quant_type, double_quant=double_quant)
    with qpeft.use_backend("default"):
        ref = qpeft.functional.dequantize_4bit(packed, st, dtype).cpu()
    frag = repack_4bit(packed, n, k, blocksize).reshape(-1)
    nested = (st.state2.absmax, st.state2.code, st.offset.reshape(1)) if st.nested else (None, None, None)
    nbs = st.state2.blocksize if st.nested else 256
    code = st.code.to(dtype=torch.float32)
    in_place = dtype != torch.float32
    assert kern._layout("fwd", "fragment", frag, dtype, 16, n, k, blocksize, 16, None)[1] == (
        2 if in_place else False
    )
    cols = torch.linspace(0, k - 1, 16).round().long()
    x = torch.zeros(16, k, dtype=dtype)
    x[torch.arange(16), cols] = 1
    args = (st.absmax, *nested, code, blocksize, nbs, n, k, None, None, 1.0)
    y, _ = kern.qlora_forward(x, frag, *args, split=0, layout="fragment")
    dx, _ = kern.qlora_dx(torch.eye(n, dtype=dtype), frag, *args, split=0, layout="fragment")
    assert torch.equal(y.T, ref[:, cols]), "forward W tile"
    assert torch.equal(dx, ref), "dx W tile"
    # the split schedule reads an unrepacked copy, with the same result as on bitsandbytes' order
    y1, _ = kern.qlora_forward(x[:3], frag, *args, split=2, layout="fragment")
    y2, _ = kern.qlora_forward(x[:3], packed.reshape(-1), *args, split=2)
    assert torch.equal(y1, y2)
    with pytest.raises(ValueError, match="layout must be"):
        kern.qlora_forward(x, frag, *args, layout="tiled")
    # the launchers check what they index as flat arrays, whichever path the tile takes (the
    # in-place fragment read once took a weight that cannot be in the layout, or 10 bytes)
    with pytest.raises(ValueError, match=f"has {n * k // 2} packed bytes, got 10"):
        kern.qlora_forward(x, frag[:10], *args, split=0, layout="fragment")
    with pytest.raises(ValueError, match=f"has {n * k // 2} packed bytes, got 10"):
        kern.qlora_dx(torch.eye(n, dtype=dtype), packed.reshape(-1)[:10], *args, split=0)
    small = (st.absmax[: n * 64 // blocksize or 1], *nested, code, blocksize, nbs, n, 64, None, None, 1.0)
    with pytest.raises(ValueError, match="fragment layout needs in_features divisible by 128"):
        kern.qlora_forward(x[:, :64], frag[: n * 32], *small, split=0, layout="fragment")


def test_misaligned_packed_takes_the_byte_path():
    """A ``packed`` view starting at an odd byte is not 16-byte aligned (the register decode
    reads it with 16-byte loads): the launcher falls back to the per-byte path, with the
    same result within the oracle's bounds."""
    kern = _launchers()
    case = (torch.float16, 3, 20, 128, 4, "nf4", True, 64, True, False, False)
    p = _problem(case, seed=5)
    buf = torch.empty(p["packed"].numel() + 1, dtype=torch.uint8, device=p["packed"].device)
    buf[1:] = p["packed"].reshape(-1)
    odd = buf[1:]
    assert odd.data_ptr() % 16 != 0 and not kern._lut(torch.float16, odd, 128, 64)
    assert kern._lut(torch.float16, p["packed"], 128, 64)
    with qpeft.use_backend("triton"):
        y = qlora_linear(p["x"], odd, p["state"], p["a"], p["b"], p["scaling"], p["bias"])
        y0 = qlora_linear(p["x"], p["packed"], p["state"], p["a"], p["b"], p["scaling"], p["bias"])
    ref = _oracle(p, torch.float16)["y"]
    assert_within(y, *ref, "y (byte path)")
    assert_within(y0, *ref, "y (register decode)")


def test_large_rank_through_the_register_decode():
    """r = 200 (BLOCK_R = 256, the "hi" bucket) with whole quant blocks per row: forward and
    gradients within the oracle's bounds."""
    from ._helpers import check_qlora_linear

    case = (torch.bfloat16, 3, 40, 128, 200, "nf4", True, 64, True, True, True)
    check_qlora_linear(_problem(case, seed=6), "triton")


def test_prmt_emulation_matches_the_ptx_definition():
    """The interpreter's prmt (the compiled kernels' inline PTX) against PTX's definition of
    prmt.b32 default mode, on random words and every selector nibble (sign mode included)."""
    probe = pytest.importorskip("tests._prmt_probe").prmt_probe

    g = torch.Generator().manual_seed(11)
    count = 256
    a, b, s = (torch.randint(-(2**31), 2**31, (count,), generator=g, dtype=torch.int64) for _ in range(3))
    s[:16] = torch.arange(16) * 0x1111  # every nibble value in every byte lane
    d = torch.empty(count, dtype=torch.int32)
    probe[(1,)](a.to(torch.int32), b.to(torch.int32), s.to(torch.int32), d, BLOCK=count)

    def ptx(a, b, s):
        src = [((a & 0xFFFFFFFF) >> (8 * i)) & 0xFF for i in range(4)]
        src += [((b & 0xFFFFFFFF) >> (8 * i)) & 0xFF for i in range(4)]
        out = 0
        for i in range(4):
            nib = (s >> (4 * i)) & 0xF
            byte = src[nib & 7]
            if nib & 8:
                byte = 0xFF if byte & 0x80 else 0
            out |= byte << (8 * i)
        return out

    want = [ptx(x, y, z) for x, y, z in zip(a.tolist(), b.tolist(), s.tolist())]
    assert (d.to(torch.int64) & 0xFFFFFFFF).tolist() == want
