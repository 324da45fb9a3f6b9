"""One end-to-end QLoRA training step of the demo model (``python -m qpeft demo``'s
Llama-architecture model, built offline from a transformers config): forward, loss,
backward and optimizer step on a batch of 8 x 64 tokens, r = 8 on every projection.

Implementations: qpeft (``qpeft.convert`` + ``qpeft.optim.PagedAdamW``, the demo's
setup), the step's lower bound (``FLOOR``: the dense dequantized model without adapters)
and HF PEFT LoRA over bitsandbytes' ``Linear4bit`` (fp32 compute, the same
quantized bytes) with ``torch.optim.AdamW``. fp32 weights: the demo's dtype on CPU.
Two models: the demo's own, and the same with its FFN width rounded up to a multiple of
64 (where bitsandbytes computes correctly, see below).

Check: the first step's loss of each implementation equals, within 1e-4 relative, the
loss of the fp32 model whose projections hold the exactly dequantized 4-bit weights.
With B = 0 adapters the first forward is that network evaluated in another order; fp32
rounding over a few layers of width <= 688 moves a loss of ~5.5 by ~1e-6 relative, so
1e-4 leaves room while a wrong layer moves it by more.

bitsandbytes 0.50.2's CPU ``Linear4bit`` fails it on the demo's own model (FFN 688), and
not by rounding: its CPU ``dequantize_4bit`` (the native kernel, which its fp32 forward
and backward use) scales weight (r, c) of a [N, K] weight by absmax[r * (K // 64) +
c // 64], as if every row held whole blocks of 64, while the bytes (bitsandbytes' own
quantization, identical to qpeft's) were quantized in blocks of 64 over the flattened
tensor: the right scale is absmax[(r * K + c) // 64]. For the 688-wide down_proj (256 x
688) the two indices differ for 99.5% of the weights (all rows after the first), 90% of
the weights decode to another value (the rest share a quantized absmax or code 0): the
decoded weight matches code * absmax[row-restarted index] for every element, and an
x [512, 688] of standard normals gets an output 2.2% (relative norm) off x W^T (measured
on the 2-core VM of benchmarks/results/cpu.md; also wrong for K = 96, 176, 720; K = 344
and 100 decode right). That is what moves the first-step loss by 4.6e-4, not rounding
(which the 1e-4 bound covers 100 times over). ``_bnb_decode_fault`` re-derives this in every run from the
model's own layers and the failed check reports it; the 64-aligned model (FFN 704), whose
rows hold whole blocks, is where bitsandbytes computes the right network and is timed.

The 64-aligned model is timed once more with both implementations under
``torch.set_float32_matmul_precision("medium")`` (a user's opt-in to bf16 for fp32
matmuls): torch's own fp32 GEMMs then run bf16 on oneDNN (peft+bnb's dequantized-W
matmuls, the attention, lm_head) and qpeft's layers take their bf16 path on a CPU with
bf16 dot products (docs/design.md, "CPU compute dtype"), so both sides run under the same
user setting. Its check is the bf16 bound ``RTOL_BF16`` derived below.
"""

from __future__ import annotations

import copy

import torch

import qpeft
import qpeft.functional as qf

from ..harness import Case, Impl
from .peers import optional

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, SEQ, RANK, LR = 8, 64, 8, 1e-3


def _base(size: str, aligned: bool = False):
    """The demo model of ``size``; ``aligned``: its intermediate width rounded up to a
    multiple of 64, so that every row of every weight holds whole quantization blocks
    (the case bitsandbytes' CPU Linear4bit computes correctly)."""
    from qpeft import demo

    if not aligned:
        return demo.build_model(size, SEQ, seed=0)[0]
    saved = demo.SIZES[size]
    hidden, layers, heads, kv, inter = saved
    demo.SIZES[size] = (hidden, layers, heads, kv, -(-inter // 64) * 64)
    try:
        return demo.build_model(size, SEQ, seed=0)[0]
    finally:
        demo.SIZES[size] = saved


def _bnb_linear(lin):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        lin.in_features,
        lin.out_features,
        bias=lin.bias is not None,
        compute_dtype=torch.float32,
        compress_statistics=True,
        quant_type="nf4",
    )
    layer.weight = bnb.nn.Params4bit(
        lin.weight.data.clone(), requires_grad=False, compress_statistics=True, quant_type="nf4", blocksize=64
    )
    return layer.to("cpu")  # bitsandbytes quantizes on the move to a device


def _bnb_decode_fault(model) -> str | None:
    """How bitsandbytes' CPU ``dequantize_4bit`` decodes the model's 4-bit layers wrong, or
    None when every layer decodes right: each layer's decode against the code table times
    the absmax of the block holding each weight (the nested absmax decoded by
    bitsandbytes' own ``dequantize_blockwise``, so only the block index is in question)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf

    for name, m in model.named_modules():
        if not isinstance(m, bnb.nn.Linear4bit):
            continue
        qs = m.weight.quant_state
        n, k = qs.shape
        got = bf.dequantize_4bit(m.weight.data, qs).reshape(-1)
        absmax = qs.absmax if not qs.nested else bf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
        codes = m.weight.data.reshape(-1)
        q = torch.stack([codes >> 4, codes & 15], 1).reshape(-1).long()[: n * k]
        value = qs.code[q]
        i = torch.arange(n * k)
        right = value * absmax[i // qs.blocksize]
        off = (got - right).abs() > 1e-6 * right.abs()
        if not bool(off.any()):
            continue
        rowwise = (
            value
            * absmax[((i // k) * (k // qs.blocksize) + i % k // qs.blocksize).clamp(max=absmax.numel() - 1)]
        )
        same = bool(((got - rowwise).abs() <= 1e-6 * rowwise.abs()).all())
        how = (
            f"uses absmax[r*{k // qs.blocksize}+c//{qs.blocksize}], not [({k}r+c)//{qs.blocksize}]"
            if same
            else "uses a scale of neither its block nor its row-restarted one"
        )
        layer = name.replace(".base_layer", "").rsplit(".", 1)[-1]
        return f"bnb CPU dequantize_4bit: {layer} [{n}x{k}] W[r,c] {how} ({off.float().mean():.0%} of W)"
    return None


def _trainer(model, opt, ids):
    def step():
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


# The lower bound of any implementation's step: the fp32 model on the dequantized weights,
# frozen, no adapters, its backward run to the input embeddings (so through every layer: the
# forward and dx GEMMs on dense W and every other op of the model), no optimizer. Its first
# loss is the check's own ``want``. What a QLoRA step costs above it is the adapters (their
# products, weight gradients and optimizer step) and the 4-bit weights' decode.
FLOOR = "torch, dequantized W, frozen, no adapters (lower bound)"


def _floor_step(dequantized, ids):
    model = copy.deepcopy(dequantized)
    for p in model.parameters():
        p.requires_grad_(False)
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(True)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        emb.grad = None
        return loss.detach()

    return step


def cases(device: str, quick: bool) -> list[Case]:
    if device != "cpu" or optional("transformers") is None:
        return []
    size = "tiny" if quick else "small"
    return [
        _case(size, aligned=False),
        _case(size, aligned=True),
        _case(size, aligned=True, precision="medium"),
    ]


# The bound of the first-step loss under torch.set_float32_matmul_precision("medium"),
# relative. Every matmul then rounds its fp32 operands to bf16 (unit roundoff u = 2^-8)
# and accumulates in fp32 -- qpeft's bf16 path and torch's oneDNN alike -- so each
# product of a matmul moves by at most 2u relative and each output by at most
# 2u sum|x_i w_i|. On the demo model the loss is reached through D = 6 matmul levels per
# decoder layer (q/k/v, Q K^T, P V, o_proj; gate/up, down_proj) x 2 layers + lm_head =
# 13 levels; to first order the relative errors of sequential levels add, giving
# 2u * 13 = 0.10 of the magnitude sums that reach each logit, and dL/dz has an l1 norm
# <= 2 per token, so |dL| <= 2 max|dz|. That worst case (every rounding aligned, every
# sum without cancellation) is far from what happens: the roundings are independent with
# random signs, so their sum grows as sqrt(count). Measured (small demo model, 64-aligned,
# 2-core SPR-class VM): both implementations' first-step loss moved by 1.1e-5 relative
# from the highest-precision value. RTOL_BF16 = 2^-8 (one bf16 rounding of the loss
# itself) leaves ~350x over that and stays well under the 0.10 first-order worst case,
# while a missing LoRA term or a wrongly decoded W (percents) still fails. The loss of the
# dequantized fp32 model (``want``) is computed at the default precision, as for the
# other rows.
RTOL_BF16 = 2.0**-8


def _under(precision: str | None, fn):
    """fn run under torch's fp32 matmul ``precision`` (None: as it is), restored after."""
    if precision is None:
        return fn

    def run():
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(precision)
        try:
            return fn()
        finally:
            torch.set_float32_matmul_precision(before)

    return run


def _case(size: str, aligned: bool, precision: str | None = None) -> Case:
    base = _base(size, aligned)
    ids = torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    dequantized = copy.deepcopy(base)
    for name, m in dequantized.named_modules():
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in PROJ:
            with qpeft.use_backend("default"):
                m.weight.data = qf.dequantize_4bit(*qf.quantize_4bit(m.weight.data, 64, "nf4", True))
    with torch.no_grad():
        want = float(dequantized(input_ids=ids, labels=ids).loss)

    rtol = 1e-4 if precision is None else RTOL_BF16

    def close(loss, why=None):
        err = abs(float(loss) - want) / abs(want)
        assert err <= rtol, (
            f"first-step loss {float(loss):.6f}, the dequantized model's {want:.6f} ({err:.1e} off)"
            + (f": {why}" if why else "")
        )

    ours = copy.deepcopy(base)
    qpeft.convert(ours, r=RANK, alpha=2 * RANK, verbose=False)
    ours_opt = qpeft.optim.PagedAdamW(
        [p for p in ours.parameters() if p.requires_grad], lr=LR, weight_decay=0.0
    )
    impls = [Impl("qpeft convert + PagedAdamW", _under(precision, _trainer(ours, ours_opt, ids)), close)]
    impls.append(Impl(FLOOR, _under(precision, _floor_step(dequantized, ids)), close))
    peft, bnb = optional("peft"), optional("bitsandbytes")
    if peft is not None and bnb is not None:
        theirs = copy.deepcopy(base)
        for name, m in list(theirs.named_modules()):
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in PROJ:
                parent, _, attr = name.rpartition(".")
                setattr(theirs.get_submodule(parent), attr, _bnb_linear(m))
        theirs = peft.get_peft_model(
            theirs, peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=PROJ)
        )
        opt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
        fault = _bnb_decode_fault(theirs)
        impls.append(
            Impl(
                "peft+bnb + torch AdamW",
                _under(precision, _trainer(theirs, opt, ids)),
                lambda loss: close(loss, fault),
            )
        )
    params = sum(p.numel() for p in base.parameters())
    inter = base.config.intermediate_size
    label = (
        f"{size}{', FFN ' + str(inter) + ' (64-aligned)' if aligned else ''}: {params / 1e6:.1f}M params, "
        f"{BATCH}x{SEQ} tokens" + (f", fp32 matmul precision {precision!r}" if precision else "")
    )
    return Case("QLoRA training step (demo model)", label, impls)
