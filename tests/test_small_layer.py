"""The per-call fast paths of small layers (docs/design.md, "Per-call overhead"):

- the CPU backend's one-call native forward and backward (``qpeft._C.qlora_small_forward``,
  ``qlora_small_backward``) against the fp64 oracle's bounds and the composed paths;
- the fast argument check (``_checks._qlora_fast_ok``) agrees with the full one;
- the per-state argument cache (``functional._state_args``): a state changed in place,
  replaced by ``requantize_`` or ``load_state_dict`` gives the new weight's result;
- ``autograd._op``: the kernel called without the dispatcher gives the op's result bit for
  bit, the profiler still shows the qpeft:: ops, ``use_backend`` still picks the kernel.
"""

from __future__ import annotations

import pytest
import torch

import qpeft
import qpeft.functional as qf
from qpeft import _checks, _native
from qpeft import autograd as qautograd
from qpeft.backends.cpu import qlora as cpu_qlora
from qpeft.nn import QLoRALinear

from ._helpers import CASES, case_id, check_qlora_linear, make_problem

SMALL_CASES = [c for c in CASES if c[0] != torch.bfloat16] + [
    (torch.float32, 9, 64, 64, 8, "nf4", True, 64, True, False, False),  # two 8-row chunks, 1 row over
    (torch.float32, 16, 256, 256, 8, "nf4", True, 64, True, True, True),
    (torch.float32, 3, 7, 40, 3, "fp4", False, 32, True, True, True),  # k % blocksize: scalar GEMV
]


@pytest.fixture
def small_always(monkeypatch):
    monkeypatch.setattr(cpu_qlora, "SMALL_MAX_ELEMS", 1 << 30)
    monkeypatch.setattr(cpu_qlora, "SMALL_MAX_WORK", 1 << 40)
    monkeypatch.setattr(cpu_qlora, "SMALL_MAX_ROWS", 1 << 30)
    monkeypatch.setattr(cpu_qlora, "SMALL_BACKWARD_MAX_WORK", 1 << 40)
    monkeypatch.setattr(cpu_qlora, "SMALL_BACKWARD_MAX_ROWS", 1 << 30)


def _count(monkeypatch, name):
    calls = []
    real = getattr(cpu_qlora, name)

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(cpu_qlora, name, counting)
    return calls


@pytest.mark.parametrize("case", SMALL_CASES, ids=case_id)
def test_small_paths_within_oracle_bounds(case, small_always, monkeypatch):
    # forward and every gradient; bf16 x may compute in bf16 (CPU with bf16 dot products):
    # not these paths, so not listed
    fwd, bwd = _count(monkeypatch, "_small_forward"), _count(monkeypatch, "_small_backward")
    check_qlora_linear(make_problem(case), "cpu")
    assert fwd and bwd, "the one-call paths did not run"


@pytest.mark.parametrize("need", [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1), (1, 1, 1, 1)])
def test_small_backward_computes_only_what_is_asked(need, small_always):
    p = make_problem(SMALL_CASES[-2])
    st = p["state"]
    x, a, b = p["x"], p["a"], p["b"]
    quant = (
        p["packed"],
        st.absmax,
        st.state2.absmax,
        st.state2.code,
        st.offset.reshape(1).float(),
        st.blocksize,
        st.state2.blocksize,
        st.quant_type,
        *st.shape,
    )
    xa = x @ a.T
    dy = torch.randn(x.shape[0], st.shape[0])
    args = (dy, x, *quant, a, b, xa, p["scaling"], p["rank_scale"], p["out_scale"], *map(bool, need))
    small = cpu_qlora.qlora_linear_backward(*args)
    with qpeft.use_backend("default"):
        ref = torch.ops.qpeft.qlora_linear_backward(*args)
    for i, (got, want, asked) in enumerate(zip(small, ref, need)):
        if not asked:
            assert got.numel() == 0
            continue
        # dbias is torch's sum as in the reference: equal bit for bit
        tol = 0 if i == 3 else 1e-4
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    ptrs = [t.data_ptr() for t in small if t.numel()]
    assert len(set(ptrs)) == len(ptrs)  # outputs never alias


def test_small_backward_of_a_frozen_layer(small_always, monkeypatch):
    # Linear4bit (no adapter): x is a zero-stride stand-in the backward must not read
    from qpeft.nn import Linear4bit

    bwd = _count(monkeypatch, "_small_backward")
    lin = torch.nn.Linear(64, 24)
    layer = Linear4bit.from_linear(lin)
    x = torch.randn(12, 64, requires_grad=True)
    layer(x).sum().backward()
    w = layer.dequantize(torch.float32)
    torch.testing.assert_close(x.grad, torch.ones(12, 24) @ w, rtol=1e-5, atol=1e-5)
    assert bwd


@pytest.mark.parametrize("case", SMALL_CASES[-3:], ids=case_id)
def test_small_forward_equals_panel_path_within_fp32(case, monkeypatch):
    # same fp32 products, summed in another order (and the GEMV scales a block's sum by its
    # absmax instead of each decoded weight): within K * 2^-23 * sum|x||w| + the LoRA terms'
    p = make_problem(case)
    args = (p["x"], p["packed"], p["state"], p["a"], p["b"], p["scaling"], p["bias"])
    kw = {"rank_scale": p["rank_scale"], "out_scale": p["out_scale"]}
    with qpeft.use_backend("cpu"), torch.no_grad():
        monkeypatch.setattr(cpu_qlora, "SMALL_MAX_ELEMS", 1 << 30)
        small = qf.qlora_linear(*args, **kw)
        monkeypatch.setattr(cpu_qlora, "SMALL_MAX_ELEMS", 0)
        panel = qf.qlora_linear(*args, **kw)
    w = p["w"].float()
    k = w.shape[1]
    mag = p["x"].float().abs() @ w.abs().T
    xa = p["x"].float().abs() @ p["a"].float().abs().T
    mag = (
        mag
        + abs(p["scaling"])
        * (xa * (1 if p["rank_scale"] is None else p["rank_scale"].abs()))
        @ p["b"].float().abs().T
    )
    if p["out_scale"] is not None:
        mag = mag * p["out_scale"].abs()
    bound = 2 * (k + 8) * 2.0**-24 * mag + 1e-30
    assert bool(((small - panel).abs() <= bound + 2.0**-23 * panel.abs()).all())


def test_small_forward_returns_xa_for_the_backward(small_always):
    p = make_problem((torch.float32, 11, 30, 64, 4, "nf4", True, 64, True, False, False))
    x = p["x"].clone().requires_grad_()
    a, b = p["a"].clone().requires_grad_(), p["b"].clone().requires_grad_()
    with qpeft.use_backend("cpu"):
        y = qf.qlora_linear(x, p["packed"], p["state"], a, b, p["scaling"], p["bias"])
    with qpeft.use_backend("default"):
        x2, a2, b2 = (t.detach().clone().requires_grad_() for t in (x, a, b))
        y2 = qf.qlora_linear(x2, p["packed"], p["state"], a2, b2, p["scaling"], p["bias"])
    dy = torch.randn_like(y)
    y.backward(dy)
    y2.backward(dy)
    for got, want in ((y, y2), (x.grad, x2.grad), (a.grad, a2.grad), (b.grad, b2.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_native_small_forward_checks_sizes():
    mod = _native.cpu_module()
    x = torch.randn(2, 64)
    packed, state = qf.quantize_4bit(torch.randn(8, 64), 64, "nf4", False)
    y = torch.empty(2, 8)
    a = torch.randn(4, 64)
    b = torch.randn(8, 4)

    def call(**over):
        args = dict(
            x=x.data_ptr(),
            x_len=x.numel(),
            m=2,
            n=8,
            k=64,
            packed=packed.data_ptr(),
            packed_len=packed.numel(),
            absmax=state.absmax.data_ptr(),
            absmax_len=state.absmax.numel(),
            blocksize=64,
            quant_type=2,
            nested_absmax=0,
            nested_absmax_len=0,
            nested_code=0,
            offset=0,
            nested_blocksize=256,
            lora_a=a.data_ptr(),
            lora_a_len=a.numel(),
            lora_b=b.data_ptr(),
            lora_b_len=b.numel(),
            r=4,
            scaling=1.0,
            rank_scale=0,
            rank_scale_len=0,
            bias=0,
            bias_len=0,
            out_scale=0,
            out_scale_len=0,
            out=y.data_ptr(),
            out_len=y.numel(),
            xa=0,
            xa_len=0,
            num_threads=1,
        )
        args.update(over)
        mod.qlora_small_forward(**args)

    call()
    want = x @ qf.dequantize_4bit(packed, state).T + (x @ a.T) @ b.T
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    for over, msg in (
        ({"x_len": 127}, "x holds 127"),
        ({"out_len": 15}, "out holds 15"),
        ({"packed_len": 255}, "packed holds 255"),
        ({"lora_a_len": 255}, "lora_a holds 255"),
        ({"lora_b_len": 31}, "lora_b holds 31"),
        ({"bias": y.data_ptr(), "bias_len": 7}, "bias holds 7"),
        ({"xa": y.data_ptr(), "xa_len": 7}, "xa holds 7"),
        ({"m": 0}, "m must be"),
        ({"blocksize": 48}, "blocksize must be a power of two"),
    ):
        with pytest.raises(ValueError, match=msg):
            call(**over)


# --- the fast argument check ---------------------------------------------------------------


def test_fast_check_agrees_with_full_check():
    packed, state = qf.quantize_4bit(torch.randn(8, 64), 64, "nf4", True)
    n, k = 8, 64
    good = dict(x=torch.randn(3, k), a=torch.randn(2, k), b=torch.randn(n, 2), bias=torch.randn(n))
    variants = [
        {},
        {"bias": None},
        {"x": torch.randn(3, k + 1)},
        {"x": torch.randn(3, k, dtype=torch.float64)},
        {"x": torch.randn(3, k).to(torch.int32)},
        {"x": torch.randn(3, k).to_sparse()},
        {"a": torch.randn(2, k + 1)},
        {"a": torch.randn(0, k), "b": torch.randn(n, 0)},
        {"b": torch.randn(n + 1, 2)},
        {"b": torch.randn(n, 3)},
        {"bias": torch.randn(n + 1)},
        {"bias": torch.randn(1, n)},
        {"bias": torch.randn(n).to(torch.int64)},
        {"a": torch.randn(2, k).tolist()},
        {"x": torch.randn(k)},
        {"x": torch.randn(())},
    ]
    for over in variants:
        v = {**good, **over}
        fast = _checks._qlora_fast_ok(v["x"], packed, n, k, state.absmax, v["a"], v["b"], v["bias"])
        try:
            _checks.qlora_linear(v["x"], packed, state, v["a"], v["b"], v["bias"], None, None)
            full_ok = True
        except (TypeError, ValueError):
            full_ok = False
        assert not fast or full_ok, over  # the fast check never passes what the full one refuses
        if not full_ok:
            with pytest.raises((TypeError, ValueError)):
                qf.qlora_linear(v["x"], packed, state, v["a"], v["b"], 1.0, v["bias"])


# --- the per-state argument cache ----------------------------------------------------------


def _fresh_result(layer, x):
    """What the layer computes from a copy of its state (never seen by any cache)."""
    base = layer.base_layer
    st = base.quant_state
    copy = qpeft.QuantState.from_dict(
        {k: v.clone() for k, v in st.as_dict(packed=True).items()}, device="cpu"
    )
    with torch.no_grad():
        return qf.qlora_linear(
            x, base.weight.clone(), copy, layer.lora_A, layer.lora_B, layer.scaling, base.bias
        )


def _model(seed=0):
    torch.manual_seed(seed)
    q = QLoRALinear.from_linear(torch.nn.Linear(64, 48), r=4)
    with torch.no_grad():
        q.lora_B.normal_()
    return q


def test_state_args_rebuilt_after_requantize_and_load_state_dict():
    q = _model()
    x = torch.randn(5, 64)
    with torch.no_grad():
        y0 = q(x)
    torch.testing.assert_close(y0, _fresh_result(q, x), rtol=0, atol=0)
    q.base_layer.requantize_(torch.randn(48, 64))  # a new QuantState
    with torch.no_grad():
        y1 = q(x)
    torch.testing.assert_close(y1, _fresh_result(q, x), rtol=0, atol=0)
    assert not torch.equal(y0, y1)
    other = _model(seed=1)
    q.load_state_dict(other.state_dict())
    with torch.no_grad():
        y2 = q(x)
        torch.testing.assert_close(y2, other(x), rtol=0, atol=0)
    torch.testing.assert_close(y2, _fresh_result(q, x), rtol=0, atol=0)


def test_state_args_follow_in_place_changes_of_the_state():
    q = _model()
    x = torch.randn(5, 64)
    st = q.base_layer.quant_state
    with torch.no_grad():
        q(x)
        st.offset.add_(0.5)  # a value changed in place: the cached args view it
        torch.testing.assert_close(q(x), _fresh_result(q, x), rtol=0, atol=0)
        st.offset = st.offset.clone() * 0.5  # a field reassigned
        torch.testing.assert_close(q(x), _fresh_result(q, x), rtol=0, atol=0)
        st.state2.absmax = st.state2.absmax * 2  # a nested tensor replaced
        torch.testing.assert_close(q(x), _fresh_result(q, x), rtol=0, atol=0)
        st.state2.absmax.mul_(0.25)  # and changed in place
        torch.testing.assert_close(q(x), _fresh_result(q, x), rtol=0, atol=0)
        st.offset = st.offset.half()  # an fp16 offset: cast per call, never cached stale
        y = q(x)
        st.offset.add_(1.0)
        assert not torch.equal(q(x), y)
        torch.testing.assert_close(q(x), _fresh_result(q, x), rtol=0, atol=0)


# --- the dispatcher bypass ---------------------------------------------------------------


def test_direct_kernel_equals_the_op_and_follows_use_backend(monkeypatch):
    q = _model()
    x = torch.randn(12, 64, requires_grad=True)
    seen = []
    real = qautograd._op

    def spy(name, t):
        op = real(name, t)
        seen.append(isinstance(op, torch._ops.OpOverloadPacket))
        return op

    monkeypatch.setattr(qautograd, "_op", spy)
    y = q(x)
    y.sum().backward()
    g = x.grad.clone()
    assert seen == [False, False]  # both kernels called directly
    # the same through the dispatcher (a profiler is recording): bit for bit
    x.grad = None
    with torch.profiler.profile() as prof:
        y2 = q(x)
        y2.sum().backward()
    assert seen[2:] == [True, True]
    names = {e.key for e in prof.key_averages()}
    assert {"qpeft::qlora_linear", "qpeft::qlora_linear_backward"} <= names
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, g, rtol=0, atol=0)
    # use_backend: the direct call runs the forced backend's kernel
    with qpeft.use_backend("default"), torch.no_grad():
        y3 = q(x)
        op = real("qlora_linear", x)
    assert op is qpeft._dispatch.kernels_of("default")["qlora_linear"]
    with torch.no_grad():
        want = qf.dequantize_4bit(q.base_layer.weight, q.base_layer.quant_state)
        ref = x @ want.T + q.base_layer.bias + q.scaling * (x @ q.lora_A.T) @ q.lora_B.T
    torch.testing.assert_close(y3, ref, rtol=1e-5, atol=1e-5)


def test_native_small_backward_checks_sizes():
    mod = _native.cpu_module()
    m, n, k, r = 2, 8, 64, 4
    packed, state = qf.quantize_4bit(torch.randn(n, k), 64, "nf4", False)
    dy, x = torch.randn(m, n), torch.randn(m, k)
    a, b, xa = torch.randn(r, k), torch.randn(n, r), torch.randn(m, r)
    dx, da, db = torch.empty(m, k), torch.empty(r, k), torch.empty(n, r)

    def call(**over):
        args = dict(
            grad_y=dy.data_ptr(),
            grad_y_len=dy.numel(),
            x=x.data_ptr(),
            x_len=x.numel(),
            m=m,
            n=n,
            k=k,
            packed=packed.data_ptr(),
            packed_len=packed.numel(),
            absmax=state.absmax.data_ptr(),
            absmax_len=state.absmax.numel(),
            blocksize=64,
            quant_type=2,
            nested_absmax=0,
            nested_absmax_len=0,
            nested_code=0,
            offset=0,
            nested_blocksize=256,
            lora_a=a.data_ptr(),
            lora_a_len=a.numel(),
            lora_b=b.data_ptr(),
            lora_b_len=b.numel(),
            xa=xa.data_ptr(),
            xa_len=xa.numel(),
            r=r,
            scaling=0.5,
            rank_scale=0,
            rank_scale_len=0,
            out_scale=0,
            out_scale_len=0,
            dx=dx.data_ptr(),
            dx_len=dx.numel(),
            da=da.data_ptr(),
            da_len=da.numel(),
            db=db.data_ptr(),
            db_len=db.numel(),
        )
        args.update(over)
        mod.qlora_small_backward(**args)

    call()
    w = qf.dequantize_4bit(packed, state)
    gs = (dy @ b) * 0.5
    torch.testing.assert_close(dx, gs @ a + dy @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(da, gs.T @ x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, dy.T @ (xa * 0.5), rtol=1e-5, atol=1e-5)
    for over, msg in (
        ({"grad_y_len": 15}, "grad_y holds 15"),
        ({"x_len": 127}, "x holds 127"),
        ({"dx_len": 127}, "dx holds 127"),
        ({"da_len": 255}, "da holds 255"),
        ({"db_len": 31}, "db holds 31"),
        ({"xa_len": 7}, "xa holds 7"),
        ({"lora_b_len": 31}, "lora_b holds 31"),
        ({"lora_a": 0}, "da and db need lora_a"),
        ({"packed_len": 255}, "qlora_small_backward: packed holds 255"),
        ({"absmax_len": 7}, "absmax holds 7"),
    ):
        with pytest.raises(ValueError, match=msg):
            call(**over)


@pytest.mark.parametrize("m", [3, 12])  # the GEMV (M <= 8) and the matmul path
def test_direct_kernel_of_linear4bit_equals_the_op(m):
    from qpeft.nn import Linear4bit

    layer = Linear4bit.from_linear(torch.nn.Linear(64, 32))
    x = torch.randn(m, 64, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    g = x.grad.clone()
    x.grad = None
    with torch.profiler.profile() as prof:  # the op path
        y2 = layer(x)
        y2.sum().backward()
    names = {e.key for e in prof.key_averages()}
    fwd = "qpeft::gemv_4bit" if m <= 8 else "qpeft::qlora_linear"
    assert {fwd, "qpeft::qlora_linear_backward"} <= names
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, g, rtol=0, atol=0)


def test_jit_trace_records_the_op():
    # torch.jit.trace records what reaches the dispatcher: the bypass must not run there
    # (it would bake the kernel's raw pointers into the graph)
    q = _model()
    x = torch.randn(4, 64)
    with torch.no_grad():
        traced = torch.jit.trace(q, x, check_trace=False)
        assert "qpeft::qlora_linear" in str(traced.graph)
        x2 = torch.randn(4, 64)
        torch.testing.assert_close(traced(x2), q(x2), rtol=0, atol=0)


def test_torch_function_mode_sees_the_op():
    from torch.overrides import TorchFunctionMode

    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    q = _model()
    x = torch.randn(4, 64)
    with torch.no_grad():
        want = q(x)
        with Record():
            got = q(x)
    assert any("qpeft.qlora_linear" in s for s in seen)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
