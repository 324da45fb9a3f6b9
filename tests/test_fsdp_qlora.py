"""QLoRA training of a converted transformers Llama under FSDP2 and DDP against one process
(docs/distributed.md, "Memory per rank"; issue 16): the 4-bit base sharded by rows
(qpeft.Weight4bit), the adapters sharded with their optimizer state (qpeft.optim on DTensor
parameters), DCP checkpoints through the recipe's save/resume (qpeft.train), and the PEFT
export of a model loaded from a sharded checkpoint.

One fork of 2 gloo ranks (fork, as tests/test_distributed_optim.py: the children inherit the
imported torch, transformers and qpeft) trains with each optimizer and writes what it saw; the
single-process runs happen here, after the ranks are done, on one thread like the ranks.

What equality holds. Rank r of 2 takes rows [2r, 2r + 2) of each step's global batch of 4.
The single-process twin runs the same two half-batches and takes each step's gradient as
(g0 + g1) / 2: FSDP2's reduce-scatter (pre-divided by 2, then summed) and DDP's all-reduce
(summed, then divided by 2) form the same number, since halving is exact and one add of two
fp32 numbers is correctly rounded and commutative. Each half-batch forward is the same
arithmetic in both (the all-gathered 4-bit weight decodes bit for bit: tests/test_fsdp_4bit.py).
The adapters' 8-bit state (min_8bit_size=256, r = 16) is block-aligned on every shard (each
shard of every LoRA matrix is a multiple of 256 elements), so a sharded 8-bit step equals the
plain one (tests/test_distributed_optim.py). So the twin equals the 2-rank runs bit for bit,
losses and parameters, every step, for all three optimizers; tolerance 0.

The issue's requirement is against a single process on the whole batch (4 rows at once): its
loss is the mean over 60 tokens instead of the mean of two means over 30, and its gradient sums
the batch in another order, so it differs from the twin by fp32 rounding of those sums
(~1e-7 relative per step), which Adam's normalised update m / sqrt(v) can amplify where a
gradient element is near its own rounding noise (an element's update moves by up to lr). Over
4 steps at lr 1e-3 on a loss of ~4.9 the measured gap is ~1e-7 relative; the issue's bound
2e-4 is asserted. A missing reduction (stepping with one rank's half-batch gradient) moves the
losses by 3e-4, 6e-3, 7e-3 relative at steps 2-4 (measured), so it fails this bound; a sum in
place of the mean barely moves Adam's losses (Adam is scale-invariant but for eps): that is
left to the bit-for-bit twin comparison, which sees the eps term's change.
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import traceback

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is required", allow_module_level=True)

import torch.distributed.checkpoint  # noqa: E402
import torch.distributed.fsdp  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import transformers  # noqa: E402

# transformers imports model classes lazily: import them once here, the forked ranks inherit
transformers.LlamaConfig, transformers.LlamaForCausalLM  # noqa: B018

import qpeft  # noqa: E402
import qpeft.optim as qo  # noqa: E402
from qpeft import Weight4bit, train  # noqa: E402
from qpeft.nn import Linear4bit, QLoRALinear  # noqa: E402

WORLD, STEPS, SAVE_AT, BATCH, SEQ, RANK, LR = 2, 4, 3, 4, 16, 16, 1e-3
OPTIMIZERS = (qo.AdamW, qo.AdamW8bit, qo.PagedAdamW8bit)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
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
    return transformers.LlamaForCausalLM(cfg)


def _converted(base) -> torch.nn.Module:
    model = copy.deepcopy(base)
    torch.manual_seed(1)
    qpeft.convert(model, r=RANK, alpha=2 * RANK, verbose=False)
    with torch.no_grad():  # B != 0: A gets a gradient from the first step
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.05)
    return model


def _opt(cls, model):
    # 256: every adapter matrix (and every 2-rank shard of one) gets block-aligned 8-bit state
    kw = {} if cls is qo.AdamW else {"min_8bit_size": 256}
    return cls([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01, **kw)


def _ids(step: int) -> torch.Tensor:
    # the batch of ``step``: two fixed batches in turn, so the loss falls over 4 steps
    return torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(500 + step % 2))


def _rows(step: int, rank: int) -> torch.Tensor:
    per = BATCH // WORLD
    return _ids(step)[rank * per : (rank + 1) * per]


def _trainable(model) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            t = p.detach()
            out[n.removeprefix("module.")] = (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()
    return out


def _fsdp(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _dist_step(model, opt, step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's loss, the mean over ranks)."""
    ids = _rows(step, rank)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    return loss.detach(), mean / WORLD


def _rank_main(rank: int, port: int, out: str, base, model) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.nn.parallel import DistributedDataParallel as DDP

        mesh = init_device_mesh("cpu", (WORLD,))
        res = {}
        for cls in OPTIMIZERS:
            name = cls.__name__
            ck = os.path.join(out, f"ckpt_{name}")
            # FSDP2: STEPS steps, a DCP checkpoint after step SAVE_AT
            m = _fsdp(copy.deepcopy(model), mesh)
            opt = _opt(cls, m)
            rec = {"loss": [], "mean": [], "params": []}
            for step in range(STEPS):
                loss, mean = _dist_step(m, opt, step, rank)
                rec["loss"].append(loss)
                rec["mean"].append(mean)
                rec["params"].append(_trainable(m))
                if step + 1 == SAVE_AT:
                    train.save(ck, m, opt, SAVE_AT, argparse.Namespace(), True)
            rec["local"] = {
                n: (w.packed.numel(), w.absmax.numel(), w.storage_bytes())
                for n, mod in m.named_modules()
                if isinstance(mod, Linear4bit)
                for w in [mod.weight.to_local()]
                if isinstance(w, Weight4bit)
            }
            rec["state_bytes"] = sum(opt.state_bytes())
            rec["memory_report"] = sum(opt.memory_report().values())
            # resume from the checkpoint in a fresh model and optimizer
            m = _fsdp(copy.deepcopy(model), mesh)
            opt = _opt(cls, m)
            assert train.resume(ck, m, opt, True) == SAVE_AT
            rec["resumed_params"] = _trainable(m)
            rec["resumed_loss"] = [_dist_step(m, opt, s, rank)[0] for s in range(SAVE_AT, STEPS)]
            # DDP (the frozen base is the same on every rank: no buffer broadcast)
            m = DDP(copy.deepcopy(model), broadcast_buffers=False)
            opt = _opt(cls, m)
            rec["ddp_loss"], rec["ddp_mean"] = [], []
            for step in range(STEPS):
                loss, mean = _dist_step(m, opt, step, rank)
                rec["ddp_loss"].append(loss)
                rec["ddp_mean"].append(mean)
            rec["ddp_params"] = _trainable(m)
            rec["ddp_state_bytes"] = sum(opt.state_bytes())
            res[name] = rec
        torch.save(res, os.path.join(out, f"r{rank}.pt"))
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def _twin(model, cls) -> dict:
    """One process, the ranks' two half-batches per step, gradient (g0 + g1) / 2."""
    m = copy.deepcopy(model)
    opt = _opt(cls, m)
    params = [p for p in m.parameters() if p.requires_grad]
    rec = {"loss": [], "params": []}
    for step in range(STEPS):
        halves, losses = [], []
        for r in range(WORLD):
            ids = _rows(step, r)
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
            halves.append([p.grad for p in params])
            for p in params:
                p.grad = None
        for p, g0, g1 in zip(params, *halves):
            p.grad = (g0 + g1) / 2
        opt.step()
        opt.zero_grad(set_to_none=True)
        rec["loss"].append(losses)
        rec["params"].append(_trainable(m))
    return rec


def _full_batch(model, cls) -> list[float]:
    m = copy.deepcopy(model)
    opt = _opt(cls, m)
    out = []
    for step in range(STEPS):
        ids = _ids(step)
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(float(loss.detach()))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fsdp_qlora"))
    base = _base()
    model = _converted(base)
    mp.start_processes(_rank_main, args=(_free_port(), out, base, model), nprocs=WORLD, start_method="fork")
    ranks = [torch.load(os.path.join(out, f"r{r}.pt")) for r in range(WORLD)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' GEMMs ran on one thread
    try:
        twins = {cls.__name__: _twin(model, cls) for cls in OPTIMIZERS}
        full = {cls.__name__: _full_batch(model, cls) for cls in OPTIMIZERS}
    finally:
        torch.set_num_threads(threads)
    return {"dir": out, "base": base, "model": model, "ranks": ranks, "twins": twins, "full": full}


def _equal(got, want, what):
    assert got.shape == want.shape and torch.equal(got, want), (
        what,
        float((got.double() - want.double()).abs().max()),
    )


NAMES = [c.__name__ for c in OPTIMIZERS]


@pytest.mark.parametrize("name", NAMES)
def test_fsdp_equals_single_process_twin_bit_for_bit(runs, name):
    twin = runs["twins"][name]
    for r, w in enumerate(runs["ranks"]):
        rec = w[name]
        for step in range(STEPS):
            _equal(rec["loss"][step], twin["loss"][step][r], f"rank {r} loss step {step}")
            l0, l1 = twin["loss"][step]
            _equal(rec["mean"][step], (l0 + l1) / 2, f"mean loss step {step}")
            for n, p in twin["params"][step].items():
                _equal(rec["params"][step][n], p, f"rank {r} {n} step {step}")
    # the adapters moved
    first = runs["twins"][name]["params"][0]
    init = _trainable(runs["model"])
    assert all(not torch.equal(first[n], init[n]) for n in init)


@pytest.mark.parametrize("name", NAMES)
def test_mean_loss_tracks_full_batch_single_process(runs, name):
    full = runs["full"][name]
    means = [float(m) for m in runs["ranks"][0][name]["mean"]]
    assert means == [float(m) for m in runs["ranks"][1][name]["mean"]]
    gaps = [abs(a - b) / abs(b) for a, b in zip(means, full)]
    print(f"{name}: mean rank loss vs full batch, relative gaps {[f'{g:.1e}' for g in gaps]}")
    assert max(gaps) <= 2e-4, (means, full)
    assert full[2] < full[0] and full[3] < full[1], full  # it trains (each batch seen twice)


@pytest.mark.parametrize("name", NAMES)
def test_ddp_equals_single_process_twin_bit_for_bit(runs, name):
    twin = runs["twins"][name]
    for r, w in enumerate(runs["ranks"]):
        rec = w[name]
        for step in range(STEPS):
            _equal(rec["ddp_loss"][step], twin["loss"][step][r], f"rank {r} DDP loss step {step}")
            _equal(rec["ddp_mean"][step], rec["mean"][step], f"DDP mean step {step}")
        for n, p in twin["params"][-1].items():
            _equal(rec["ddp_params"][n], p, f"rank {r} DDP {n}")


@pytest.mark.parametrize("name", NAMES)
def test_each_rank_holds_half_of_the_4bit_base_and_of_the_state(runs, name):
    model = runs["model"]
    full_w = {
        n: (m.weight.packed.numel(), m.weight.absmax.numel(), m.weight.storage_bytes())
        for n, m in model.named_modules()
        if isinstance(m, Linear4bit)
    }
    assert len(full_w) == 14
    opt = _opt(getattr(qo, name), copy.deepcopy(model))
    full_state = sum(opt.state_bytes())
    assert full_state > 0
    for w in runs["ranks"]:
        rec = w[name]
        assert rec["local"].keys() == full_w.keys()  # every 4-bit weight is a sharded Weight4bit
        for n, (packed, absmax, nbytes) in rec["local"].items():
            assert packed * WORLD == full_w[n][0] and absmax * WORLD == full_w[n][1], n
            # fp32 absmax where a shard cuts a nested block: at most 4 bytes per block
            assert nbytes <= full_w[n][2] / WORLD + 4 * absmax, n
        # every adapter shard is a multiple of the 256-element blocks: exactly half
        assert rec["state_bytes"] * WORLD == full_state
        assert rec["memory_report"] == rec["state_bytes"]  # allocated after the steps
        assert rec["ddp_state_bytes"] == full_state  # DDP replicates it


@pytest.mark.parametrize("name", NAMES)
def test_dcp_resume_equals_uninterrupted_run(runs, name):
    for r, w in enumerate(runs["ranks"]):
        rec = w[name]
        for n, p in rec["params"][SAVE_AT - 1].items():
            _equal(rec["resumed_params"][n], p, f"rank {r} resumed {n}")
        for i, step in enumerate(range(SAVE_AT, STEPS)):
            _equal(rec["resumed_loss"][i], rec["loss"][step], f"rank {r} resumed loss step {step}")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
@pytest.mark.parametrize("name", ["AdamW", "PagedAdamW8bit"])
def test_sharded_checkpoint_into_one_process_then_peft(runs, name, tmp_path):
    """The 2-rank checkpoint loads into a plain model (8-bit state through the rows layout the
    sharded run wrote) with the same LoRA values; its next step is the sharded run's; the
    adapter it exports in PEFT's format loads into HF PEFT on the un-quantized base with the
    same adapter weights."""
    import peft

    assert not dist.is_initialized()
    w = runs["ranks"][0][name]
    m = copy.deepcopy(runs["model"])
    cls = getattr(qo, name)
    kw = {} if cls is qo.AdamW else {"min_8bit_size": 256, "state_dict_layout": "rows"}
    opt = cls([p for p in m.parameters() if p.requires_grad], lr=LR, weight_decay=0.01, **kw)
    assert train.resume(os.path.join(runs["dir"], f"ckpt_{name}"), m, opt, False) == SAVE_AT
    for n, p in _trainable(m).items():
        _equal(p, w["params"][SAVE_AT - 1][n], f"loaded {n}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the next step with the ranks' gradient: the sharded run's parameters
        params = [p for p in m.parameters() if p.requires_grad]
        halves = []
        for r in range(WORLD):
            ids = _rows(SAVE_AT, r)
            m(input_ids=ids, labels=ids).loss.backward()
            halves.append([p.grad for p in params])
            for p in params:
                p.grad = None
        for p, g0, g1 in zip(params, *halves):
            p.grad = (g0 + g1) / 2
        opt.step()
    finally:
        torch.set_num_threads(threads)
    for n, p in _trainable(m).items():
        _equal(p, w["params"][SAVE_AT][n], f"step after load {n}")

    qpeft.save_adapter(m, tmp_path)
    hf = peft.PeftModel.from_pretrained(copy.deepcopy(runs["base"]), tmp_path)
    layers = [(n, mod) for n, mod in m.named_modules() if isinstance(mod, QLoRALinear)]
    assert len(layers) == 14
    for n, mod in layers:
        theirs = hf.base_model.model.get_submodule(n)
        _equal(theirs.lora_A["default"].weight.detach(), mod.lora_A.detach(), f"PEFT {n} lora_A")
        _equal(theirs.lora_B["default"].weight.detach(), mod.lora_B.detach(), f"PEFT {n} lora_B")
        assert theirs.scaling["default"] == mod.scaling
