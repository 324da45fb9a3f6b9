"""Regression tests for optimizer defects found by outside tests (issue 11).

A step that raises must change nothing (parameters, state, step counts, no
half-made state), so that fixing the cause and stepping again gives what an
uninterrupted run gives; bad hyperparameters and bad checkpoints are refused
when they come in (construction, add_param_group, load_state_dict), naming the
group, parameter and key, and a refused load leaves the optimizer as it was.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import qpeft.optim as qo

from .conftest import assert_bits_equal

ALL = [getattr(qo, name) for name in qo.__all__ if isinstance(getattr(qo, name), type)]
ALL = [cls for cls in ALL if issubclass(cls, qo.QpeftOptimizer) and cls is not qo.QpeftOptimizer]
ADAMW = [cls for cls in ALL if "AdamW" in cls.__name__]


def test_every_optimizer_is_covered():
    assert len(ALL) == 8 and len(ADAMW) == 4


def _params():
    g = torch.Generator().manual_seed(0)
    return [
        torch.nn.Parameter(torch.randn(40, 16, generator=g)),  # 8-bit state with min_8bit_size=256
        torch.nn.Parameter(torch.randn(7, generator=g)),  # fp32 state in every optimizer
        torch.nn.Parameter(torch.randn(16, 20, generator=g).t()),  # non-contiguous, 8-bit state
        torch.nn.Parameter(torch.randn(5, 3, generator=g)),
    ]


def _make(cls, ps):
    kw = {"min_8bit_size": 256} if "8bit" in cls.__name__ else {}
    return cls([{"params": ps[:2], "lr": 2e-3}, {"params": ps[2:]}], lr=1e-3, weight_decay=0.1, **kw)


def _set_grads(ps, i):
    g = torch.Generator().manual_seed(100 + i)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)


def _snapshot(opt, ps):
    """Bit-exact copies of the parameters and of everything in opt.state (read without
    indexing the defaultdict, which would insert)."""
    states = dict(opt.state)
    assert len(states) == sum(p in states for p in ps), "state of a parameter the test does not know"
    state = {
        i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in states[p].items()}
        for i, p in enumerate(ps)
        if p in states
    }
    return [p.detach().clone() for p in ps], state


def _assert_same(a, b, what):
    (pa, sa), (pb, sb) = a, b
    for i, (x, y) in enumerate(zip(pa, pb)):
        assert_bits_equal(x, y, f"{what}: param {i}")
    assert sa.keys() == sb.keys(), f"{what}: states of different parameters"
    for key in sa:
        assert sa[key].keys() == sb[key].keys(), what
        for k in sa[key]:
            if torch.is_tensor(sa[key][k]):
                assert_bits_equal(sa[key][k], sb[key][k], f"{what}: state {k}")
            else:
                assert sa[key][k] == sb[key][k], f"{what}: state {k}"


def _set_group(index, key, value):
    def cause(opt, ps):
        old = opt.param_groups[index][key]
        opt.param_groups[index][key] = value
        return lambda: opt.param_groups[index].__setitem__(key, old)

    return cause


def _bad_grad(make):
    def cause(opt, ps):
        ps[-1].grad = None
        ps[-1].grad = torch.zeros_like(ps[-1])
        ps[-1].grad.data = make(ps[-1])  # .data: torch's grad setter refuses these outright
        return lambda: None

    return cause


def _sparse_grad(opt, ps):
    ps[-1].grad = torch.randn(ps[-1].shape).to_sparse()
    return lambda: None


def _param_dtype(opt, ps):
    old = ps[-1].data
    ps[-1].grad = None
    ps[-1].data = old.double()
    ps[-1].grad = torch.randn(old.shape, dtype=torch.float64)
    return lambda: setattr(ps[-1], "data", old)


# Every cause hits the last group or its last parameter: before the fix the first
# group (or the first parameters) had been updated and every step count advanced.
CAUSES = {
    "nan lr": _set_group(1, "lr", math.nan),
    "string lr": _set_group(1, "lr", "0.1"),
    "nan beta1": _set_group(1, "betas", (math.nan, 0.99)),
    "beta2 of 1": _set_group(1, "betas", (0.9, 1.0)),
    "negative weight_decay": _set_group(1, "weight_decay", -0.5),
    "grad shape": _bad_grad(lambda p: torch.randn(p.numel() + 1)),
    "grad dtype": _bad_grad(lambda p: torch.randn(p.shape, dtype=torch.float64)),
    "sparse grad": _sparse_grad,
    "param dtype": _param_dtype,
}


@pytest.mark.parametrize("cause", list(CAUSES))
@pytest.mark.parametrize("first_step", [False, True], ids=["later step", "first step"])
@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_failed_step_changes_nothing(cls, cause, first_step):
    ref_ps, ps = _params(), _params()
    ref, opt = _make(cls, ref_ps), _make(cls, ps)
    fail_at = 0 if first_step else 2
    for i in range(4):
        _set_grads(ref_ps, i)
        ref.step()
        _set_grads(ps, i)
        if i == fail_at:
            undo = CAUSES[cause](opt, ps)
            before = _snapshot(opt, ps)
            with pytest.raises((TypeError, ValueError)):
                opt.step()
            _assert_same(_snapshot(opt, ps), before, f"after the failed step of {cls.__name__}")
            undo()
            if first_step:  # no state was made, not even an empty one
                assert len(opt.state) == 0 and opt.state_dict()["state"] == {}
            _set_grads(ps, i)
        opt.step()
    _assert_same(_snapshot(opt, ps), _snapshot(ref, ref_ps), f"{cls.__name__} after retrying")
    assert opt.state[ps[0]]["step"] == 4


def test_failed_step_names_the_parameter_and_group():
    ps = _params()
    opt = _make(qo.AdamW, ps)
    _set_grads(ps, 0)
    ps[3].grad.data = torch.randn(16)
    with pytest.raises(ValueError, match=r"gradient of parameter 1 of param group 1 has shape \(16,\)"):
        opt.step()
    _set_grads(ps, 0)
    opt.param_groups[1]["eps"] = -1.0
    with pytest.raises(ValueError, match=r"Invalid epsilon value: -1.0 \(param group 1: eps must be"):
        opt.step()
    opt.param_groups[1]["eps"] = 1e-8
    del opt.param_groups[0]["betas"]
    with pytest.raises(ValueError, match="param group 0 has no 'betas' hyperparameter"):
        opt.step()


def test_replaced_parameter_is_refused_before_any_update():
    """A parameter given other data after its state was made (another size) is caught by
    the step's checks, not by the op after other parameters were updated."""
    ps = _params()
    opt = _make(qo.AdamW8bit, ps)
    _set_grads(ps, 0)
    opt.step()
    ps[3].data = torch.randn(4, 4)
    _set_grads(ps, 1)
    before = _snapshot(opt, ps)
    with pytest.raises(
        ValueError, match="state 'exp_avg' of parameter 1 of param group 1 is torch.float32 of 15"
    ):
        opt.step()
    _assert_same(_snapshot(opt, ps), before, "after the refused step")


# --- construction and add_param_group -----------------------------------------------------

BAD_HPARAMS = [
    ({"lr": "0.1"}, TypeError, "lr.* must be a real number, got str"),
    ({"lr": True}, TypeError, "lr.* must be a real number, got bool"),
    ({"lr": torch.tensor([1e-3, 1e-3])}, TypeError, "one-element real tensor"),
    ({"lr": math.nan}, ValueError, r"Invalid learning rate: nan \("),
    ({"lr": -1e-3}, ValueError, "Invalid learning rate: -0.001"),
    ({"lr": math.inf}, ValueError, "Invalid learning rate: inf"),
    ({"betas": (1.0, 0.9)}, ValueError, "Invalid beta parameter at index 0: 1.0"),
    ({"betas": (0.9, -0.1)}, ValueError, "Invalid beta parameter at index 1: -0.1"),
    ({"betas": (0.9, math.nan)}, ValueError, "Invalid beta parameter at index 1: nan"),
    ({"betas": (0.9,)}, TypeError, "betas.* must be a pair"),
    ({"betas": "ab"}, TypeError, "betas.* must be a pair"),
    ({"betas": (0.9, "x")}, TypeError, r"betas\[1\].* must be a real number"),
    ({"weight_decay": -0.1}, ValueError, "Invalid weight_decay value: -0.1"),
    ({"weight_decay": "0"}, TypeError, "weight_decay.* must be a real number"),
]
BAD_EPS = [
    ({"eps": -1e-8}, ValueError, "Invalid epsilon value: -1e-08"),
    ({"eps": math.nan}, ValueError, "Invalid epsilon value: nan"),
    ({"eps": None}, TypeError, "eps.* must be a real number, got NoneType"),
]


HPARAM_CASES = [
    (cls, *case)
    for cls in (qo.AdamW, qo.PagedAdamW8bit, qo.Lion8bit)
    for case in BAD_HPARAMS + (BAD_EPS if cls is not qo.Lion8bit else [])  # Lion has no eps
]


@pytest.mark.parametrize("cls,bad,exc,match", HPARAM_CASES)
def test_bad_hyperparameters_refused_at_construction_and_add_param_group(cls, bad, exc, match):
    with pytest.raises(exc, match=match):
        cls([torch.nn.Parameter(torch.randn(3))], **bad)
    with pytest.raises(exc, match=match):  # a group's own value
        cls([{"params": [torch.nn.Parameter(torch.randn(3))], **bad}])
    opt = cls([torch.nn.Parameter(torch.randn(3))])
    with pytest.raises(exc, match=match) as info:
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], **bad})
    assert "param group 1" in str(info.value)
    assert len(opt.param_groups) == 1


def test_add_param_group_refuses_bad_parameters_and_adds_nothing():
    opt = qo.AdamW([torch.nn.Parameter(torch.randn(3))])
    with pytest.raises(TypeError, match="parameter 1 of param group 1 has dtype torch.float64"):
        opt.add_param_group(
            {
                "params": [
                    torch.nn.Parameter(torch.randn(2)),
                    torch.randn(2, dtype=torch.float64, requires_grad=True),
                ]
            }
        )
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("cls", [qo.AdamW, qo.AdamW8bit, qo.Lion, qo.PagedAdamW8bit])
def test_group_flags_qpeft_does_not_implement_are_refused(cls):
    # torch.optim honours these per group; qpeft's steps do not implement them, so a group
    # that sets one is refused, never run without it (maximize=True descended)
    p = torch.nn.Parameter(torch.randn(300))
    for flag in ("maximize", "amsgrad", "capturable", "differentiable", "fused"):
        with pytest.raises(ValueError, match=f"param group 0 sets {flag}=True"):
            cls([{"params": [p], flag: True}])
    opt = cls([p], lr=1e-2)
    with pytest.raises(ValueError, match="param group 1 sets amsgrad=True"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], "amsgrad": True})
    assert len(opt.param_groups) == 1
    cls([{"params": [p], "maximize": False, "foreach": True}])  # falsy flags and foreach: fine
    p.grad = torch.randn(300)
    opt.param_groups[0]["maximize"] = True  # set after construction: the step refuses it
    before = p.detach().clone()
    with pytest.raises(ValueError, match="maximize=True"):
        opt.step()
    assert torch.equal(p, before) and len(opt.state) == 0


@pytest.mark.parametrize("cls", [qo.AdamW, qo.AdamW8bit, qo.Lion8bit])
def test_frozen_parameters_of_any_kind_accepted_and_a_4bit_gradient_refused(cls):
    # model.parameters() of a converted model holds frozen 4-bit weights (and a model may hold
    # frozen float64 or integer parameters): accepted and never stepped, as torch.optim and
    # bitsandbytes do. A gradient set by hand on a 4-bit weight is refused by name before any
    # update (it failed inside the op, after other groups had stepped).
    import qpeft

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(256, 512))
    qpeft.convert(m, r=4, alpha=8, verbose=False)
    w, a = m[0].base_layer.weight, m[0].adapters.default.lora_A
    frozen = [torch.nn.Parameter(torch.ones(3, dtype=torch.float64), requires_grad=False)]
    frozen.append(torch.nn.Parameter(torch.ones(3, dtype=torch.int8), requires_grad=False))
    opt = cls([{"params": [a]}, {"params": [w, *frozen]}], lr=1e-2)
    assert cls([p for p in m.parameters()], lr=1e-2).param_groups[0]["params"][0] is not None
    a.grad = torch.randn(a.shape)
    before = a.detach().clone()
    opt.step()  # the frozen ones have no gradient: skipped
    assert not torch.equal(a, before) and w not in opt.state
    with pytest.raises(TypeError, match="parameter 0 of param group 1 is a 4-bit quantized weight"):
        cls([{"params": [a]}, {"params": [torch.nn.Parameter(w.detach(), requires_grad=True)]}])
    w.grad = torch.randn(w.shape)
    before = a.detach().clone()
    with pytest.raises(TypeError, match="parameter 0 of param group 1 is a 4-bit quantized weight"):
        opt.step()
    assert torch.equal(a, before) and opt.state[a]["step"] == 1


@pytest.mark.parametrize("cls", [qo.AdamW, qo.AdamW8bit, qo.Lion])
def test_parameter_sharing_memory_refused_before_any_update(cls):
    q = torch.nn.Parameter(torch.randn(300))
    p = torch.randn(1).expand(8).requires_grad_()  # a leaf whose 8 elements are one
    opt = cls([q, p], lr=1e-2)
    q.grad, p.grad = torch.randn(300), torch.randn(8)
    before = q.detach().clone()
    with pytest.raises(ValueError, match="parameter 1 of param group 0 has elements that share memory"):
        opt.step()
    assert torch.equal(q, before) and len(opt.state) == 0


@pytest.mark.parametrize("cls", [qo.AdamW, qo.AdamW8bit, qo.Lion8bit])
def test_duplicate_parameter_in_a_group_refused(cls):
    p = torch.nn.Parameter(torch.randn(8192))
    with (
        pytest.raises(ValueError, match="parameter 1 of param group 0 appears twice"),
        pytest.warns(UserWarning),
    ):
        cls([p, p])
    opt = cls([torch.nn.Parameter(torch.randn(3))])
    with (
        pytest.raises(ValueError, match="parameter 2 of param group 1 appears twice"),
        pytest.warns(UserWarning),
    ):
        opt.add_param_group({"params": [p, torch.nn.Parameter(torch.randn(2)), p]})
    assert len(opt.param_groups) == 1


def test_tensor_and_int_hyperparameters_still_accepted():
    """The checks refuse what the step cannot use, not the forms torch.optim takes."""
    a, b = torch.nn.Parameter(torch.ones(5)), torch.nn.Parameter(torch.ones(5))
    opt_a = qo.AdamW([a], lr=torch.tensor(0.5), betas=[0, 0.5], weight_decay=0, eps=0)
    opt_b = qo.AdamW([b], lr=0.5, betas=(0.0, 0.5), weight_decay=0.0, eps=0.0)
    for p, o in ((a, opt_a), (b, opt_b)):
        p.grad = torch.full((5,), 2.0)
        o.step()
    assert_bits_equal(a.detach(), b.detach(), "tensor lr vs float lr")


# --- load_state_dict ----------------------------------------------------------------------


def _group(key, value):
    return lambda sd: sd["param_groups"][1].__setitem__(key, value)


def _state(key, value):
    return lambda sd: sd["state"][2].__setitem__(
        key, value(sd["state"][2][key]) if callable(value) else value
    )


BAD_LOADS = {
    "string lr": (_group("lr", "0.1"), r"lr of param group 1 of the loaded state dict must be a real number"),
    "beta1 1.5": (
        _group("betas", (1.5, 0.99)),
        r"Invalid beta parameter at index 0: 1.5 \(param group 1 of the loaded state dict",
    ),
    "nan weight_decay": (_group("weight_decay", math.nan), "Invalid weight_decay value: nan"),
    "no betas": (lambda sd: sd["param_groups"][1].pop("betas"), "param group 1 .* has no 'betas'"),
    "step 2**63": (
        _state("step", 2**63),
        "state 'step' of parameter 0 of param group 1 .*got int 9223372036854775808",
    ),
    "negative step": (_state("step", -1), "state 'step' of parameter 0 of param group 1 .*got int -1"),
    "float step": (_state("step", 2.5), "state 'step' .*got float 2.5"),
    "integral float step": (_state("step", 3.0), "state 'step' .*got float 3.0"),
    "bool step": (_state("step", True), "state 'step' .*got bool True"),
    "float tensor step": (_state("step", torch.tensor(3.0)), "state 'step' .*got Tensor"),
    "wrong-shaped state": (
        _state("exp_avg_q", lambda t: t[:8]),
        r"state 'exp_avg_q' of parameter 0 .*has shape \(8, 16\)",
    ),
    "wrong-dtype state": (
        _state("exp_avg_q", lambda t: t.float()),
        "state 'exp_avg_q' .*has dtype torch.float32",
    ),
    "absmax size": (
        _state("exp_avg_absmax", lambda t: t[:1]),
        r"state 'exp_avg_absmax' .*has shape \(1,\), expected \(2,\)",
    ),
    "state not a tensor": (
        _state("exp_avg_absmax", lambda t: t.tolist()),
        "state 'exp_avg_absmax' .*must be a tensor",
    ),
}


@pytest.mark.parametrize("case", list(BAD_LOADS))
@pytest.mark.parametrize("cls", [qo.AdamW8bit, qo.PagedLion8bit], ids=lambda c: c.__name__)
def test_bad_state_dict_refused_at_load_and_changes_nothing(cls, case):
    edit, match = BAD_LOADS[case]
    ps = _params()
    src = _make(cls, ps)
    _set_grads(ps, 0)
    src.step()
    sd = src.state_dict()
    edit(sd)

    ps2, ref_ps = _params(), _params()
    opt, ref = _make(cls, ps2), _make(cls, ref_ps)
    for p_list, o in ((ps2, opt), (ref_ps, ref)):
        _set_grads(p_list, 5)
        o.step()
    groups_before = [dict(g) for g in opt.param_groups]
    before = _snapshot(opt, ps2)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    _assert_same(_snapshot(opt, ps2), before, "after the refused load")
    assert opt.param_groups == groups_before
    for p_list, o in ((ps2, opt), (ref_ps, ref)):  # and it steps on as if nothing happened
        _set_grads(p_list, 6)
        o.step()
    _assert_same(_snapshot(opt, ps2), _snapshot(ref, ref_ps), "stepping after the refused load")


def test_largest_step_loads_and_steps():
    ps = _params()
    opt = _make(qo.AdamW, ps)
    _set_grads(ps, 0)
    opt.step()
    sd = opt.state_dict()
    for st in sd["state"].values():
        st["step"] = 2**63 - 2
    opt.load_state_dict(sd)
    opt.step()
    assert opt.state[ps[0]]["step"] == 2**63 - 1


# --- load_state_dict as torch's: hooks, copied group values (issue 12) ----------------


@pytest.mark.parametrize("cls", [torch.optim.AdamW, qo.AdamW, qo.AdamW8bit, qo.PagedLion8bit])
def test_load_state_dict_runs_pre_and_post_hooks(cls):
    p = torch.nn.Parameter(torch.randn(10))
    opt = cls([p], lr=1e-3)
    p.grad = torch.randn(10)
    opt.step()
    sd = opt.state_dict()
    calls = []

    def replace(o, d):
        assert o is opt and d is not sd and d == sd  # a shallow copy of what was passed
        calls.append("replace")
        d["extra"] = 1  # edits to the copy stay there
        return {**d, "param_groups": [dict(g, lr=0.123) for g in d["param_groups"]]}

    def edit_in_place(o, d):
        calls.append("edit")
        d["param_groups"][0]["weight_decay"] = 0.5  # the replacement: no copy of it is made

    opt.register_load_state_dict_pre_hook(edit_in_place)
    opt.register_load_state_dict_pre_hook(replace, prepend=True)
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("post", o.param_groups[0]["lr"])))
    opt.load_state_dict(sd)
    assert calls == ["replace", "edit", ("post", 0.123)]
    assert "extra" not in sd and sd["param_groups"][0]["lr"] == 1e-3
    assert opt.param_groups[0]["lr"] == 0.123 and opt.param_groups[0]["weight_decay"] == 0.5


@pytest.mark.parametrize("cls", [torch.optim.AdamW, qo.AdamW, qo.AdamW8bit, qo.Lion])
def test_load_state_dict_copies_group_values(cls):
    pa, pb = torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(10))
    src = cls([{"params": [pa], "betas": [0.9, 0.99]}], lr=torch.tensor(0.25))  # a list stays one
    dst = cls([pb], lr=torch.tensor(0.5))
    pa.grad = torch.randn(10)
    src.step()
    sd = src.state_dict()
    dst.load_state_dict(sd)
    group, saved = dst.param_groups[0], sd["param_groups"][0]
    assert group["lr"] is not saved["lr"] and group["betas"] is not saved["betas"]
    assert float(group["lr"]) == 0.25 and group["betas"] == [0.9, 0.99]
    assert "qpeft" not in group and group["params"] == [pb]
    torch.optim.lr_scheduler.LambdaLR(dst, lambda step: 0.5)  # fill_ on dst's lr tensor
    saved["betas"][0] = 0.5
    assert float(src.param_groups[0]["lr"]) == 0.25 and float(group["lr"]) == 0.125
    assert group["betas"] == [0.9, 0.99]


# --- copies of an optimizer (issue 12) -------------------------------------------------


def _copy(obj, how):
    if how == "deepcopy":
        return copy.deepcopy(obj)
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_copied_optimizer_steps_and_saves_as_the_original(cls, how):
    ps = _params()
    kw = {"min_8bit_size": 256} if "8bit" in cls.__name__ else {}
    opt = cls([{"params": ps[:2], "lr": 2e-3}, {"params": ps[2:]}], lr=1e-3, state_dict_layout="rows", **kw)
    _set_grads(ps, 0)
    opt.step()
    ps2, opt2 = _copy((ps, opt), how)
    assert (opt2.optim_bits, opt2.min_8bit_size, opt2.state_dict_layout, opt2.paged) == (
        opt.optim_bits,
        opt.min_8bit_size,
        "rows",
        opt.paged,
    )
    for i in range(1, 3):
        for p_list, o in ((ps, opt), (ps2, opt2)):
            _set_grads(p_list, i)
            o.step()
    _assert_same(_snapshot(opt2, ps2), _snapshot(opt, ps), f"{how} of {cls.__name__}")
    sd, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd2["qpeft"] == sd["qpeft"] and sd2["param_groups"] == sd["param_groups"]
    opt2.load_state_dict(sd)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_paged_state_gets_paged_memory_of_its_own(how):
    from qpeft._native import cpu_module

    from .test_optim import HostPagedMemory

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(400, 300), torch.nn.Linear(300, 10))  # 120k: paged
    opt = qo.PagedAdamW8bit(model.parameters(), state_memory=HostPagedMemory())
    model(torch.randn(8, 400)).pow(2).mean().backward()
    opt.step()
    live = cpu_module().host_buffers_live()
    model2, opt2 = _copy((model, opt), how)
    assert cpu_module().host_buffers_live() == live + 4  # the weight's two codes, two absmax
    old, new = opt.state[model[0].weight], opt2.state[model2[0].weight]
    for name in ("exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax"):
        assert new[name]._qpeft_paged and new[name].data_ptr() != old[name].data_ptr()
        assert_bits_equal(new[name], old[name], name)
    assert new["step"] == 1
    assert opt2.memory_report() == {
        **opt.memory_report(),
        "paged_device": 0,
        "paged_unknown": 469 * 8 + 240_000,
    }
    mem2 = opt2._pager.memory
    mem2.calls.clear()
    for m_, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m_(torch.randn(8, 400, generator=torch.Generator().manual_seed(1))).pow(2).mean().backward()
        o.step()
    assert mem2.calls == [("device", 120_000), ("device", 469)] * 2  # prefetches the copy's own state
    for a, b in zip(model.parameters(), model2.parameters()):
        assert_bits_equal(a.detach(), b.detach(), "copy vs original")


# --- state accounting of frozen parameters (issue 12) -----------------------------------


def test_state_bytes_leave_out_frozen_parameters_without_state():
    frozen = torch.nn.Parameter(torch.randn(64, 4096), requires_grad=False)
    small_frozen = torch.nn.Parameter(torch.randn(64), requires_grad=False)
    lora = torch.nn.Parameter(torch.randn(8, 4096))
    opt = qo.AdamW8bit([frozen, small_frozen, lora])
    assert opt.state_bytes() == [0, 0, 8 * 4096 * (2 + 8 / 256)]
    assert opt.state_bytes_per_param() == 2 + 8 / 256
    lora.grad = torch.randn_like(lora)
    opt.step()
    assert sum(opt.memory_report().values()) == sum(opt.state_bytes())
    # a parameter frozen after it got state keeps it, and it is counted
    lora.requires_grad_(False)
    assert opt.state_bytes() == [0, 0, 8 * 4096 * (2 + 8 / 256)]
    assert sum(opt.memory_report().values()) == sum(opt.state_bytes())
    assert qo.AdamW([frozen]).state_bytes_per_param() == 0.0
    assert qo.Lion([frozen, small_frozen, torch.nn.Parameter(torch.randn(5))]).state_bytes_per_param() == 4.0


# --- element-count arguments (issue 12) ---------------------------------------------------

BAD_NUMEL_ARGS = [
    (math.nan, TypeError, "must be an integer \\(elements\\), got float nan"),
    (2.5, TypeError, "must be an integer \\(elements\\), got float 2.5"),
    (4096.0, TypeError, "must be an integer \\(elements\\), got float 4096.0"),
    (True, TypeError, "must be an integer \\(elements\\), got bool True"),
    ("4096", TypeError, "must be an integer \\(elements\\), got str '4096'"),
    (None, TypeError, "must be an integer \\(elements\\), got NoneType None"),
    (-1, ValueError, "must be >= [01], got -1"),
]


@pytest.mark.parametrize("arg", ["min_8bit_size", "page_min_numel"])
@pytest.mark.parametrize("bad,exc,match", BAD_NUMEL_ARGS, ids=[repr(c[0]) for c in BAD_NUMEL_ARGS])
def test_bad_element_count_arguments_refused(arg, bad, exc, match):
    with pytest.raises(exc, match=f"^{arg} {match}"):
        qo.PagedAdamW8bit([torch.nn.Parameter(torch.randn(3))], **{arg: bad})


def test_element_count_arguments_take_integers():
    import numpy as np

    with pytest.raises(ValueError, match="^min_8bit_size must be >= 1, got 0"):
        qo.AdamW8bit([torch.nn.Parameter(torch.randn(3))], min_8bit_size=0)
    p = torch.nn.Parameter(torch.randn(300))
    opt = qo.PagedLion8bit([p], min_8bit_size=np.int64(256), page_min_numel=np.int32(0))
    assert type(opt.min_8bit_size) is int and type(opt._pager.page_min_numel) is int
    p.grad = torch.randn_like(p)
    opt.step()
    assert "exp_avg_q" in opt.state[p]
