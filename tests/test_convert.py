"""qpeft.convert on plain PyTorch models: targeting, freezing, the summary, atomicity and errors,
model-level adapter management, and 4-bit base weights through safetensors."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import qpeft
from qpeft.nn import IA3Linear, Linear4bit, QLoRALinear


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        return x + self.mlp(self.norm(self.q_proj(x) + self.v_proj(x)))


class Net(nn.Module):
    def __init__(self, d: int = 64, vocab: int = 50) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        for b in self.blocks:
            h = b(h)
        return self.lm_head(h)


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))


def test_all_linear_converts_and_freezes():
    net = _net()
    out = qpeft.convert(net, r=4, alpha=8, verbose=False)
    assert out is net
    converted = {n for n, m in net.named_modules() if isinstance(m, QLoRALinear)}
    assert converted == {f"blocks.{i}.{p}" for i in range(2) for p in ("q_proj", "v_proj", "mlp.0", "mlp.2")}
    assert isinstance(net.lm_head, nn.Linear)  # excluded by default
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {f"{c}.adapters.default.lora_{ab}" for c in converted for ab in "AB"}
    s = net.qpeft_summary
    # r * (in + out) per layer: q, v: 4*(64+64); mlp.0: 4*(64+128); mlp.2: 4*(128+64); two blocks
    assert s.converted == 8 and s.trainable_params == 2 * (512 + 512 + 768 + 768)
    # before: every fp32 parameter; after: the 4-bit weights as packed bytes + statistics
    fp32_linear = sum(
        4 * m.weight.numel() for m in _net().modules() if isinstance(m, nn.Linear) and m.out_features != 50
    )
    assert s.weight_bytes_before == 4 * sum(p.numel() for p in _net().parameters())
    packed = sum(m.base_layer.weight_bytes() for m in net.modules() if isinstance(m, QLoRALinear))
    adapters = 4 * s.trainable_params
    assert s.weight_bytes_after == s.weight_bytes_before - fp32_linear + packed + adapters
    assert "trainable parameters" in str(s) and "MiB" in str(s)
    y = net(IDS)
    y.sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_target_lists_regex_and_other_methods():
    net = qpeft.convert(_net(), target_modules=["q_proj", "mlp.2"], r=2, verbose=False)
    assert {n for n, m in net.named_modules() if isinstance(m, QLoRALinear)} == {
        "blocks.0.q_proj",
        "blocks.0.mlp.2",
        "blocks.1.q_proj",
        "blocks.1.mlp.2",
    }
    net = qpeft.convert(_net(), target_modules=r"blocks\.1\..*_proj", r=2, verbose=False)
    assert {n for n, m in net.named_modules() if isinstance(m, QLoRALinear)} == {
        "blocks.1.q_proj",
        "blocks.1.v_proj",
    }
    net = qpeft.convert(_net(), method="ia3", exclude=None, verbose=False)
    assert isinstance(net.lm_head, IA3Linear)
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {
        n for n, _ in net.named_parameters() if n.endswith("ia3_l")
    }
    net = qpeft.convert(_net(), method="quantize", blocksize=128, quant_type="fp4", verbose=False)
    assert isinstance(net.blocks[0].q_proj, Linear4bit) and net.blocks[0].q_proj.blocksize == 128
    assert net.qpeft_summary.trainable_params == 0
    net = qpeft.convert(_net(), r=2, quantize=False, use_dora=True, verbose=False)
    assert isinstance(net.blocks[0].v_proj.base_layer, nn.Linear)


class NetForSequenceClassification(nn.Module):
    """Named like a transformers task model: its task (SEQ_CLS) comes from the class name."""

    def __init__(self, d: int = 64, labels: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, d)
        self.blocks = nn.ModuleList([Block(d)])
        self.score = nn.Linear(d, labels, bias=False)

    def forward(self, ids):
        return self.score(self.blocks[0](self.embed(ids))[:, -1])


class NestedForSequenceClassification(NetForSequenceClassification):
    """RoBERTa's head: "classifier" is a module holding two linears."""

    def __init__(self, d: int = 64, labels: int = 3) -> None:
        super().__init__(d, labels)
        del self.score
        self.classifier = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, labels))

    def forward(self, ids):
        return self.classifier(self.blocks[0](self.embed(ids))[:, -1])


class NetForQuestionAnswering(NetForSequenceClassification):
    def __init__(self, d: int = 64) -> None:
        super().__init__(d)
        del self.score
        self.qa_outputs = nn.Linear(d, 2)

    def forward(self, ids):
        return self.qa_outputs(self.blocks[0](self.embed(ids)))


@pytest.mark.parametrize(
    ("cls", "head"),
    [
        (NetForSequenceClassification, "score"),
        (NestedForSequenceClassification, "classifier"),
        (NetForQuestionAnswering, "qa_outputs"),
    ],
)
def test_task_heads_stay_dense_and_trainable(cls, head):
    """PEFT's task models train their head in full (modules_to_save); convert used to freeze
    a freshly initialised head in 4 bits. The head is left as it was, whatever
    target_modules says, and stays trainable (frozen with method="quantize", where PEFT's
    task model makes its own trainable copy)."""
    torch.manual_seed(0)
    model = cls()
    head_params = {f"{head}.{n}" for n, _ in model.get_submodule(head).named_parameters()}
    net = qpeft.convert(model, r=2, verbose=False)
    layers = {n for n, m in net.named_modules() if isinstance(m, QLoRALinear)}
    assert layers == {"blocks.0.q_proj", "blocks.0.v_proj", "blocks.0.mlp.0", "blocks.0.mlp.2"}
    assert not any(isinstance(m, Linear4bit) for m in net.get_submodule(head).modules())
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == head_params | {f"{c}.adapters.default.lora_{ab}" for c in layers for ab in "AB"}
    n_head = sum(p.numel() for p in net.get_submodule(head).parameters())
    assert net.qpeft_summary.trainable_params == n_head + 2 * (128 + 128 + 192 + 192)
    # a head named in target_modules is still not converted, and alone selects nothing
    net = qpeft.convert(cls(), target_modules=["q_proj", head], r=2, verbose=False)
    assert {n for n, m in net.named_modules() if isinstance(m, QLoRALinear)} == {"blocks.0.q_proj"}
    with pytest.raises(ValueError, match=re.escape(f"selects no nn.Linear layer; the task heads ['{head}']")):
        qpeft.convert(cls(), target_modules=[head], verbose=False)
    net = qpeft.convert(cls(), method="ia3", verbose=False)
    assert head_params <= {n for n, p in net.named_parameters() if p.requires_grad}
    net = qpeft.convert(cls(), method="quantize", verbose=False)
    assert not any(isinstance(m, Linear4bit) for m in net.get_submodule(head).modules())
    assert net.qpeft_summary.trainable_params == 0


def test_plain_models_keep_their_heads_convertible():
    """Only task models named as transformers names them have heads kept: a "score" or
    "classifier" elsewhere is an ordinary linear."""

    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.score = nn.Linear(16, 16)
            self.classifier = nn.Linear(16, 4)

    net = qpeft.convert(Plain(), r=2, verbose=False)
    assert isinstance(net.score, QLoRALinear) and isinstance(net.classifier, QLoRALinear)


def test_save_adapter_refuses_a_quantized_task_head(tmp_path):
    """A head converted by hand cannot be saved as PEFT expects it (whole, in
    modules_to_save): a clear error instead of a directory PEFT fails on with a KeyError."""
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    net = qpeft.convert(NetForSequenceClassification(), r=2, verbose=False)
    net.score = QLoRALinear.from_linear(net.score, r=2)
    with pytest.raises(ValueError, match=r"\['score'\] is the task head of this SEQ_CLS model"):
        qpeft.save_adapter(net, tmp_path / "ad")
    qpeft.save_adapter(net, tmp_path / "ad", task_type="CAUSAL_LM")  # no head expected there


def test_disabled_adapters_give_exactly_the_quantized_base():
    net = qpeft.convert(_net(), r=4, verbose=False)
    for m in net.modules():
        if isinstance(m, QLoRALinear):
            nn.init.normal_(m.lora_B)
    quantized_only = qpeft.convert(_net(), method="quantize", verbose=False)
    with torch.no_grad():
        adapted = net(IDS)
        with qpeft.disable_adapters(net):
            base = net(IDS)
        assert torch.equal(base, quantized_only(IDS))
        assert not torch.equal(adapted, base)
        assert torch.equal(net(IDS), adapted)  # re-enabled on exit


def test_named_adapters_across_the_model():
    net = qpeft.convert(_net(), r=4, verbose=False)
    qpeft.add_adapter(net, "other", r=2, alpha=2)
    qpeft.set_adapter(net, "other")
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.other." in n for n in trainable)
    with pytest.raises(ValueError, match="already exists"):
        qpeft.add_adapter(net, "other")
    with pytest.raises(KeyError, match="missing"):
        qpeft.set_adapter(net, "missing")


def test_merge_adapters_model_level():
    net = qpeft.convert(_net(), r=4, verbose=False)
    for m in net.modules():
        if isinstance(m, QLoRALinear):
            nn.init.normal_(m.lora_B, std=0.1)
    with torch.no_grad():
        y = net(IDS)
        reports = qpeft.merge_adapters(net)
        assert len(reports) == 8 and all(0 < r.relative < 0.2 for r in reports.values())
        qpeft.unmerge_adapters(net)
        assert torch.equal(net(IDS), y)


def test_tied_module_is_converted_once_everywhere():
    net = _net()
    net.blocks[1].q_proj = net.blocks[0].q_proj  # one module under two names
    qpeft.convert(net, target_modules=["q_proj"], verbose=False)
    assert net.blocks[0].q_proj is net.blocks[1].q_proj
    assert isinstance(net.blocks[0].q_proj, QLoRALinear)
    assert net.qpeft_summary.converted == 1


def test_progress_line(capsys):
    qpeft.convert(_net(), r=2, progress=True, verbose=True)
    captured = capsys.readouterr()
    assert "qpeft.convert [" in captured.err and "8/8" in captured.err
    assert "qpeft.convert (lora): 8 linear layers" in captured.out


def _modules_and_flags(net: nn.Module):
    return [(n, id(m)) for n, m in net.named_modules()], [
        (n, p.requires_grad) for n, p in net.named_parameters()
    ]


@pytest.mark.parametrize("quantize", [True, False])
def test_failure_midway_leaves_the_model_untouched(quantize):
    """A NaN in the sixth linear's weight: quantization raises (quantize=True), or DoRA's
    magnitude init sees it (quantize=False, where the wrappers freeze the original layers
    before failing): either way every module and requires_grad flag is as before."""
    net = _net()
    with torch.no_grad():
        net.blocks[1].v_proj.weight[0, 0] = float("nan")
    net.embed.weight.requires_grad_(False)
    before = _modules_and_flags(net)
    if quantize:
        with pytest.raises(ValueError, match="non-finite"):
            qpeft.convert(net, r=2, verbose=False)
    else:
        original = QLoRALinear.add_adapter

        def failing(self, name, *args, **kwargs):
            if torch.isnan(self.base_layer.weight).any():
                raise RuntimeError("injected failure")
            return original(self, name, *args, **kwargs)

        QLoRALinear.add_adapter = failing
        try:
            with pytest.raises(RuntimeError, match="injected"):
                qpeft.convert(net, r=2, quantize=False, verbose=False)
        finally:
            QLoRALinear.add_adapter = original
    assert _modules_and_flags(net) == before
    assert not any(isinstance(m, (QLoRALinear, Linear4bit)) for m in net.modules())
    assert not hasattr(net, "qpeft_summary")


def test_bad_arguments():
    net = _net()
    for r in (0, -3):
        with pytest.raises(ValueError, match="positive integer"):
            qpeft.convert(net, r=r, verbose=False)
    with pytest.raises(TypeError, match=r"nn.Linear layers only.*embed \(Embedding\)"):
        qpeft.convert(net, target_modules=["embed", "q_proj"], verbose=False)
    with pytest.raises(TypeError, match=r"norm \(LayerNorm\)"):
        qpeft.convert(net, target_modules=r".*norm", verbose=False)
    with pytest.raises(ValueError, match="selects no nn.Linear"):
        qpeft.convert(net, target_modules=["nothing_here"], verbose=False)
    with pytest.raises(TypeError, match="unknown option"):
        qpeft.convert(net, use_dora=True, method="ia3", verbose=False)
    with pytest.raises(ValueError, match="method"):
        qpeft.convert(net, method="adalora", verbose=False)
    assert not any(isinstance(m, QLoRALinear) for m in net.modules())
    qpeft.convert(net, target_modules=["q_proj"], verbose=False)
    with pytest.raises(ValueError, match="already converted"):
        qpeft.convert(net, target_modules=["q_proj"], verbose=False)
    with pytest.raises(ValueError, match=r"in_features=64.*got an input with 32 features"):
        net.blocks[0].q_proj(torch.randn(3, 32))
    with pytest.raises(ValueError, match="no qpeft QLoRALinear"):
        qpeft.set_adapter(_net(), "default")
    mha = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2))
    with pytest.raises(TypeError, match="MultiheadAttention"):
        qpeft.convert(mha, target_modules=["out_proj"], verbose=False)
    qpeft.convert(mha, verbose=False)  # all-linear leaves the attention's projection alone
    assert isinstance(mha[0], QLoRALinear) and type(mha[1].out_proj) is not QLoRALinear


def test_save_and_load_quantized_base(tmp_path):
    """The base model without adapters, 4-bit layers in the bitsandbytes layout: loads into an
    unconverted model (its linears become Linear4bit) and into a converted one."""
    pytest.importorskip("safetensors")
    net = qpeft.convert(_net(), r=4, verbose=False)
    path = tmp_path / "base.safetensors"
    qpeft.save_quantized(net, path)
    import safetensors.torch as st

    keys = set(st.load_file(path))
    assert "blocks.0.q_proj.weight.quant_state.bitsandbytes__nf4" in keys and "blocks.0.v_proj.bias" in keys
    assert not any("adapters" in k or "base_layer" in k for k in keys)
    with torch.no_grad(), qpeft.disable_adapters(net):
        expected = net(IDS)
    fresh = qpeft.load_quantized(_net(seed=5), path)
    assert isinstance(fresh.blocks[1].mlp[2], Linear4bit)
    with torch.no_grad():
        assert torch.equal(fresh(IDS), expected)
    converted = qpeft.convert(_net(seed=6), r=4, verbose=False)
    qpeft.load_quantized(converted, path)
    with torch.no_grad(), qpeft.disable_adapters(converted):
        assert torch.equal(converted(IDS), expected)
    wrong = Net(d=32)
    with pytest.raises(ValueError, match="shape"):
        qpeft.load_quantized(wrong, path)
    assert isinstance(wrong.blocks[0].q_proj, nn.Linear)  # the swaps were undone


def test_nonfinite_weight_named_with_its_layer():
    """A weight with NaN/Inf: convert names the layer, and the advice applies to convert (the
    functional quantizer's allow_nonfinite is not a convert option)."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    with torch.no_grad():
        model[2].weight[3, 5] = float("nan")
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"converting '2': the weight holds 1 non-finite value.*exclude="):
        qpeft.convert(model)
    assert isinstance(model[0], torch.nn.Linear) and isinstance(model[2], torch.nn.Linear)  # nothing replaced
    assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(before, model.parameters()))
    qpeft.convert(model, exclude=["2"])
    assert isinstance(model[2], torch.nn.Linear)


def test_tied_linear_is_left_alone_or_refused():
    """A linear whose weight another module holds (a tied output layer): quantizing it untied
    the two silently, and model.tie_weights() then failed with KeyError ("attribute 'weight'
    already exists"). "all-linear" leaves it alone (the summary says so), naming it is
    refused, and quantize=False keeps the tie."""
    net = _net()
    net.embed = nn.Embedding(50, 64)
    net.lm_head.weight = net.embed.weight
    qpeft.convert(net, exclude=None, verbose=False)
    assert type(net.lm_head) is nn.Linear and net.lm_head.weight is net.embed.weight
    assert net.qpeft_summary.tied == ("lm_head",) and "(weight tied to another module's): lm_head" in str(
        net.qpeft_summary
    )
    fresh = _net()
    fresh.lm_head.weight = fresh.embed.weight
    with pytest.raises(ValueError, match=r"lm_head\.weight is tied to embed\.weight.*exclude=\['lm_head'\]"):
        qpeft.convert(fresh, target_modules=["lm_head", "q_proj"], exclude=None, verbose=False)
    assert not any(isinstance(m, QLoRALinear) for m in fresh.modules())  # nothing replaced
    qpeft.convert(fresh, target_modules=["lm_head"], exclude=None, quantize=False, verbose=False)
    assert fresh.lm_head.weight is fresh.embed.weight
    # assigning a wrapper's weight assigns its base layer's (how tie_weights() ties it again)
    fresh.lm_head.weight = fresh.embed.weight
    assert fresh.lm_head.base_layer.weight is fresh.embed.weight and "weight" not in fresh.lm_head._parameters
    # a 4-bit base refuses a dense weight with a TypeError naming the layers, not a KeyError
    with pytest.raises(
        TypeError, match=r"QLoRALinear\.weight is its base layer's: Linear4bit\.weight must be"
    ):
        net.blocks[0].q_proj.weight = nn.Parameter(torch.randn(64, 64))
    ia3 = qpeft.convert(_net(), method="ia3", verbose=False)
    with pytest.raises(TypeError, match=r"IA3Linear\.weight is its base layer's.*tie_weights"):
        ia3.blocks[0].q_proj.weight = nn.Parameter(torch.randn(64, 64))


def test_tied_llama_head_and_tie_weights():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=True,
    )
    model = qpeft.convert(transformers.LlamaForCausalLM(cfg), exclude=None, verbose=False)
    assert type(model.lm_head) is nn.Linear and model.qpeft_summary.tied == ("lm_head",)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("name", ["roberta", "bert"])
def test_all_linear_leaves_out_the_output_embeddings(name):
    """PEFT's all-linear leaves out model.get_output_embeddings() whatever its name; qpeft's
    left out only "lm_head", so RoBERTa's lm_head.decoder and BERT's cls.predictions.decoder
    were quantized, adapted and untied from the word embeddings."""
    transformers = pytest.importorskip("transformers")
    cls, cfg_cls = {
        "roberta": (transformers.RobertaForMaskedLM, transformers.RobertaConfig),
        "bert": (transformers.BertForMaskedLM, transformers.BertConfig),
    }[name]
    cfg = cfg_cls(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, vocab_size=128
    )
    torch.manual_seed(0)
    model = qpeft.convert(cls(cfg), verbose=False)
    out = model.get_output_embeddings()
    assert type(out) is nn.Linear and out.weight is model.get_input_embeddings().weight
    assert model.qpeft_summary.tied == ()  # left out as the output layer, before any tie check
    dense = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert len(dense) == 1  # every other linear (the MLM head's dense transform too) is converted
    # an explicit exclude replaces the default: the tied output layer is then left alone as tied
    model = qpeft.convert(cls(cfg), exclude=None, verbose=False)
    assert type(model.get_output_embeddings()) is nn.Linear and len(model.qpeft_summary.tied) == 1


def test_second_convert_keeps_earlier_adapters_trainable():
    """convert froze every parameter and re-enabled only its new layers, so a second call
    (all-linear skips converted layers) froze the adapters the first one made."""
    net = qpeft.convert(_net(), target_modules=["q_proj", "v_proj"], r=16, verbose=False)
    first = {n for n, p in net.named_parameters() if p.requires_grad}
    net.blocks[1].v_proj.lora_B.requires_grad_(False)  # what the user froze stays frozen
    qpeft.convert(net, r=4, verbose=False)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert first - {"blocks.1.v_proj.adapters.default.lora_B"} <= trainable
    assert "blocks.1.v_proj.adapters.default.lora_B" not in trainable
    mlp = {f"blocks.{i}.mlp.{j}.adapters.default.lora_{ab}" for i in range(2) for j in (0, 2) for ab in "AB"}
    assert trainable == (first - {"blocks.1.v_proj.adapters.default.lora_B"}) | mlp
    n = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert net.qpeft_summary.trainable_params == n == 16 * 128 * 3 + 16 * 64 + 4 * 192 * 4


def test_keep_dense_matcher_follows_transformers():
    from qpeft.convert import keep_dense_matcher

    class M(nn.Module):
        _keep_in_fp32_modules = ["wo", "layer.1", "mlp.gate"]

    keep = keep_dense_matcher(M())
    assert keep("encoder.block.0.layer.1.DenseReluDense.wo") and keep("layer.1.attn") and keep("mlp.gate")
    assert not keep("layer.11.attn") and not keep("mlp.gate_proj") and not keep("encoder.block.0.wi")
    M._keep_in_fp32_modules = None
    assert not keep_dense_matcher(M())("wo")


def test_keep_in_fp32_modules_stay_dense_and_load_in_transformers(tmp_path):
    """T5 keeps its wo layers out of bitsandbytes quantization (_keep_in_fp32_modules); convert
    quantized them, so transformers could not load save_quantized's file (size mismatch on
    DenseReluDense.wo.weight). They stay dense, with a 16-bit LoRA as PEFT gives them."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("safetensors")
    import json

    cfg = transformers.T5Config(
        vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4, decoder_start_token_id=0
    )
    torch.manual_seed(0)
    model = qpeft.convert(transformers.T5ForConditionalGeneration(cfg), verbose=False).eval()
    wo = ("encoder.block.0.layer.1.DenseReluDense.wo", "decoder.block.0.layer.2.DenseReluDense.wo")
    assert model.qpeft_summary.kept_dense == wo and "kept dense (model._keep_in_fp32_modules)" in str(
        model.qpeft_summary
    )
    for name in wo:
        layer = model.get_submodule(name)
        assert (
            isinstance(layer, QLoRALinear)
            and type(layer.base_layer) is nn.Linear
            and layer.lora_A.requires_grad
        )
    assert isinstance(model.get_submodule("encoder.block.0.layer.1.DenseReluDense.wi").base_layer, Linear4bit)
    qpeft.save_quantized(model, tmp_path / "model.safetensors")
    config = model.config.to_dict()
    config["quantization_config"] = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    ).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path, device_map="cpu")
    assert type(hf.get_submodule(wo[0])) is nn.Linear
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), qpeft.disable_adapters(model):
        ours = model(input_ids=ids, decoder_input_ids=ids).logits
        theirs = hf(input_ids=ids, decoder_input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    quantized = qpeft.convert(transformers.T5ForConditionalGeneration(cfg), method="quantize", verbose=False)
    assert type(quantized.get_submodule(wo[0])) is nn.Linear and quantized.qpeft_summary.kept_dense == wo


def test_convert_refuses_a_model_bitsandbytes_already_quantized(tmp_path):
    """bitsandbytes' Linear4bit subclasses nn.Linear: convert picked it and failed deep in the
    quantizer ("input must be float32, float16 or bfloat16, got torch.uint8"). It now names
    the layers and the way (save_pretrained, then qpeft.load_quantized), before any change."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=q, device_map="cpu")
    before = dict(model.named_modules())
    with pytest.raises(
        TypeError, match=r"q_proj \(Linear4bit\).*already bitsandbytes 4-bit.*qpeft\.load_quantized"
    ):
        qpeft.convert(model, verbose=False)
    assert dict(model.named_modules()) == before


def test_convert_all_linear_names_gpt2_conv1d_layers():
    """GPT-2's projections are transformers Conv1D layers: "all-linear" said only "selects no
    nn.Linear layer"; the message now names them and what to do."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=1, n_head=4, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg)
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn.*Conv1D.*nn\.Linear"):
        qpeft.convert(model, verbose=False)
