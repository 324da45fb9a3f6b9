"""The 4-bit weight under FSDP2 and DDP (docs/distributed.md, "The 4-bit weight under FSDP2").

Two CPU ranks (gloo) in one ``torch.multiprocessing.spawn``; every check runs inside the
ranks and raises there (``spawn`` re-raises a rank's traceback here).

Exactness, and why equality (not a tolerance) is asserted for the losses and gradients: the
sharded model runs the same kernels on the same values as the unsharded reference in the same
process with the same thread count (1), because the all-gather moves the packed bytes and
statistics, whose decode is bit-identical (checked first). The only new arithmetic is the
mean of the two ranks' gradients: FSDP2 (pre-divide by 2, then a sum) and DDP (divide by 2,
then an all-reduce sum) form g0/2 + g1/2, the reference (g0 + g1)/2; halving is exact in
binary floating point and both round the one sum once, so the results are equal bit for bit
(away from subnormals, which these magnitudes do not reach). The derived tolerance is 0.
"""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _linear4bit(out, inp, blocksize, double_quant, seed=0):
    from qpeft.nn import Linear4bit

    torch.manual_seed(seed)
    return Linear4bit.from_linear(torch.nn.Linear(inp, out), blocksize=blocksize, double_quant=double_quant)


def _check_layer_shards(rank, mesh):
    from torch.distributed.fsdp import fully_shard

    from qpeft import Weight4bit

    # (out, in, blocksize, double quant, whether each shard keeps the nested statistics)
    cases = [
        (256, 512, 64, True, True),  # 1024 blocks per shard: whole nested blocks of 256
        (64, 128, 64, True, False),  # 64 blocks per shard: nested blocks straddle -> fp32 absmax
        (40, 48, 64, True, False),  # 960 elements per shard: 15 blocks of 64
        (48, 96, 32, False, False),
    ]
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(7))
    for out, inp, bs, dq, nested_shards in cases:
        layer = _linear4bit(out, inp, bs, dq, seed=out)
        full = layer.weight.clone()
        dense = layer.dequantize()
        y_ref = layer(x[:, :inp])
        fully_shard(layer, mesh=mesh)
        local = layer.weight.to_local()
        rows = out // WORLD
        assert isinstance(local, Weight4bit) and local.shape == (rows, inp), (out, inp, local)
        # each rank holds 1/world of the codes and of the statistics
        assert local.packed.numel() * WORLD == full.packed.numel()
        assert local.absmax.numel() * WORLD == full.absmax.numel()
        assert local.nested == nested_shards
        if nested_shards:
            assert local.nested_absmax.numel() * WORLD == full.nested_absmax.numel()
        full_bytes = full.storage_bytes()
        # fp32 absmax in a straddling shard: 4 bytes per block instead of 1 + a nested share
        bound = full.packed.numel() // WORLD + 4 * (full.absmax.numel() // WORLD) + 8
        assert local.storage_bytes() <= (full_bytes // WORLD + 8 if nested_shards or not dq else bound)
        assert torch.equal(local.dequantize(), dense[rank * rows : (rank + 1) * rows])
        # the all-gathered weight: bit-identical decode; with nested shards the same bytes
        layer.unshard()
        gathered = layer.weight
        assert isinstance(gathered, Weight4bit) and gathered.shape == (out, inp)
        assert torch.equal(gathered.dequantize(), dense)
        if nested_shards or not dq:
            assert torch.equal(gathered, full)
        layer.reshard()
        assert torch.equal(layer(x[:, :inp]), y_ref)  # forward under FSDP (a root stays unsharded after it)
        layer.reshard()
        assert isinstance(layer.weight.to_local(), Weight4bit)


def _full(sd: dict) -> dict:
    """The bias (a plain parameter) is a sharded DTensor under FSDP2; the 4-bit keys are whole."""
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in sd.items()}


def _check_state_dict(mesh):
    from torch.distributed.fsdp import fully_shard

    from qpeft.nn import Linear4bit

    # the state dict of a sharded layer gathers the 4-bit bytes: bitsandbytes' layout, one
    # tensor per layer; with whole nested blocks per shard, the original bytes
    layer = _linear4bit(256, 512, 64, True)
    sd = layer.state_dict()
    fully_shard(layer, mesh=mesh)
    got = _full(layer.state_dict())
    assert got.keys() == sd.keys() and all(torch.equal(v, sd[k]) for k, v in got.items())
    # straddling nested blocks: the gathered state has fp32 absmax, and decodes bit for bit
    layer = _linear4bit(64, 128, 64, True)
    dense = layer.dequantize()
    fully_shard(layer, mesh=mesh)
    fresh = Linear4bit(128, 64)
    fresh.load_state_dict(_full(layer.state_dict()))
    assert not fresh.quant_state.nested and torch.equal(fresh.dequantize(), dense)


def _check_dcp_state_dict(rank, mesh, tmp):
    # torch's state-dict APIs on a sharded Linear4bit (docs/distributed.md, "Checkpoints"):
    # every route back into a sharded layer gives the unsharded layer's output bit for bit
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    full_opts = StateDictOptions(full_state_dict=True)
    # whole nested blocks per shard; straddling nested blocks (fp32 shard absmax); no DQ
    for out, inp, dq in ((512, 128, True), (64, 128, True), (48, 96, False)):
        src = _linear4bit(out, inp, 64, dq, seed=3)
        ref = src.state_dict()
        x = torch.randn(3, inp, generator=torch.Generator().manual_seed(5))
        want = src(x)
        fully_shard(src, mesh=mesh)

        def fresh(out=out, inp=inp, dq=dq):
            layer = _linear4bit(out, inp, 64, dq, seed=4)  # other values, overwritten by each load
            fully_shard(layer, mesh=mesh)
            return layer

        sharded = get_model_state_dict(src)
        assert isinstance(sharded["weight"], DTensor) and isinstance(sharded["weight.absmax"], DTensor)
        assert sharded["weight"].to_local().numel() * WORLD == ref["weight"].numel()
        full = get_model_state_dict(src, options=full_opts)
        if dq and out == 512 or not dq:  # the unsharded layer's keys and bytes
            assert full.keys() == ref.keys() and all(torch.equal(full[k], ref[k]) for k in ref)
        path = os.path.join(tmp, f"dcp_{out}")
        dcp.save(sharded, checkpoint_id=path)
        layer = fresh()
        sd = get_model_state_dict(layer)
        dcp.load(sd, checkpoint_id=path)
        set_model_state_dict(layer, sd)
        assert torch.equal(layer(x), want), out
        if out == 512:  # whole nested shards: the unsharded layer's keys, so DCP crosses shardings
            plain = _linear4bit(out, inp, 64, dq, seed=4)
            sd = plain.state_dict()
            dcp.load(sd, checkpoint_id=path, no_dist=True)  # sharded checkpoint -> one process
            plain.load_state_dict(sd)
            assert torch.equal(plain(x), want)
            if rank == 0:
                dcp.save(ref, checkpoint_id=path + "_plain", no_dist=True)
            dist.barrier()
            layer = fresh()
            sd = get_model_state_dict(layer)
            dcp.load(sd, checkpoint_id=path + "_plain")  # unsharded checkpoint -> sharded
            set_model_state_dict(layer, sd)
            assert torch.equal(layer(x), want)
        layer = fresh()
        layer.load_state_dict(ref)  # a whole (unsharded) state dict into the sharded layer
        assert torch.equal(layer(x), want), out
        layer = fresh()
        set_model_state_dict(layer, dict(ref), options=full_opts)
        assert torch.equal(layer(x), want), out
        if out == 64:  # refused on every rank alike (no rank left waiting in a collective)
            with pytest.raises(NotImplementedError, match="broadcast_from_rank0"):
                set_model_state_dict(
                    fresh(),
                    dict(ref) if rank == 0 else {},
                    options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
                )


def _check_mixed_precision(mesh):
    # param_dtype relabels the gathered 4-bit weight (its codes are never cast); the adapters
    # are cast by FSDP2, so the result is the unsharded layer's in bf16, bit for bit
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from qpeft.nn import QLoRALinear

    torch.manual_seed(11)
    layer = QLoRALinear.from_linear(torch.nn.Linear(128, 64), r=4)
    torch.nn.init.normal_(layer.lora_B, std=0.05)
    x = torch.randn(6, 128)
    want = copy.deepcopy(layer).to(torch.bfloat16)(x.bfloat16())
    fully_shard(layer, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    got = layer(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert layer.base_layer.weight.dtype == torch.bfloat16  # the root stays unsharded after forward
    got.float().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.dtype == torch.float32


def _check_refusals(mesh):
    from torch.distributed.fsdp import fully_shard

    with pytest.raises(ValueError, match="cut a quantization block"):
        fully_shard(_linear4bit(10, 48, 64, True), mesh=mesh)  # 5 rows x 48 = 240 elements per shard
    uneven = _linear4bit(33, 64, 64, True)
    fully_shard(uneven, mesh=mesh)
    with pytest.raises(NotImplementedError, match="unevenly over 2 ranks"):
        uneven(torch.randn(2, 64))


def _check_single_rank_shard_group(rank):
    # HSDP with a shard dimension of 1 (as on one process): FSDP2 skips the all-gather and
    # copies only the first all-gather input, so the statistics travel as metadata
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from qpeft.nn import QLoRALinear

    mesh = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("replicate", "shard"))
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(5))
    for double_quant in (True, False):
        torch.manual_seed(3)
        layer = QLoRALinear.from_linear(torch.nn.Linear(128, 64), r=4, double_quant=double_quant)
        torch.nn.init.normal_(layer.lora_B, std=0.05)
        ref = copy.deepcopy(layer)
        want = ref(x)
        want.sum().backward()
        fully_shard(layer, mesh=mesh)
        for _ in range(2):  # the second forward refills the gathered storage in place
            got = layer(x)
            assert torch.equal(got, want)
        layer.zero_grad()
        got.sum().backward()
        assert torch.equal(layer.lora_A.grad.full_tensor(), ref.lora_A.grad)


def _check_sharded_adapter_changes(rank, mesh, model, tmp):
    # load_adapter into a sharded model loads in place (the adapters stay FSDP2's DTensors);
    # anything that would need new parameters is refused before the model changes
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    import qpeft

    src = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in src.named_parameters():
            if "lora_" in n:
                p.add_(0.02)
    path = os.path.join(tmp, f"adapter_src_{rank}")
    qpeft.save_adapter(src, path)
    m = copy.deepcopy(model)
    for layer in m.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(m, mesh=mesh)
    before = {n: p for n, p in m.named_parameters() if "lora_" in n}
    qpeft.load_adapter(m, path)
    after = dict(m.named_parameters())
    for n, p in before.items():
        assert after[n] is p and type(p).__name__ == "DTensor", n
        assert torch.equal(p.full_tensor(), dict(src.named_parameters())[n]), n
    ids = _batch(0)
    assert torch.equal(m(ids).logits, src(ids).logits)
    with pytest.raises(RuntimeError, match="can only load in place"):
        qpeft.load_adapter(m, path, adapter_name="other")
    with pytest.raises(RuntimeError, match="Add adapters before fully_shard"):
        qpeft.add_adapter(m, "b", r=4)
    assert all("b" not in mod.adapters for mod in m.modules() if isinstance(mod, qpeft.nn.QLoRALinear))
    # DDP over a module whose 4-bit weights are not marked for it to ignore: the error names the fix
    with pytest.raises(NotImplementedError, match="ddp_ignore_4bit"):
        DDP(copy.deepcopy(model).model)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    import qpeft

    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    qpeft.convert(model, r=4, verbose=False)
    with torch.no_grad():  # B != 0 so A gets a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.05)
    return model


def _batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randint(0, 128, (2, 16), generator=g)


def _reference(model):
    """Per-rank losses and the mean of the two ranks' adapter gradients, in one process."""
    ref = copy.deepcopy(model)
    losses = []
    for r in range(WORLD):
        ids = _batch(r)
        loss = ref(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    grads = {n: p.grad / WORLD for n, p in ref.named_parameters() if p.requires_grad}
    return losses, grads


def _check_llama_fsdp(rank, mesh, model, losses, grads):
    from torch.distributed.fsdp import fully_shard

    from qpeft import Weight4bit
    from qpeft.nn import Linear4bit

    m = copy.deepcopy(model)
    full_bytes = {n: mod.weight.packed.numel() for n, mod in m.named_modules() if isinstance(mod, Linear4bit)}
    for layer in m.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(m, mesh=mesh)
    for n, mod in m.named_modules():
        if isinstance(mod, Linear4bit):
            local = mod.weight.to_local()
            assert isinstance(local, Weight4bit) and local.packed.numel() * WORLD == full_bytes[n], n
    ids = _batch(rank)
    loss = m(ids, labels=ids).loss
    assert torch.equal(loss.detach(), losses[rank]), (float(loss), float(losses[rank]))
    loss.backward()
    got = {n: p.grad.full_tensor() for n, p in m.named_parameters() if p.requires_grad}
    assert got.keys() == grads.keys() and len(got) == 2 * 7 * 2  # A and B of 7 linears in 2 layers
    for n, g in got.items():
        assert torch.equal(g, grads[n]), (n, float((g - grads[n]).abs().max()))


def _check_llama_ddp(rank, model, losses, grads):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from qpeft.weight4bit import broadcast_4bit

    m = copy.deepcopy(model)
    if rank == 1:  # rank 1 starts with other 4-bit bytes: broadcast_4bit restores rank 0's
        m.model.layers[0].self_attn.q_proj.base_layer.weight.packed.zero_()
    broadcast_4bit(m)
    assert torch.equal(
        m.model.layers[0].self_attn.q_proj.base_layer.weight,
        model.model.layers[0].self_attn.q_proj.base_layer.weight,
    )
    ddp = DDP(m)  # qpeft.convert marked the 4-bit weights for DDP to skip
    ids = _batch(rank)
    loss = ddp(ids, labels=ids).loss
    assert torch.equal(loss.detach(), losses[rank])
    loss.backward()
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, grads[n]), n


def _check_adapter_io(rank, mesh, model, tmp):
    # save_adapter of a sharded model writes what the unsharded model writes (rank 0 writes,
    # every rank returns after); merging a sharded model is refused before any layer changes
    from safetensors.torch import load_file
    from torch.distributed.fsdp import fully_shard

    import qpeft

    ref_dir, got_dir = os.path.join(tmp, "adapter_ref"), os.path.join(tmp, "adapter_fsdp")
    if rank == 0:
        qpeft.save_adapter(model, ref_dir)
    m = copy.deepcopy(model)
    for layer in m.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(m, mesh=mesh)
    qpeft.save_adapter(m, got_dir)
    want, got = (
        load_file(os.path.join(ref_dir, "adapter_model.safetensors")),
        load_file(os.path.join(got_dir, "adapter_model.safetensors")),
    )
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with (
        open(os.path.join(ref_dir, "adapter_config.json")) as a,
        open(os.path.join(got_dir, "adapter_config.json")) as b,
    ):
        assert a.read() == b.read()
    with pytest.raises(RuntimeError, match="cannot merge adapters of a model sharded by FSDP2"):
        qpeft.merge_adapters(m)
    assert all(mod.merged_adapter is None for mod in m.modules() if isinstance(mod, qpeft.nn.QLoRALinear))
    with pytest.raises(RuntimeError, match="sharded by FSDP2"):
        m.model.layers[0].self_attn.q_proj.base_layer.quant_state  # noqa: B018 (the property raises)
    with pytest.raises(RuntimeError, match="save_quantized needs an unsharded model"):
        qpeft.save_quantized(m, os.path.join(tmp, f"base_{rank}.safetensors"))
    assert not os.path.exists(os.path.join(tmp, f"base_{rank}.safetensors"))


def _worker(rank: int, port: int, tmp: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))
        _check_layer_shards(rank, mesh)
        model = _tiny_llama()
        losses, grads = _reference(model)
        _check_llama_fsdp(rank, mesh, model, losses, grads)
        _check_llama_ddp(rank, model, losses, grads)
        _check_adapter_io(rank, mesh, model, tmp)
        _check_sharded_adapter_changes(rank, mesh, model, tmp)
        _check_single_rank_shard_group(rank)
        _check_state_dict(mesh)
        _check_dcp_state_dict(rank, mesh, tmp)
        _check_mixed_precision(mesh)
        _check_refusals(mesh)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_fsdp2_and_ddp_over_4bit_weights(tmp_path):
    # imported here, once: forked ranks inherit them (spawned ranks re-imported torch and
    # transformers, ~25 s each on the 2-core CI machine). The ranks run 1 thread each.
    pytest.importorskip("transformers")
    from torch.distributed.fsdp import fully_shard  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401  (the lazy model import, also inherited)

    pytest.importorskip("safetensors")
    mp.start_processes(
        _worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="fork"
    )
