"""qpeft.Weight4bit: the 4-bit weight as a tensor subclass (docs/design.md, "The 4-bit weight tensor").

Every decode is compared bit for bit with ``qpeft.functional.dequantize_4bit`` of the source
weight: the subclass only moves, relabels and slices codes and statistics, it never
recomputes them (the one exception, fp32 absmax for a slice across a nested block, is the
same two fp32 roundings as the nested decode, so bit-identity is still the requirement).
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hst

import qpeft
from qpeft import Weight4bit
from qpeft import functional as qf
from qpeft.nn import Linear4bit, QLoRALinear
from qpeft.weight4bit import fp32_absmax


def _layer(out=48, inp=64, seed=0, **kw) -> Linear4bit:
    torch.manual_seed(seed)
    return Linear4bit.from_linear(torch.nn.Linear(inp, out), **kw)


def _weight(out, inp, blocksize=64, double_quant=True, quant_type="nf4", seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(out, inp, generator=g).to(dtype)
    return Weight4bit.from_float(dense, blocksize, quant_type, double_quant)


# --- the module's parameter ----------------------------------------------------------------------
def test_linear4bit_weight_is_a_frozen_weight4bit_parameter():
    layer = _layer()
    w = layer.weight
    assert isinstance(w, Weight4bit) and isinstance(w, torch.nn.Parameter)
    assert w.shape == (48, 64) and w.dtype == torch.float32 and not w.requires_grad
    assert w.packed.dtype == torch.uint8 and w.packed.shape == (48 * 64 // 2, 1)
    assert layer.quant_state is w.quant_state
    assert dict(layer.named_parameters())["weight"] is w
    assert torch.equal(w.dequantize(), qf.dequantize_4bit(w.packed, w.quant_state))
    assert torch.equal(layer.dequantize(), w.dequantize())
    # the functional API and the qpeft ops read a Weight4bit as its packed codes
    x = torch.randn(3, 64)
    assert torch.equal(
        qf.linear_4bit(x, w, layer.quant_state), qf.linear_4bit(x, w.packed, layer.quant_state)
    )
    st = w.quant_state
    direct = torch.ops.qpeft.dequantize_4bit(
        w.packed, fp32_absmax(st), st.blocksize, st.quant_type, [48, 64], torch.float32
    )
    assert torch.equal(
        torch.ops.qpeft.dequantize_4bit(
            w, fp32_absmax(st), st.blocksize, st.quant_type, [48, 64], torch.float32
        ),
        direct,
    )
    assert "Weight4bit(shape=(48, 64)" in repr(w) and "quant_type='nf4'" in repr(w)


def test_constructor_errors_name_the_problem():
    packed, state = qf.quantize_4bit(torch.randn(8, 64))
    with pytest.raises(TypeError, match="must be uint8"):
        Weight4bit(packed.float(), state)
    with pytest.raises(TypeError, match="plain tensor"):
        Weight4bit(Weight4bit(packed, state), state)
    _, state8 = qf.quantize_blockwise(torch.randn(300))
    with pytest.raises(TypeError, match="4-bit QuantState"):
        Weight4bit(packed, state8)
    layer = _layer()
    for dense in (torch.randn(48, 64), torch.nn.Parameter(torch.randn(48, 64))):
        with pytest.raises(TypeError, match="never on assignment"):
            layer.weight = dense  # a dense weight is not silently quantized


def test_quant_state_setter_and_plain_packed_assignment_keep_working():
    layer = _layer()
    other = _layer(seed=1)
    layer.weight = other.weight.packed.clone()  # plain uint8 codes: wrapped with the current state
    assert isinstance(layer.weight, Weight4bit) and layer.weight.quant_state is not other.quant_state
    layer.quant_state = other.quant_state
    assert layer.quant_state is other.quant_state
    assert torch.equal(layer.dequantize(), other.dequantize())


def test_weight_bytes_and_convert_count_the_4bit_storage():
    layer = _layer(256, 512)
    w = layer.weight
    expected = 256 * 512 // 2 + 256 * 512 // 64 + 4 * (-(256 * 512 // 64 // -256)) + 4
    assert layer.weight_bytes() == w.storage_bytes() == expected
    assert qpeft.convert.__module__  # the module, not shadowed
    from qpeft.convert import weight_bytes

    assert weight_bytes(layer) == expected + 256 * 4  # + the fp32 bias


# --- moves, copies, pickling ----------------------------------------------------------------------
def test_dtype_casts_relabel_never_touch_codes():
    layer = _layer()
    packed, absmax = layer.weight.packed.clone(), layer.quant_state.absmax.clone()
    half = copy.deepcopy(layer).to(torch.bfloat16)
    assert half.weight.dtype == torch.bfloat16 and half.quant_state.dtype == torch.bfloat16
    assert torch.equal(half.weight.packed, packed) and torch.equal(half.quant_state.absmax, absmax)
    assert half.quant_state.state2.absmax.dtype == torch.float32
    assert torch.equal(half.dequantize(torch.float32), layer.dequantize())
    assert half.dequantize().dtype == torch.bfloat16
    dbl = copy.deepcopy(layer).double()  # gradchecks cast modules to fp64: the 4-bit weight stays
    assert dbl.weight.dtype == torch.float32 and dbl.bias.dtype == torch.float64
    with pytest.raises(NotImplementedError, match="cannot become torch.int32"):
        layer.weight.to(torch.int32)
    assert layer.cpu().weight is layer.weight  # same device: nothing moves


def test_param_data_assignment_swaps_codes_and_state_together():
    """``param.data = w.data.to(fp32)`` (PEFT's prepare_model_for_kbit_training) keeps dtype,
    quant_state and codes in step; a dense tensor is refused rather than silently kept."""
    layer = _layer().to(torch.bfloat16)
    w = layer.weight
    other = _weight(48, 64, seed=3)
    w.data = w.data.to(torch.float32)
    assert w.dtype == torch.float32 and layer.quant_state.dtype == torch.float32
    assert torch.equal(layer.dequantize(), _layer().dequantize())
    w.data = other
    assert w.packed is other.packed and layer.quant_state is other.quant_state
    assert torch.equal(layer.dequantize(), other.dequantize())
    with pytest.raises(TypeError, match="quantize it explicitly"):
        w.data = torch.zeros(48, 64)
    assert layer.weight is w and torch.equal(layer.dequantize(), other.dequantize())


def test_peft_prepare_model_for_kbit_training_keeps_the_4bit_weights_usable():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 16)).bfloat16()
    qpeft.convert(model, verbose=False)
    x = torch.randn(5, 64)
    want = [m.weight.dequantize(torch.float32) for m in model.modules() if isinstance(m, QLoRALinear)]
    peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    layers = [m for m in model.modules() if isinstance(m, QLoRALinear)]
    for layer, w in zip(layers, want, strict=True):
        assert layer.weight.dtype == layer.weight.quant_state.dtype == torch.float32
        assert torch.equal(layer.weight.dequantize(torch.float32), w)
    y = model(x)
    assert y.dtype == torch.float32 and bool(torch.isfinite(y).all())


def test_meta_device_move_and_to_empty():
    layer = _layer()
    m = copy.deepcopy(layer).to("meta")
    assert m.weight.device.type == "meta" and m.weight.packed.is_meta and m.quant_state.absmax.is_meta
    assert isinstance(m.weight, Weight4bit) and m.weight.shape == (48, 64)
    m.to_empty(device="cpu")
    assert isinstance(m.weight, Weight4bit) and m.weight.device.type == "cpu"
    assert torch.equal(m.dequantize(), torch.zeros(48, 64))  # empty_like: a zero weight
    m.load_state_dict(layer.state_dict())
    x = torch.randn(4, 64)
    assert torch.equal(m(x), layer(x))


def test_deepcopy_is_independent():
    layer = _layer()
    twin = copy.deepcopy(layer)
    assert (
        torch.equal(twin.weight, layer.weight)
        and twin.weight.packed.data_ptr() != layer.weight.packed.data_ptr()
    )
    assert twin.quant_state is not layer.quant_state and isinstance(twin.weight, torch.nn.Parameter)
    twin.weight.packed.zero_()
    assert not torch.equal(twin.weight, layer.weight)
    x = torch.randn(2, 64)
    assert not torch.equal(twin(x), layer(x))


@pytest.mark.parametrize("double_quant", [True, False])
def test_torch_save_and_weights_only_load(double_quant):
    layer = _layer(double_quant=double_quant, quant_type="fp4")
    buf = io.BytesIO()
    torch.save({"w": layer.weight, "sd": layer.state_dict()}, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=True)
    assert isinstance(back["w"], Weight4bit) and torch.equal(back["w"], layer.weight)
    assert back["w"].quant_state.quant_type == "fp4" and back["w"].nested == double_quant
    assert torch.equal(back["w"].dequantize(), layer.dequantize())
    fresh = Linear4bit(64, 48, quant_type="fp4", double_quant=double_quant)
    fresh.load_state_dict(back["sd"])
    assert torch.equal(fresh.weight, layer.weight)


def test_whole_module_pickles():
    layer = QLoRALinear(_layer(), r=4)
    x = torch.randn(3, 64)
    layer(x)
    layer.base_layer(x[:1])  # both layers now hold a C++ call plan (when the module is built)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    # a plan belongs to its process and object: never pickled (a spawned process that
    # unpickled one called the C++ module it had not loaded)
    assert "_fast_plan" not in back.__dict__ and "_fast_plan" not in back.base_layer.__dict__
    assert torch.equal(back(x), layer(x)) and isinstance(back.base_layer.weight, Weight4bit)
    # the weight comes back a parameter (it came back a bare tensor, and a merged layer's
    # unmerge then failed to assign it), also through torch.load(weights_only=True)
    assert isinstance(back.base_layer.weight, torch.nn.Parameter)
    with torch.no_grad():
        layer.lora_B.normal_()
    want = layer(x)
    layer.merge()
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    back.unmerge()
    assert isinstance(back.base_layer.weight, torch.nn.Parameter) and torch.equal(back(x), want)
    buf = io.BytesIO()
    torch.save({"w": back.base_layer.weight, "plain": back.base_layer.weight.detach()}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert isinstance(loaded["w"], torch.nn.Parameter) and not isinstance(loaded["plain"], torch.nn.Parameter)
    assert isinstance(loaded["plain"], Weight4bit) and torch.equal(loaded["w"], loaded["plain"])


def test_bias_of_a_biasless_layer_is_unexpected():
    """A checkpoint's bias loaded into a layer without one is reported (strict: an error),
    as nn.Linear does; it was silently dropped."""
    src = Linear4bit.from_linear(torch.nn.Linear(64, 32, bias=True))
    dst = Linear4bit.from_linear(torch.nn.Linear(64, 32, bias=False))
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "bias"'):
        dst.load_state_dict(src.state_dict())
    result = dst.load_state_dict(src.state_dict(), strict=False)
    assert result.unexpected_keys == ["bias"] and result.missing_keys == []
    assert torch.equal(dst.weight, src.weight)
    # the other way: the missing bias is missing
    result = src.load_state_dict(dst.state_dict(), strict=False)
    assert result.missing_keys == ["bias"] and result.unexpected_keys == []


def test_bitsandbytes_names():
    """bitsandbytes' Linear4bit keywords and Params4bit attribute names."""
    layer = Linear4bit(64, 32, True, quant_type="fp4", compress_statistics=False)
    w = layer.weight
    assert (w.quant_type, w.blocksize, w.compress_statistics, w.quant_storage) == (
        "fp4",
        64,
        False,
        torch.uint8,
    )
    assert not layer.double_quant and not w.nested
    assert Linear4bit(64, 32, compress_statistics=True, blocksize=128).weight.compress_statistics
    assert Linear4bit(64, 32, quant_storage=torch.uint8).weight.quant_storage == torch.uint8
    with pytest.raises(
        ValueError, match="quant_storage=torch.bfloat16: qpeft keeps the 4-bit codes as uint8"
    ):
        Linear4bit(64, 32, quant_storage=torch.bfloat16)
    with pytest.raises(ValueError, match="disagree"):
        Linear4bit(64, 32, double_quant=False, compress_statistics=True)


def _child_step(layer, x, out):
    """In a spawned process: the layer's output, and a visible in-place change to lora_B."""
    out.copy_(layer(x).detach())
    with torch.no_grad():
        layer.lora_B.add_(1.0)


def test_share_memory_shares_the_codes_and_statistics():
    """Module.share_memory() on a 4-bit layer (it crashed the process: torch moved the
    wrapper's empty placeholder storage): the codes, statistics and adapters are in shared
    memory, a spawned process computes the same output and its in-place update is seen."""
    import torch.multiprocessing as mp

    layer = QLoRALinear(_layer(), r=4)
    w = layer.base_layer.weight
    assert not w.is_shared()
    assert layer.share_memory() is layer
    assert w.is_shared() and all(t.is_shared() for t in w.inner_tensors())
    assert isinstance(layer.base_layer.weight, Weight4bit) and layer.base_layer.weight is w
    x = torch.randn(3, 64)
    want = layer(x).detach()
    b_before = layer.lora_B.detach().clone()
    out = torch.zeros_like(want).share_memory_()
    proc = mp.get_context("spawn").Process(target=_child_step, args=(layer, x, out))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 0
    assert torch.equal(out, want)
    assert torch.equal(layer.lora_B.detach(), b_before + 1.0)


# --- state dict ------------------------------------------------------------------------------------
def test_state_dict_keeps_the_bitsandbytes_layout():
    layer = _layer()
    sd = layer.state_dict()
    assert list(sd) == [
        "weight",
        "bias",
        "weight.absmax",
        "weight.quant_map",
        "weight.nested_absmax",
        "weight.nested_quant_map",
        "weight.quant_state.bitsandbytes__nf4",
    ]
    assert type(sd["weight"]) is torch.Tensor and sd["weight"].dtype == torch.uint8
    assert torch.equal(sd["weight"], layer.weight.packed)
    kv = layer.state_dict(keep_vars=True)
    assert kv["weight"] is layer.weight.packed


@pytest.mark.parametrize("assign", [False, True])
def test_meta_construction_then_load_state_dict(assign):
    layer = _layer(blocksize=128, quant_type="fp4")
    with torch.device("meta"):
        m = Linear4bit(64, 48, blocksize=128, quant_type="fp4")
    assert m.weight.is_meta and isinstance(m.weight, Weight4bit)
    if not assign:
        m.to_empty(device="cpu")  # the usual copy-load path: materialize, then copy
    m.load_state_dict(layer.state_dict(), assign=assign)
    assert m.weight.device.type == "cpu" and isinstance(m.weight, torch.nn.Parameter)
    x = torch.randn(5, 64)
    assert torch.equal(m(x), layer(x))


def test_bitsandbytes_linear4bit_state_dict_loads():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(3)
    lin = torch.nn.Linear(128, 32)
    theirs = bnb.nn.Linear4bit(128, 32, compute_dtype=torch.float32, quant_type="nf4")
    theirs.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
    theirs.bias = torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    theirs = theirs.to("cpu")
    ours = Linear4bit(128, 32)
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.weight.packed, theirs.weight.data)
    assert torch.equal(
        ours.dequantize(), bnb.functional.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state)
    )


# --- compile ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_of_a_linear4bit_forward(backend):
    layer = _layer(40, 64, seed=5)
    x = torch.randn(16, 64)
    want = layer(x)
    torch._dynamo.reset()
    got = torch.compile(layer, backend=backend)(x)
    assert torch.equal(got, want)


# --- ops -----------------------------------------------------------------------------------------
def test_detach_aliases_clone_copies():
    w = _weight(8, 64)
    d = w.detach()
    assert isinstance(d, Weight4bit) and d.packed is w.packed and d.quant_state is w.quant_state
    c = w.clone()
    assert torch.equal(c, w) and c.packed.data_ptr() != w.packed.data_ptr()
    c.packed.zero_()
    assert not torch.equal(c, w)


@pytest.mark.parametrize("double_quant", [True, False])
def test_empty_like_new_zeros_and_copy(double_quant):
    w = _weight(16, 64, double_quant=double_quant)
    for z in (torch.empty_like(w), w.new_zeros((16, 64)), torch.zeros_like(w)):
        assert isinstance(z, Weight4bit) and z.nested == double_quant
        assert torch.equal(z.dequantize(), torch.zeros(16, 64))
    # another size keeps double quantization only with whole nested blocks (256 blocks of 64)
    assert w.new_zeros((8, 64)).nested is False and not w.new_empty((8, 64)).nested
    assert w.new_zeros((256, 64)).nested == double_quant
    assert torch.equal(w.new_zeros((8, 64)).dequantize(), torch.zeros(8, 64))
    z = torch.empty_like(w)
    z.copy_(w)
    assert torch.equal(z, w) and z.packed.data_ptr() != w.packed.data_ptr()
    flat = _weight(16, 64, double_quant=False).new_zeros((16, 64))
    flat.copy_(w)  # into fp32 absmax: the decode is bit for bit the source's
    assert torch.equal(flat.dequantize(), w.dequantize())
    with pytest.raises(NotImplementedError, match="quantize it explicitly"):
        z.copy_(torch.randn(16, 64))
    with pytest.raises(ValueError, match="does not match"):
        z.copy_(_weight(8, 64, double_quant=double_quant))


def test_other_ops_refuse_instead_of_dequantizing():
    w = _weight(8, 64)
    x = torch.randn(2, 64)
    for what, fn in [
        ("add", lambda: w + 1),
        ("mm", lambda: x @ w.t()),
        ("linear", lambda: torch.nn.functional.linear(x, w)),
        ("sum", lambda: w.sum()),
        ("transpose", lambda: w.t()),
        ("mul", lambda: w * w),
        ("column slice", lambda: w[:, :32]),
    ]:
        with pytest.raises(NotImplementedError, match=r"dequantize\(\)|dim 0"):
            fn()
            pytest.fail(f"{what} did not raise")
    assert w.dequantize().shape == (8, 64)


def test_view_relabels_the_same_codes():
    w = _weight(8, 64)
    flat = w.view(-1)
    assert flat.shape == (512,) and flat.packed is w.packed
    assert torch.equal(flat.dequantize(), w.dequantize().reshape(-1))
    assert torch.equal(flat.view(8, 64).dequantize(), w.dequantize())
    with pytest.raises(RuntimeError, match="invalid"):
        w.view(7, 64)


# --- row slices and splits --------------------------------------------------------------------------
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("rows", [(0, 4), (4, 12), (12, 13), (5, 5), (0, 13)])
def test_aligned_row_slice_is_a_view(double_quant, rows):
    w = _weight(13, 64, double_quant=double_quant, blocksize=64)
    r0, r1 = rows
    s = w[r0:r1]
    want = w.dequantize()[r0:r1]
    # a row of 64 is one quantization block; one nested block of 256 absmax spans all 13 rows,
    # so a double-quantized slice is a view only when it keeps that whole nested block
    assert s.shape == (r1 - r0, 64) and torch.equal(s.dequantize(), want)
    view = not double_quant or (r0, r1) == (0, 13)
    assert s.nested == (double_quant and view)
    if r1 > r0:
        assert (s.packed.data_ptr() == w.packed.data_ptr() + r0 * 32) == view


def test_row_slice_view_writes_reach_the_parent():
    w = _weight(8, 64, double_quant=False)
    src = _weight(2, 64, double_quant=False, seed=9)
    w.narrow(0, 2, 2).copy_(src)
    assert torch.equal(w.dequantize()[2:4], src.dequantize())


def test_copy_into_a_nested_view_of_part_keeps_the_shared_offset():
    """512 rows of one block each: two nested blocks of 256 absmax, one offset for both. A copy
    into rows [0, 256) used to write the source's offset, moving rows 256.. by up to 24.5."""
    w = _weight(512, 64)
    other = Weight4bit.from_float(torch.randn(256, 64, generator=torch.Generator().manual_seed(5)) * 10 + 3)
    before, offset = w.dequantize(), w.offset.clone()
    top = w[:256]
    assert top.nested and top.packed.data_ptr() == w.packed.data_ptr()
    view = top.view(-1)  # views of the view write through the same way
    view.copy_(other.view(-1))
    after = w.dequantize()
    assert torch.equal(after[256:], before[256:]) and torch.equal(w.offset, offset)
    # the source's absmax re-expressed against the target's offset, as double quantization does
    codes, nested = qf.quantize_blockwise(fp32_absmax(other.quant_state) - offset, blocksize=256)
    assert torch.equal(w.absmax[:256], codes) and torch.equal(w.nested_absmax[:1], nested.absmax)
    assert torch.equal(w.packed[: 256 * 32], other.packed)
    src = other.dequantize()
    assert (after[:256] - src).abs().max() <= 0.02 * src.abs().max()
    # a source with the same offset (a slice of the same weight) is copied bit for bit
    twin = w.clone()
    w[256:].copy_(twin[:256])
    assert torch.equal(w.dequantize()[256:], twin.dequantize()[:256])
    assert torch.equal(w.dequantize()[:256], twin.dequantize()[:256])
    # the whole weight (a slice of all its rows too) still takes the source's offset
    z = torch.empty_like(w)
    z[0:512].copy_(w)
    assert torch.equal(z, w)


def test_row_slice_across_a_nested_block_holds_fp32_absmax():
    # 64 rows of 4 blocks each: nested blocks of 256 absmax hold 64 rows; rows 10..40 straddle none
    # but start inside one, so the slice re-expresses its absmax in fp32 (bit-identical decode)
    w = _weight(130, 256, double_quant=True)
    s = w[10:70]
    assert not s.nested and s.absmax.dtype == torch.float32
    assert torch.equal(s.dequantize(), w.dequantize()[10:70])
    with pytest.raises(NotImplementedError, match="would not reach the source"):
        s.copy_(s.clone())
    aligned = w[64:128]
    assert aligned.nested and torch.equal(aligned.dequantize(), w.dequantize()[64:128])


def test_row_slice_inside_a_block_is_refused():
    w = _weight(10, 48, blocksize=64)  # 48-element rows: blocks start every 4 rows
    with pytest.raises(ValueError, match=r"cut a quantization block.*multiples of 4"):
        w[1:5]
    assert torch.equal(w[4:8].dequantize(), w.dequantize()[4:8])
    # the FSDP hint names world sizes that work: 96 rows of 48 in blocks of 64 shard on
    # blocks when each shard is a multiple of 4 rows, i.e. worlds dividing 24
    with pytest.raises(ValueError, match=r"world size dividing 24 \(96 rows / 4\)"):
        _weight(96, 48, blocksize=64)[0:2]
    # too few rows for any world above 1 (8 rows of 64 in one block of 4096): said so, not
    # "a world size dividing 8 // 64" (0)
    with pytest.raises(ValueError, match="no FSDP world size above 1 shards these 8 rows"):
        _weight(8, 64, blocksize=4096)[0:4]


@settings(max_examples=25, deadline=None)
@given(
    rows=hst.integers(1, 40),
    inp=hst.sampled_from([32, 64, 96, 128, 256]),
    blocksize=hst.sampled_from([32, 64, 128]),
    double_quant=hst.booleans(),
    parts=hst.integers(1, 5),
    quant_type=hst.sampled_from(["nf4", "fp4"]),
)
def test_chunks_decode_to_the_whole(rows, inp, blocksize, double_quant, parts, quant_type):
    w = _weight(rows, inp, blocksize, double_quant, quant_type, seed=rows)
    step = -(rows // -parts)
    align = blocksize // math.gcd(inp, blocksize)
    full = w.dequantize()
    if step < rows and step % align:  # an inner chunk boundary inside a quantization block
        with pytest.raises(ValueError, match="cut a quantization block"):
            torch.chunk(w, parts, dim=0)
        return
    chunks = torch.chunk(w, parts, dim=0)
    assert all(isinstance(c, Weight4bit) for c in chunks)
    assert torch.equal(torch.cat([c.dequantize() for c in chunks]), full)
    sizes = [c.shape[0] for c in chunks]
    assert torch.equal(torch.cat([c.dequantize() for c in w.split(sizes)]), full)


def test_odd_element_count_tail():
    w = _weight(3, 5, blocksize=32, double_quant=False)  # 15 elements, padding nibble in the last byte
    assert torch.equal(w[0:3].dequantize(), w.dequantize())
    with pytest.raises(ValueError, match="cut a quantization block"):
        w[1:3]


def test_qlora_linear_over_a_weight4bit_base_still_trains():
    layer = QLoRALinear(_layer(), r=4)
    x = torch.randn(6, 64, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.lora_A.grad is not None and x.grad is not None
    assert layer.base_layer.weight.grad is None
    report = layer.merge()
    assert layer.base_layer.weight.dtype == torch.float32 and report.rms >= 0
    layer.unmerge()


def test_torch_distributed_checkpoint_state_dict_helpers_round_trip(tmp_path):
    """get_state_dict / set_state_dict (torch.distributed.checkpoint.state_dict) resolve every
    state-dict key as an attribute path; a DCP save of model + optimizer loads into a fresh
    model bit for bit and the next step matches."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def build(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))
        qpeft.convert(model, verbose=False)
        for layer in model.modules():
            if isinstance(layer, QLoRALinear):
                torch.nn.init.normal_(layer.lora_B)
        return model, qpeft.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def step(model, opt, x):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    x = torch.randn(6, 64)
    model, opt = build(0)
    step(model, opt, x)
    msd, osd = get_state_dict(model, opt)
    assert any(k.endswith("weight.quant_state.bitsandbytes__nf4") for k in msd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "no process group: single process"
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path))
        model2, opt2 = build(1)
        step(model2, opt2, x)  # state to be overwritten
        msd2, osd2 = get_state_dict(model2, opt2)
        dcp.load({"model": msd2, "optim": osd2}, checkpoint_id=str(tmp_path))
    set_state_dict(model2, opt2, model_state_dict=msd2, optim_state_dict=osd2)
    want, got = model.state_dict(), model2.state_dict()
    assert set(want) == set(got)
    for name, value in want.items():
        assert torch.equal(value, got[name]), name
    step(model, opt, x)
    step(model2, opt2, x)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(
            a.packed if isinstance(a, Weight4bit) else a, b.packed if isinstance(b, Weight4bit) else b
        )


def test_load_state_dict_keeps_the_parameter_order():
    layer = _layer()
    before = [name for name, _ in layer.named_parameters()]
    layer.load_state_dict(_layer(seed=5).state_dict())
    assert [name for name, _ in layer.named_parameters()] == before == ["weight", "bias"]
    assert list(layer.state_dict())[0] == "weight"
