"""qpeft.convert on a meta-device model and qpeft.load_safetensors (docs/distributed.md,
"Loading on the meta device"): the loaded model equals the model loaded normally then
converted, bit for bit, and the loader holds one dense weight at a time."""

from __future__ import annotations

import warnings
import weakref

import pytest
import torch
from torch import nn

import qpeft
from qpeft import loading
from qpeft.nn import Linear4bit, QLoRALinear

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")


def _config(**kw):
    # blocksize 64: the attention projections hold 64 or 32 blocks (row shards cut nested
    # blocks of 256: fp32 shard absmax), the MLP's 512 (2 or 4 shards hold whole nested blocks
    # at world 2: nested views), so both forms of a double-quantized row range are compared
    base = dict(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    base.update(kw)
    return transformers.LlamaConfig(**base)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = _config()
    model = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path, safe_serialization=True, max_shard_size="40KB")
    assert len(list(path.glob("*.safetensors"))) > 1  # several shards
    return cfg, path


def _reference(cfg, path, **kw):
    model = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    return qpeft.convert(model, verbose=False, **kw)


def _meta(cfg, **kw):
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg).eval()
    return qpeft.convert(model, verbose=False, **kw)


def _assert_equal_weights(a, b):
    la = {n: m for n, m in a.named_modules() if isinstance(m, Linear4bit)}
    lb = {n: m for n, m in b.named_modules() if isinstance(m, Linear4bit)}
    assert la.keys() == lb.keys() and la
    for n in la:
        assert torch.equal(la[n].weight, lb[n].weight), n  # packed bytes and statistics
        assert torch.equal(la[n].weight.dequantize(), lb[n].weight.dequantize()), n
    pa = {
        n: p for n, p in a.named_parameters() if not isinstance(p, qpeft.Weight4bit) and "adapters" not in n
    }
    pb = {
        n: p for n, p in b.named_parameters() if not isinstance(p, qpeft.Weight4bit) and "adapters" not in n
    }
    assert pa.keys() == pb.keys()
    for n in pa:
        assert pa[n].dtype == pb[n].dtype and torch.equal(pa[n], pb[n]), n


def test_convert_on_meta_builds_meta_4bit_layers(checkpoint):
    cfg, _ = checkpoint
    model = _meta(cfg, r=4, blocksize=32, double_quant=False)
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, QLoRALinear) and layer.weight.is_meta
    w = layer.weight
    assert isinstance(w, qpeft.Weight4bit) and w.shape == (64, 512) and w.dtype == torch.float32
    assert w.quant_state.blocksize == 32 and not w.quant_state.nested and w.packed.shape == (64 * 512 // 2, 1)
    assert model.lm_head.weight.is_meta and not isinstance(model.lm_head, QLoRALinear)  # excluded
    assert str(model.qpeft_summary).endswith("weight memory: none allocated yet (meta device)")


@pytest.mark.parametrize(
    "method,double_quant,quant_type",
    [("lora", True, "nf4"), ("lora", False, "fp4"), ("ia3", True, "nf4"), ("quantize", False, "nf4")],
)
def test_meta_convert_then_load_equals_convert_of_loaded_model(checkpoint, method, double_quant, quant_type):
    cfg, path = checkpoint
    kw = dict(method=method, double_quant=double_quant, quant_type=quant_type)
    ref = _reference(cfg, path, **kw)
    model = qpeft.load_safetensors(_meta(cfg, **kw), path)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    _assert_equal_weights(model, ref)
    ids = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # LoRA B = 0: the adapters add nothing, whatever A's draw
        assert torch.equal(model(ids).logits, ref(ids).logits)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(n for n, p in ref.named_parameters() if p.requires_grad)
    for m in model.modules():
        if isinstance(m, loading.LoRAAdapter):  # initialized by the loader: A drawn, B zeros
            assert m.lora_A.abs().sum() > 0 and not m.lora_B.any() and m.lora_A.device.type == "cpu"


def test_meta_plain_lora_without_quantization_loads_dense_bases(checkpoint):
    cfg, path = checkpoint
    ref = _reference(cfg, path, quantize=False)
    model = qpeft.load_safetensors(_meta(cfg, quantize=False), path)
    dense_ref = {n: p for n, p in ref.named_parameters() if "adapters" not in n}
    got = dict(model.named_parameters())
    for n, p in dense_ref.items():
        assert torch.equal(got[n], p), n
    ids = torch.arange(10).reshape(2, 5)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_bf16_model_loads_bf16_dense_and_4bit(checkpoint):
    cfg, path = checkpoint
    ref = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ref = qpeft.convert(ref, verbose=False)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model = qpeft.load_safetensors(qpeft.convert(model, verbose=False), path)
    assert model.model.layers[1].self_attn.q_proj.weight.dtype == torch.bfloat16
    _assert_equal_weights(model, ref)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("rank,world", [(0, 2), (1, 2), (1, 4), (3, 4)])
def test_row_range_equals_slice_of_whole(checkpoint, double_quant, rank, world):
    cfg, path = checkpoint

    def rows(key, out):
        chunk = out // world
        return rank * chunk, (rank + 1) * chunk

    ref = _reference(cfg, path, double_quant=double_quant)
    model = qpeft.load_safetensors(_meta(cfg, double_quant=double_quant), path, rows=rows)
    refs = {n: m for n, m in ref.named_modules() if isinstance(m, Linear4bit)}
    forms = set()
    for n, m in model.named_modules():
        if isinstance(m, Linear4bit):
            r0, r1 = rows(n, m.out_features)
            whole = refs[n].weight
            part = whole._row_slice(r0, r1)
            assert m.weight.shape == part.shape
            assert torch.equal(m.weight.packed, part.packed), n
            assert torch.equal(m.weight.absmax, part.absmax), n
            assert m.weight.nested == part.nested
            if part.nested:
                assert torch.equal(m.weight.nested_absmax, part.nested_absmax)
                assert torch.equal(m.weight.offset, part.offset)
            assert torch.equal(m.weight.dequantize(), whole.dequantize()[r0:r1]), n
            forms.add(part.nested)
    if double_quant and world == 2:
        assert forms == {True, False}  # nested views and fp32 shard absmax both compared


def test_row_range_inside_a_block_is_refused(checkpoint):
    cfg, path = checkpoint
    model = _meta(cfg, blocksize=128, double_quant=False)  # K = 64: 2 rows per block
    with pytest.raises(ValueError, match="cut a quantization block"):
        qpeft.load_safetensors(model, path, rows=lambda key, out: (1, out))


def test_loader_holds_one_dense_weight_at_a_time(checkpoint, monkeypatch):
    """Every dense read of a 4-bit target is dead (freed) before the next one is made."""
    cfg, path = checkpoint
    live: list[weakref.ref] = []
    sizes: list[int] = []
    real = loading._read_rows

    def counting(sl, r0, r1, dtype, device):
        assert all(r() is None for r in live), "a previous dense weight is still alive"
        x = real(sl, r0, r1, dtype, device)
        live.append(weakref.ref(x))
        sizes.append(x.numel() * x.element_size())
        return x

    monkeypatch.setattr(loading, "_read_rows", counting)
    qpeft.load_safetensors(_meta(cfg), path, rows=lambda key, out: (0, out // 2))
    n_layers = cfg.num_hidden_layers * 7
    assert len(sizes) >= n_layers  # each target read (and the other halves streamed)
    assert all(r() is None for r in live)
    assert max(sizes) * n_layers > 4 * max(sizes)  # the model's dense total dwarfs what is held


def test_meta_refusals(checkpoint):
    cfg, path = checkpoint
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match="use_dora=True needs the base weights"):
        qpeft.convert(model, use_dora=True, verbose=False)
    lin = nn.Linear(64, 32, device="meta")
    lin.bias = nn.Parameter(torch.zeros(32))
    with pytest.raises(ValueError, match="bias elsewhere"):
        qpeft.convert(nn.Sequential(lin), verbose=False)
    # the checkpoint lacks a tensor the model needs
    with torch.device("meta"):
        bigger = transformers.LlamaForCausalLM(_config(num_hidden_layers=3))
    with pytest.raises(KeyError, match="missing from the checkpoint"):
        qpeft.load_safetensors(qpeft.convert(bigger, verbose=False), path)
    with pytest.raises(ValueError, match="checkpoint holds shape"):
        with torch.device("meta"):
            wide = transformers.LlamaForCausalLM(_config(intermediate_size=256))
        qpeft.load_safetensors(qpeft.convert(wide, verbose=False), path)


# --- FSDP2: fully_shard on the meta model, then each rank loads its own rows -----------------
def _fsdp_worker(rank: int, port: int, path: str) -> None:
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        cfg = transformers.LlamaConfig.from_pretrained(path)

        def shard(model):
            for layer in model.model.layers:
                fully_shard(layer)
            return fully_shard(model)

        ref = shard(_reference(cfg, path))
        reads: list[tuple[int, int]] = []
        real = loading._read_rows

        def counting(sl, r0, r1, dtype, device):
            reads.append((r0, r1))
            return real(sl, r0, r1, dtype, device)

        loading._read_rows = counting
        model = qpeft.load_safetensors(shard(_meta(cfg)), path)
        loading._read_rows = real
        # each rank quantized its own half of every 4-bit weight (the other half streamed
        # in chunks of at most that size, for the nested statistics)
        assert reads and all(r1 - r0 <= 256 for r0, r1 in reads)
        got = dict(model.named_parameters())
        n4 = 0
        for n, p in ref.named_parameters():
            local, mine = p.to_local(), got[n].to_local()
            if "adapters" in n:
                assert not mine.is_meta and (("lora_B" not in n) or not mine.any()), n
                continue
            if isinstance(local, qpeft.Weight4bit):
                n4 += 1
                assert isinstance(mine, qpeft.Weight4bit) and torch.equal(mine, local), n  # bytes and stats
            else:
                assert torch.equal(mine, local), n
        assert n4 == 14
        ids = torch.arange(14).reshape(2, 7) % cfg.vocab_size
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref(ids).logits)
        # to_empty would wipe a tensor already materialized: refused, naming it
        part = _meta(cfg)
        part.model.rotary_emb.inv_freq = torch.ones(part.model.rotary_emb.inv_freq.shape)
        with pytest.raises(ValueError, match="model.rotary_emb.inv_freq"):
            qpeft.load_safetensors(shard(part), path)
    finally:
        dist.destroy_process_group()


def test_fsdp2_each_rank_loads_its_rows(checkpoint):
    import socket

    import torch.multiprocessing as mp

    _, path = checkpoint
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the ranks inherit the imported torch, transformers and qpeft (spawn re-imports them)
    mp.start_processes(_fsdp_worker, args=(port, str(path)), nprocs=2, start_method="fork")


def test_tied_embeddings_load_once_and_stay_tied(tmp_path):
    cfg = _config(tie_word_embeddings=True)
    torch.manual_seed(3)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path, safe_serialization=True)
    ref = _reference(cfg, tmp_path)
    model = qpeft.load_safetensors(_meta(cfg), tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _assert_equal_weights(model, ref)
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def _small(name):
    t = transformers
    if name == "gemma":
        cfg = t.GemmaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=128,
        )
        return t.GemmaForCausalLM, cfg
    if name == "bert":
        cfg = t.BertConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, vocab_size=128
        )
        return t.BertModel, cfg
    if name == "gpt_neox":
        cfg = t.GPTNeoXConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, vocab_size=128
        )
        return t.GPTNeoXForCausalLM, cfg
    cfg = t.MixtralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=128,
    )
    return t.MixtralForCausalLM, cfg


@pytest.mark.parametrize("name", ["gemma", "bert", "gpt_neox"])
def test_other_architectures_load_as_from_pretrained(tmp_path, name):
    """Gemma's embed_scale and BERT's position_ids / token_type_ids are non-persistent buffers
    of modules that also hold parameters: their model's _init_weights sets them (they stayed
    on the meta device). GPT-NeoX's save_pretrained writes lm_head.weight as embed_out.weight,
    which transformers renames on load (its conversion mapping; it was a missing key)."""
    cls, cfg = _small(name)
    torch.manual_seed(0)
    cls(cfg).save_pretrained(tmp_path)
    ref = qpeft.convert(cls.from_pretrained(tmp_path).eval(), verbose=False)
    with torch.device("meta"):
        meta = cls(cfg).eval()
    model = qpeft.load_safetensors(qpeft.convert(meta, verbose=False), tmp_path)
    _assert_equal_weights(model, ref)
    bufs = dict(ref.named_buffers())
    for n, b in model.named_buffers():
        assert b.dtype == bufs[n].dtype and torch.equal(b, bufs[n]), n
    ids = torch.arange(16).reshape(2, 8)
    with torch.no_grad():
        out, want = model(ids), ref(ids)
    key = "last_hidden_state" if name == "bert" else "logits"
    assert torch.equal(out[key], want[key])


def test_checkpoint_keys_transformers_converts_are_refused_by_name(tmp_path):
    """Mixtral's save_pretrained writes per-expert w1/w2/w3 that transformers fuses into the
    experts' gate_up_proj / down_proj on load: not supported, said before anything is read."""
    cls, cfg = _small("mixtral")
    cls(cfg).save_pretrained(tmp_path)
    with torch.device("meta"):
        meta = cls(cfg)
    qpeft.convert(meta, verbose=False)
    with pytest.raises(
        NotImplementedError, match=r"MixtralForCausalLM.*experts\.0\.w1\.weight -> .*experts\.gate_up_proj"
    ):
        qpeft.load_safetensors(meta, tmp_path)
    assert all(p.is_meta for p in meta.parameters())


@pytest.mark.parametrize("double_quant", [True, False])
def test_meta_layer_state_dict_has_the_keys_of_a_real_one(double_quant):
    # a double-quantized layer's packed JSON holds the offset as a number; on the meta device
    # there is none to read (state_dict raised "Tensor.item() cannot be called on meta tensors")
    meta = Linear4bit(128, 64, double_quant=double_quant, device="meta")
    real = Linear4bit(128, 64, double_quant=double_quant)
    got, want = meta.state_dict(), real.state_dict()
    assert list(got) == list(want)
    for k, t in got.items():
        if "quant_state" in k:
            continue  # the packed JSON: its length follows the offset's digits
        assert t.is_meta and (t.shape, t.dtype) == (want[k].shape, want[k].dtype), k
    assert list(meta.state_dict(keep_vars=True)) == list(want)
    if double_quant:  # no values to load from: refused by name, not taken as offset 0
        with pytest.raises(RuntimeError, match="nested_offset.*has no value.*meta device"):
            real.load_state_dict(got)


@pytest.mark.parametrize("tied", [False, True])
def test_load_quantized_into_meta_model_equals_real_load(tmp_path, tied):
    # load_quantized reads model.state_dict(keep_vars=True) first (raised on a meta
    # double-quantized layer) and copied into meta tensors, which left them without data
    cfg = _config(tie_word_embeddings=tied)
    torch.manual_seed(4)
    path = tmp_path / "base.safetensors"
    qpeft.save_quantized(qpeft.convert(transformers.LlamaForCausalLM(cfg).eval(), verbose=False), path)
    ref = qpeft.load_quantized(transformers.LlamaForCausalLM(cfg).eval(), path)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg).eval()
    model = qpeft.load_quantized(model, path)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    _assert_equal_weights(model, ref)
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    buffers = dict(ref.named_buffers())
    for n, b in model.named_buffers():  # non-persistent ones (rotary inv_freq) computed
        assert torch.equal(b, buffers[n]), n
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_load_quantized_into_meta_converted_model(tmp_path):
    # a QLoRA model converted on the meta device: the base from the file, the adapters
    # initialized as load_safetensors initializes them (A drawn, B zeros)
    cfg = _config()
    torch.manual_seed(5)
    path = tmp_path / "base.safetensors"
    qpeft.save_quantized(qpeft.convert(transformers.LlamaForCausalLM(cfg).eval(), verbose=False), path)
    ref = qpeft.load_quantized(qpeft.convert(transformers.LlamaForCausalLM(cfg).eval(), verbose=False), path)
    model = qpeft.load_quantized(_meta(cfg), path)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    _assert_equal_weights(model, ref)
    for m in model.modules():
        if isinstance(m, loading.LoRAAdapter):
            assert m.lora_A.abs().sum() > 0 and not m.lora_B.any()
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_load_safetensors_refuses_a_4bit_checkpoint_by_name(tmp_path):
    # a bitsandbytes-layout checkpoint read as dense: the packed codes [n*k/2, 1] were taken
    # for the weight ("the checkpoint holds shape [1024, 1], the model's 4-bit layer [32, 64]")
    cfg = _config()
    torch.manual_seed(6)
    path = tmp_path / "model.safetensors"
    qpeft.save_quantized(qpeft.convert(transformers.LlamaForCausalLM(cfg).eval(), verbose=False), path)
    model = _meta(cfg, method="quantize")
    with pytest.raises(
        ValueError,
        match=r"already quantized to 4 bits \(it holds '.*(quant_state\.bitsandbytes__nf4|absmax)'",
    ):
        qpeft.load_safetensors(model, tmp_path)
    with pytest.raises(ValueError, match=r"qpeft\.load_quantized\(model, file\)"):
        qpeft.load_safetensors(model, path)
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])  # nothing was read
    ref = qpeft.load_quantized(transformers.LlamaForCausalLM(cfg).eval(), path)
    _assert_equal_weights(qpeft.load_quantized(model, path), ref)  # what the message says to do


def test_load_safetensors_refuses_a_bitsandbytes_checkpoint(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bnb = pytest.importorskip("bitsandbytes")
    from safetensors.torch import save_file

    lin = nn.Linear(64, 32)
    b = bnb.nn.Linear4bit(64, 32, quant_type="nf4", compress_statistics=True)
    b.load_state_dict(lin.state_dict())
    b = b.to("cpu")
    save_file({f"0.{k}": v.contiguous() for k, v in b.state_dict().items()}, tmp_path / "model.safetensors")
    with torch.device("meta"):
        model = qpeft.convert(nn.Sequential(nn.Linear(64, 32)), method="quantize", verbose=False)
    with pytest.raises(ValueError, match="already quantized to 4 bits"):
        qpeft.load_safetensors(model, tmp_path)
    qpeft.load_quantized(model, tmp_path / "model.safetensors")
    assert torch.equal(model[0].weight.packed, b.weight.data)
