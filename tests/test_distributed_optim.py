"""qpeft optimizers on FSDP2 (fully_shard: DTensor parameters, Shard(0)) and DDP, with
torch.distributed.checkpoint (docs/design.md, "Optimizers under FSDP2 and DDP").

CPU, gloo, ranks forked inside pytest (fork, not spawn: the children inherit the
imported torch and qpeft, a launch costs ~1 s instead of ~10 s on 2 cores). One module
fixture runs everything distributed and writes what each rank saw; the tests judge it.

- run "w1": fully_shard on a 1-rank mesh; each optimizer trains STEPS steps, records
  gradients and parameters, DCP-saves at step SAVE_AT.
- run "w2": the same on 2 ranks (each rank half of the batch); DCP save at SAVE_AT and a
  resume from it in fresh modules; a load of w1's checkpoint continued with w1's
  gradients; DDP; placement and gradient errors.
- this process, non-distributed: w2's checkpoint loaded into plain modules.

What equality holds (the optimizer is elementwise apart from 8-bit block absmax):
- Given the same gradient, a sharded step equals the plain optimizer's step bit for bit
  for fp32 state, and for 8-bit state when every shard starts at a multiple of 256
  elements (then the shard's blocks are the whole tensor's). When a shard boundary falls
  inside a block (the (51, 96) weight on 2 ranks: rank 1 starts at 26 * 96 = 2496), the
  blocks follow the local shard and the step equals the plain 8-bit optimizer applied to
  each shard as its own tensor, bit for bit. The tests feed the plain reference the
  gradient the sharded run had (gathered): the gradient itself differs from a
  single-process full-batch gradient only by its summation order, which is FSDP's
  reduction and the model's GEMMs, not the optimizer; no tolerance is needed. End to
  end, a single process that takes each step's gradient as the mean of the two
  half-batch gradients (the reduction FSDP does on 2 ranks, exact to the bit: one
  correctly rounded add and a halving) reproduces the FSDP run's losses, gradients and
  parameters bit for bit; a full-batch gradient differs from that mean only by the
  rounding of its batch sums, which is the model's arithmetic, not the optimizer's.
- A resume at the same world size is bit-identical (parameters and losses); across world
  sizes it is bit-identical for fp32 and block-aligned 8-bit state, and within half a
  code step of the new block absmax for blocks that straddle the saved blocks.
"""

from __future__ import annotations

import math
import os
import socket
import traceback

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qpeft.optim as qo
from qpeft._formats import dynamic_map

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is required", allow_module_level=True)

import torch.distributed.checkpoint as dcp  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # noqa: E402

CLASSES = (
    qo.AdamW,
    qo.AdamW8bit,
    qo.PagedAdamW,
    qo.PagedAdamW8bit,
    qo.Lion,
    qo.Lion8bit,
    qo.PagedLion,
    qo.PagedLion8bit,
)
DCP_CLASSES = (qo.AdamW, qo.PagedAdamW8bit, qo.Lion8bit)
STEPS, SAVE_AT, BATCH = 5, 3, 8
# (64, 96): 6144 elements, 48 rows of 64 per rank = 12 blocks: aligned. (51, 96): 4896
# elements, rank 1 starts at element 2496: not aligned, uneven (26 and 25 rows).
# (8, 51): 408 elements, fp32 state even in the 8-bit optimizers.
UNALIGNED = "2.weight"


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 51), nn.ReLU(), nn.Linear(51, 8))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 64, generator=g), torch.randn(BATCH, 8, generator=g)


def _opt(cls, params, **kw):
    lr = 1e-2 if "Adam" in cls.__name__ else 1e-3
    return cls(params, lr=lr, weight_decay=0.1, **kw)


def _is8(cls) -> bool:
    return cls.__name__.endswith("8bit")


# --- the ranks -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(fn, world: int, out: str) -> None:
    port = _free_port()
    mp.start_processes(_rank_main, args=(fn, world, port, out), nprocs=world, start_method="fork")


def _rank_main(rank: int, fn, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # deterministic GEMMs, and no OpenMP team across the fork
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, out)
        torch.save(result, os.path.join(out, f"{fn.__name__}_r{rank}.pt"))
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


class _RecordingMemory:
    device_type = "cpu"

    def __init__(self):
        self.calls: list[tuple[str, int]] = []

    def alloc(self, numel, dtype, device):
        return torch.empty(numel, dtype=dtype)

    def prefetch(self, tensors, device, to_host):
        self.calls.extend(("host" if to_host else "device", t.numel()) for t in tensors)

    def location(self, t):
        return "host"


def _sharded_model(world: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = _model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    # full_tensor() on a 1-rank mesh may alias the shard, which the next step updates
    return (t.full_tensor() if hasattr(t, "full_tensor") else t.detach()).clone()


def _params(model) -> dict[str, torch.Tensor]:
    return {n: _full(p.detach()) for n, p in model.named_parameters()}


def _train_step(model, opt, step: int, rank: int, world: int):
    x, y = (t.chunk(world)[rank] for t in _batch(step))
    loss = F.mse_loss(model(x), y)
    loss.backward()
    grads = {n: _full(p.grad) for n, p in model.named_parameters()}
    opt.step()
    opt.zero_grad()
    return loss.detach(), grads


def _dequantized(opt, p) -> dict[str, torch.Tensor]:
    """p's state as full fp32 tensors (8-bit state dequantized with its local blocks)."""
    from qpeft.backends.default.optim import dequantize_state
    from qpeft.optim.distributed import is_dtensor, wrap_like

    st = opt.state[p]
    out = {}
    if "exp_avg_q" not in st:
        return {k: _full(v) for k, v in st.items() if torch.is_tensor(v)}
    signed, unsigned = dynamic_map(True), dynamic_map(False)
    for name, code in (("exp_avg", signed), ("exp_avg_sq", unsigned)):
        if name + "_q" not in st:
            continue
        q = st[name + "_q"]
        local_q = q._local_tensor if is_dtensor(q) else q
        d = dequantize_state(local_q, st[name + "_absmax"], code).view(local_q.shape)
        out[name] = _full(wrap_like(d, p)) if is_dtensor(p) else d
    return out


def _save(model, opt, path: str) -> None:
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)


def _load(model, opt, path: str) -> None:
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def _set_grads(model, grads: dict[str, torch.Tensor], rank: int, world: int) -> None:
    from qpeft.optim.distributed import is_dtensor, wrap_like

    for n, p in model.named_parameters():
        g = grads[n]
        p.grad = wrap_like(g.chunk(world)[rank].clone(), p) if is_dtensor(p) else g.clone()


def _state_bytes(opt) -> int:
    return sum(opt.memory_report().values())


def _train_all(rank: int, world: int, out: str) -> dict:
    """Every optimizer for STEPS steps on the sharded model; DCP save at SAVE_AT."""
    res = {}
    for cls in CLASSES:
        model = _sharded_model(world)
        opt = _opt(cls, model.parameters())
        rec = {"init": _params(model), "grads": [], "params": [], "losses": []}
        for step in range(STEPS):
            loss, grads = _train_step(model, opt, step, rank, world)
            rec["losses"].append(loss)
            rec["grads"].append(grads)
            rec["params"].append(_params(model))
            if step == 0:
                rec["state_bytes"] = _state_bytes(opt)
                rec["local_numel"] = {n: p.to_local().numel() for n, p in model.named_parameters()}
                rec["state_types"] = {
                    n: sorted((k, type(v).__name__) for k, v in opt.state[p].items())
                    for n, p in model.named_parameters()
                }
            if step + 1 == SAVE_AT and cls in DCP_CLASSES:
                rec["saved_state"] = {n: _dequantized(opt, p) for n, p in model.named_parameters()}
                _save(model, opt, os.path.join(out, f"ckpt_w{world}_{cls.__name__}"))
        res[cls.__name__] = rec
    return res


def _w1(rank: int, world: int, out: str) -> dict:
    return _train_all(rank, world, out)


def _w2(rank: int, world: int, out: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    res = {"train": _train_all(rank, world, out), "resume": {}, "from_w1": {}}
    w1 = torch.load(os.path.join(out, "_w1_r0.pt"))
    for cls in DCP_CLASSES:
        # (d) resume at the same world size, in fresh modules and optimizer
        model = _sharded_model(world)
        opt = _opt(cls, model.parameters())
        _load(model, opt, os.path.join(out, f"ckpt_w2_{cls.__name__}"))
        rec = {"params": [], "losses": []}
        for step in range(SAVE_AT, STEPS):
            loss, _ = _train_step(model, opt, step, rank, world)
            rec["losses"].append(loss)
            rec["params"].append(_params(model))
        res["resume"][cls.__name__] = rec
        # (e, the other way) w1's checkpoint into 2 ranks, continued with w1's gradients
        model = _sharded_model(world)
        opt = _opt(cls, model.parameters())
        _load(model, opt, os.path.join(out, f"ckpt_w1_{cls.__name__}"))
        rec = {"loaded": {n: _dequantized(opt, p) for n, p in model.named_parameters()}, "params": []}
        rec["steps"] = sorted({st["step"] for st in opt.state.values()})
        for step in range(SAVE_AT, STEPS):
            _set_grads(model, w1[cls.__name__]["grads"][step], rank, world)
            opt.step()
            opt.zero_grad()
            rec["params"].append(_params(model))
        res["from_w1"][cls.__name__] = rec

    # paging of local shards (a recording stand-in for CUDA managed memory, paging CPU
    # state): the shards' state is allocated and prefetched, the steps are unchanged
    mem = _RecordingMemory()
    model = _sharded_model(world)
    opt = _opt(qo.PagedAdamW8bit, model.parameters(), state_memory=mem, page_min_numel=2000, page_out=True)
    rec = {"params": [], "calls": mem.calls}
    for step in range(2):
        _train_step(model, opt, step, rank, world)
        rec["params"].append(_params(model))
    rec["placement"] = {n: opt.placement(p) for n, p in model.named_parameters()}
    rec["local_numel"] = {n: p.to_local().numel() for n, p in model.named_parameters()}
    rec["report"] = opt.memory_report()
    res["paged"] = rec

    # a plain process's rows state dict (full plain tensors) loaded directly: each rank
    # takes its slice
    plain = torch.load(os.path.join(out, "plain_rows.pt"))
    model = _sharded_model(world)
    opt = _opt(qo.PagedAdamW8bit, model.parameters())
    opt.load_state_dict(plain["sd"])
    res["plain_sd"] = {n: _dequantized(opt, p) for n, p in model.named_parameters()}

    # a QLoRA layer: frozen 4-bit base left out of the sharding, LoRA A (8 x 1024: 8-bit
    # state, rows of 1024 so block-aligned) and B (64 x 8: fp32 state) sharded
    from qpeft.nn import QLoRALinear

    torch.manual_seed(3)
    layer = QLoRALinear.from_linear(nn.Linear(1024, 64), r=8)
    from torch.distributed.fsdp import fully_shard

    fully_shard(
        layer, mesh=init_device_mesh("cpu", (world,)), ignored_params=set(layer.base_layer.parameters())
    )
    trainable = {n: p for n, p in layer.named_parameters() if p.requires_grad}
    opt = _opt(qo.AdamW8bit, trainable.values())
    rec = {"init": {n: _full(p.detach()) for n, p in trainable.items()}, "grads": [], "params": []}
    for step in range(3):
        x = torch.randn(BATCH, 1024, generator=torch.Generator().manual_seed(step)).chunk(world)[rank]
        layer(x).square().mean().backward()
        rec["grads"].append({n: _full(p.grad) for n, p in trainable.items()})
        opt.step()
        opt.zero_grad()
        rec["params"].append({n: _full(p.detach()) for n, p in trainable.items()})
    rec["kinds"] = {n: type(p).__name__ for n, p in layer.named_parameters()}
    res["qlora"] = rec

    # (c) DDP: plain parameters, all-reduced gradients
    from torch.nn.parallel import DistributedDataParallel as DDP

    res["ddp"] = {}
    for cls in (qo.AdamW, qo.PagedAdamW8bit, qo.Lion8bit):
        model = DDP(_model())
        opt = _opt(cls, model.parameters())
        rec = {"grads": [], "params": []}
        for step in range(4):
            _, grads = _train_step(model, opt, step, rank, world)
            rec["grads"].append({n.removeprefix("module."): g for n, g in grads.items()})
            rec["params"].append({n.removeprefix("module."): p for n, p in _params(model).items()})
        rec["state_bytes"] = _state_bytes(opt)
        res["ddp"][cls.__name__] = rec

    # Replicate() placement: every rank steps the whole tensor
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(5)
    full, grad = torch.randn(80, 64), torch.randn(80, 64)
    p = nn.Parameter(distribute_tensor(full.clone(), mesh, [Replicate()]))
    p.grad = distribute_tensor(grad, mesh, [Replicate()])
    opt = qo.AdamW8bit([p], lr=1e-2)
    opt.step()
    res["replicate"] = (full, grad, p.to_local().clone())

    # HSDP-style placements on a (1, 2) mesh: Replicate() then Shard(0)
    mesh2 = init_device_mesh("cpu", (1, world))
    torch.manual_seed(6)
    full, grad = torch.randn(51, 96), torch.randn(51, 96)
    p = nn.Parameter(distribute_tensor(full.clone(), mesh2, [Replicate(), Shard(0)]))
    p.grad = distribute_tensor(grad, mesh2, [Replicate(), Shard(0)])
    _opt(qo.AdamW8bit, [p]).step()
    res["hsdp"] = (full, grad, p.full_tensor())

    # full (gathered) optimizer state dicts: get, then set into fresh sharded modules
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    full_opts = StateDictOptions(full_state_dict=True)
    model = _sharded_model(world)
    opt = _opt(qo.Lion8bit, model.parameters())
    for step in range(2):
        _train_step(model, opt, step, rank, world)
    osd = get_optimizer_state_dict(model, opt, options=full_opts)
    fresh_model = _sharded_model(world)
    fresh = _opt(qo.Lion8bit, fresh_model.parameters())
    set_optimizer_state_dict(fresh_model, fresh, osd, options=full_opts)
    res["full_sd"] = {
        "plain": all(not hasattr(v, "device_mesh") for st in osd["state"].values() for v in st.values()),
        "same": [
            torch.equal(
                a.to_local() if hasattr(a, "to_local") else a, b.to_local() if hasattr(b, "to_local") else b
            )
            for pa, pb in zip(model.parameters(), fresh_model.parameters())
            for (ka, a), (kb, b) in zip(sorted(opt.state[pa].items()), sorted(fresh.state[pb].items()))
            if ka == kb and torch.is_tensor(a)
        ],
    }

    # errors, each naming the fix
    errors = {}
    p1 = nn.Parameter(distribute_tensor(torch.randn(8, 8), mesh, [Shard(1)]))
    try:
        qo.AdamW([p1])
    except ValueError as e:
        errors["shard1"] = str(e)
    p0 = nn.Parameter(distribute_tensor(torch.randn(8, 8), mesh, [Shard(0)]))
    opt = qo.AdamW8bit([p0])
    p0.grad = distribute_tensor(torch.randn(8, 8), mesh, [Replicate()])
    try:
        opt.step()
    except ValueError as e:
        errors["grad_placements"] = str(e)
    try:
        p0.grad = torch.randn(8, 8)  # torch may refuse a plain gradient for a DTensor
    except (RuntimeError, TypeError):
        errors["plain_grad"] = "torch refused it: must be a DTensor"
    else:
        try:
            opt.step()
        except TypeError as e:
            errors["plain_grad"] = str(e)
    errors["state_after"] = len(opt.state)
    big = nn.Parameter(distribute_tensor(torch.randn(64, 96), mesh, [Shard(0)]))
    big.grad = distribute_tensor(torch.randn(64, 96), mesh, [Shard(0)])
    flat = qo.AdamW8bit([big], state_dict_layout="flat")
    flat.step()
    try:
        flat.state_dict()
    except ValueError as e:
        errors["flat"] = str(e)
    flat.state_dict_layout = "rows"
    sd = flat.state_dict()
    sd["qpeft"]["format"] = 1
    for g in sd["param_groups"]:
        g["qpeft"]["format"] = 1
    try:
        qo.AdamW8bit([big]).load_state_dict(sd)
    except ValueError as e:
        errors["load_flat"] = str(e)
    p2 = nn.Parameter(distribute_tensor(torch.randn(8, 8), mesh2, [Replicate(), Shard(1)]))
    try:
        qo.Lion8bit([p2])
    except ValueError as e:
        errors["mixed"] = str(e)
    res["errors"] = errors
    return res


def _plain_rows_checkpoint() -> dict:
    """A non-distributed PagedAdamW8bit trained 2 steps, its rows-layout state dict (plain
    full tensors, as torch.save writes it) and its state, dequantized."""
    model = _model()
    opt = _opt(qo.PagedAdamW8bit, model.parameters(), state_dict_layout="rows")
    for step in range(2):
        _train_step(model, opt, step, 0, 1)
    return {
        "sd": opt.state_dict(),
        "state": {n: _dequantized(opt, p) for n, p in model.named_parameters()},
        "params": _params(model),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dist_optim"))
    torch.save(_plain_rows_checkpoint(), os.path.join(out, "plain_rows.pt"))
    _launch(_w1, 1, out)
    _launch(_w2, 2, out)
    load = lambda name: torch.load(os.path.join(out, name))
    return {"w1": load("_w1_r0.pt"), "w2": [load(f"_w2_r{r}.pt") for r in range(2)], "dir": out}


# --- references ----------------------------------------------------------------------------


def _reference(cls, init, grads, steps, split: int = 1):
    """Plain (non-distributed) optimizer fed the given full gradients; with split > 1,
    every 8-bit parameter is stepped as its dim-0 chunks (the shards), each its own
    tensor with 8-bit state (min_8bit_size=1 for the chunks only)."""
    params, opts, out = {}, [], []
    for n, t in init.items():
        eight = _is8(cls) and t.numel() >= 4096
        chunks = [c.clone() for c in t.chunk(split)] if (split > 1 and eight) else [t.clone()]
        ps = [nn.Parameter(c) for c in chunks]
        params[n] = ps
        opts.append(_opt(cls, ps, min_8bit_size=1 if eight else 4096))
    for step in range(steps):
        for n, ps in params.items():
            for p, g in zip(ps, grads[step][n].chunk(len(ps))):
                p.grad = g.clone()
        for o in opts:
            o.step()
        out.append({n: torch.cat([p.detach() for p in ps]) for n, ps in params.items()})
    return out


def _bits_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, what
    assert torch.equal(a.view(torch.int32), b.view(torch.int32)), f"{what}: max diff {(a - b).abs().max()}"


# --- (a) sharded steps equal the plain optimizer -----------------------------------------------


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_sharded_steps_equal_plain_optimizer(runs, cls, world):
    for r, res in enumerate([runs["w1"]] if world == 1 else [w["train"] for w in runs["w2"]]):
        rec = res[cls.__name__]
        whole = _reference(cls, rec["init"], rec["grads"], STEPS)
        shards = _reference(cls, rec["init"], rec["grads"], STEPS, split=world)
        for step in range(STEPS):
            for n, got in rec["params"][step].items():
                unaligned = world > 1 and _is8(cls) and n == UNALIGNED
                want = (shards if unaligned else whole)[step][n]
                _bits_equal(got, want, f"rank {r} {n} step {step}")
                if unaligned and step == STEPS - 1:
                    # the shard-local blocks are a different quantization than the whole
                    # tensor's: the trajectories part (if this fails, the test shape no
                    # longer exercises a straddling block)
                    assert not torch.equal(got, whole[step][n])


def test_ranks_agree_and_gradients_are_sharded_sums(runs):
    r0, r1 = (w["train"] for w in runs["w2"])
    for cls in CLASSES:
        for step in range(STEPS):
            for n in r0[cls.__name__]["params"][step]:
                _bits_equal(r0[cls.__name__]["params"][step][n], r1[cls.__name__]["params"][step][n], n)


# --- (b) state per rank -----------------------------------------------------------------------


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_state_is_sharded(runs, cls):
    full = runs["w1"][cls.__name__]["state_bytes"]
    per_rank = [w["train"][cls.__name__]["state_bytes"] for w in runs["w2"]]
    for w in runs["w2"]:
        types = w["train"][cls.__name__]["state_types"]
        for n, kinds in types.items():
            for k, t in kinds:
                if k != "step":
                    assert t == ("Tensor" if k.endswith("_absmax") else "DTensor"), (n, k, t)
    if not _is8(cls):
        # fp32 state is one fp32 per moment and local element: exactly the shards' sum
        assert sum(per_rank) == full
    else:
        # 8-bit: each shard's last partial block adds at most one absmax per moment and
        # 8-bit parameter (2 parameters here, 2 moments at most)
        assert full <= sum(per_rank) <= full + 2 * 2 * 4
    # each rank ~1/2: off by the uneven rows (rank 0 has 26 of the 51 rows of 2.weight,
    # 1 of the 51 of 4.weight's dim 0... i.e. at most one row of every parameter)
    moments = 1 if "Lion" in cls.__name__ else 2
    one_row = moments * 4 * (64 + 96 + 51 + 1 + 1 + 1)
    for b in per_rank:
        assert abs(b - full / 2) <= one_row + 2 * 2 * 4


# --- (c) DDP --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["AdamW", "PagedAdamW8bit", "Lion8bit"])
def test_ddp_equals_plain_optimizer(runs, name):
    cls = getattr(qo, name)
    init = {n: p.detach().clone() for n, p in _model().named_parameters()}
    for r, w in enumerate(runs["w2"]):
        rec = w["ddp"][name]
        want = _reference(cls, init, rec["grads"], 4)
        for step in range(4):
            for n, got in rec["params"][step].items():
                _bits_equal(got, want[step][n], f"rank {r} {n} step {step}")
    # DDP replicates the state: every rank holds all of it
    assert runs["w2"][0]["ddp"][name]["state_bytes"] == runs["w2"][1]["ddp"][name]["state_bytes"]


# --- (d) DCP resume at the same world size ------------------------------------------------------


@pytest.mark.parametrize("cls", DCP_CLASSES, ids=lambda c: c.__name__)
def test_dcp_resume_same_world_is_bit_identical(runs, cls):
    for r, w in enumerate(runs["w2"]):
        base, resumed = w["train"][cls.__name__], w["resume"][cls.__name__]
        for i, step in enumerate(range(SAVE_AT, STEPS)):
            _bits_equal(resumed["losses"][i], base["losses"][step], f"rank {r} loss step {step}")
            for n, got in resumed["params"][i].items():
                _bits_equal(got, base["params"][step][n], f"rank {r} {n} step {step}")


# --- (e) DCP across world sizes ------------------------------------------------------------------


def _half_step_bound(code: torch.Tensor, saved: torch.Tensor) -> torch.Tensor:
    """Requantizing x in a block of absmax A picks the nearest code of v = x * (1/A), so
    |x - code * A| <= (max_gap / 2 + r) * A, where r <= 4 * 2**-24 covers the fp32
    roundings of 1/A, v and code * A (each relative 2**-24 of values <= 1); A, the
    largest |x| of the new block, is at most the largest saved magnitude."""
    gap = (code[1:] - code[:-1]).max()
    return (gap / 2 + 4 * 2**-24) * saved.abs().max()


@pytest.mark.parametrize("cls", DCP_CLASSES, ids=lambda c: c.__name__)
def test_dcp_world1_checkpoint_into_world2(runs, cls):
    w1 = runs["w1"][cls.__name__]
    for r, w in enumerate(runs["w2"]):
        rec = w["from_w1"][cls.__name__]
        assert rec["steps"] == [SAVE_AT]
        for n, state in rec["loaded"].items():
            for k, got in state.items():
                want = w1["saved_state"][n][k]
                if _is8(cls) and n == UNALIGNED:
                    # rank 0's shard (rows 0-25) has the saved blocks: exact. Rank 1's
                    # starts 192 elements into a saved block, so each of its blocks
                    # straddles two saved ones and is requantized
                    code = dynamic_map(k == "exp_avg")
                    assert (got - want).abs().max() <= _half_step_bound(code, want), (n, k)
                    _bits_equal(got[:26], want[:26], f"rank {r} loaded {n} {k} rows of rank 0")
                else:
                    _bits_equal(got, want, f"rank {r} loaded {n} {k}")
        for i, step in enumerate(range(SAVE_AT, STEPS)):
            for n, got in rec["params"][i].items():
                if _is8(cls) and n == UNALIGNED:
                    continue  # its state was requantized: another trajectory (checked above)
                _bits_equal(got, w1["params"][step][n], f"rank {r} {n} step {step}")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
@pytest.mark.parametrize("cls", DCP_CLASSES, ids=lambda c: c.__name__)
def test_dcp_world2_checkpoint_into_plain_process(runs, cls):
    """World 2 -> one non-distributed process: plain modules, state_dict_layout='rows'
    (the layout the sharded run wrote), continued with the world-2 run's gradients."""
    assert not dist.is_initialized()
    w2 = runs["w2"][0]["train"][cls.__name__]
    model = _model()
    opt = _opt(cls, model.parameters(), state_dict_layout="rows")
    _load(model, opt, os.path.join(runs["dir"], f"ckpt_w2_{cls.__name__}"))
    assert {st["step"] for st in opt.state.values()} == {SAVE_AT}
    for n, p in model.named_parameters():
        _bits_equal(p.detach(), w2["params"][SAVE_AT - 1][n], f"loaded {n}")
        for k, got in _dequantized(opt, p).items():
            want = w2["saved_state"][n][k]
            if _is8(cls) and n == UNALIGNED:
                # the first 9 blocks (24 rows) are rank 0's saved blocks: exact; the rest
                # straddle rank 1's blocks and are requantized
                code = dynamic_map(k == "exp_avg")
                assert (got - want).abs().max() <= _half_step_bound(code, want), (n, k)
                _bits_equal(got[:24], want[:24], f"loaded state {n} {k} first 9 blocks")
            else:
                _bits_equal(got, want, f"loaded state {n} {k}")
    for step in range(SAVE_AT, STEPS):
        for n, p in model.named_parameters():
            p.grad = w2["grads"][step][n].clone()
        opt.step()
        for n, p in model.named_parameters():
            if not (_is8(cls) and n == UNALIGNED):
                _bits_equal(p.detach(), w2["params"][step][n], f"{n} step {step}")


# --- placements and errors -----------------------------------------------------------------


def test_replicate_placement_steps_the_whole_tensor(runs):
    for w in runs["w2"]:
        full, grad, got = w["replicate"]
        p = nn.Parameter(full.clone())
        p.grad = grad
        qo.AdamW8bit([p], lr=1e-2).step()
        _bits_equal(got, p.detach(), "replicated parameter")


def test_hsdp_placements_step_each_shard(runs):
    """(Replicate(), Shard(0)): the local shard is rows 0-25 or 26-50; (51, 96) is not
    block-aligned at 2 ranks, so each shard steps as its own tensor."""
    init = {"w": None}
    for w in runs["w2"]:
        full, grad, got = w["hsdp"]
        init["w"] = full
        want = _reference(qo.AdamW8bit, init, [{"w": grad}], 1, split=2)[0]["w"]
        _bits_equal(got, want, "HSDP parameter")


def test_paged_state_of_local_shards(runs):
    for w in runs["w2"]:
        rec, base = w["paged"], w["train"]["PagedAdamW8bit"]
        for step in range(2):
            for n, got in rec["params"][step].items():
                _bits_equal(got, base["params"][step][n], f"paged {n} step {step}")
        paged = [n for n, where in rec["placement"].items() if where == "paged"]
        assert sorted(paged) == ["0.weight", "2.weight"]  # local shards of >= 2000 elements
        per_step = []
        for n in paged:
            numel = rec["local_numel"][n]
            per_step += [numel, -(numel // -256)] * 2  # codes and absmax of both moments
        assert sorted(rec["calls"]) == sorted(
            [("device", k) for k in per_step * 2] + [("host", k) for k in per_step * 2]
        )
        assert rec["report"]["paged_host"] == sum(per_step[0::2]) + 4 * sum(per_step[1::2])


def test_plain_full_state_dict_loads_into_shards(runs):
    plain = torch.load(os.path.join(runs["dir"], "plain_rows.pt"))
    for w in runs["w2"]:
        for n, state in w["plain_sd"].items():
            for k, got in state.items():
                want = plain["state"][n][k]
                if n == UNALIGNED:  # rank 0's rows exact, rank 1's blocks requantized
                    code = dynamic_map(k == "exp_avg")
                    assert (got - want).abs().max() <= _half_step_bound(code, want), (n, k)
                    _bits_equal(got[:26], want[:26], f"{n} {k} rows of rank 0")
                else:
                    _bits_equal(got, want, f"{n} {k}")


def test_qlora_layer_with_frozen_4bit_base(runs):
    for r, w in enumerate(runs["w2"]):
        rec = w["qlora"]
        assert rec["kinds"]["adapters.default.lora_A"] == "DTensor"
        assert all(k != "DTensor" for n, k in rec["kinds"].items() if n.startswith("base_layer"))
        want = _reference(qo.AdamW8bit, rec["init"], rec["grads"], 3)
        for step in range(3):
            for n, got in rec["params"][step].items():
                _bits_equal(got, want[step][n], f"rank {r} {n} step {step}")
        # the adapters moved (A gets a gradient once B is nonzero)
        assert not torch.equal(
            rec["params"][2]["adapters.default.lora_A"], rec["init"]["adapters.default.lora_A"]
        )


def test_full_state_dict_round_trip(runs):
    for w in runs["w2"]:
        assert w["full_sd"]["plain"]  # gathered: plain tensors
        assert w["full_sd"]["same"] and all(w["full_sd"]["same"])


def test_unsupported_placements_and_gradients_are_refused(runs):
    errors = runs["w2"][0]["errors"]
    for key in ("shard1", "mixed"):
        assert "Shard(0) or Replicate()" in errors[key] and "fully_shard" in errors[key], errors[key]
    assert "Shard(dim=1)" in errors["shard1"]
    assert "redistribute" in errors["grad_placements"]
    assert "must be a DTensor" in errors["plain_grad"]
    assert errors["state_after"] == 0  # refused steps made no state
    assert "state_dict_layout='rows'" in errors["flat"]
    assert "cannot be loaded into a DTensor parameter" in errors["load_flat"]


# --- the rows layout, without processes -------------------------------------------------------


@pytest.mark.parametrize("shape", [(51, 96), (4096, 16), (5000,), (33, 300), (9, 4, 130)])
def test_rows_layout_round_trip_is_bit_exact(shape):
    torch.manual_seed(1)
    p = nn.Parameter(torch.randn(shape))
    opt = qo.AdamW8bit([p], lr=1e-2, state_dict_layout="rows")
    for _ in range(3):
        p.grad = torch.randn(shape)
        opt.step()
    sd = opt.state_dict()
    assert sd["qpeft"]["format"] == 2 and sd["param_groups"][0]["qpeft"]["format"] == 2
    rows = shape[0]
    k = (math.prod(shape) // rows + 254) // 256 + 1
    assert sd["state"][0]["exp_avg_absmax"].shape == (rows, 1 + k)
    fresh = qo.AdamW8bit([nn.Parameter(p.detach().clone())], lr=1e-2)
    fresh.load_state_dict(sd)
    a, b = opt.state[p], next(iter(fresh.state.values()))
    for key in ("exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax"):
        assert torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8)), key
    assert "qpeft" not in fresh.param_groups[0]
    # a flat (format 1) state dict still loads, and the flat layout is the plain default
    flat = qo.AdamW8bit([nn.Parameter(p.detach().clone())], lr=1e-2)
    flat.load_state_dict(fresh.state_dict())
    assert fresh.state_dict()["qpeft"]["format"] == 1


def test_bad_layout_and_corrupt_table_are_refused():
    with pytest.raises(ValueError, match="state_dict_layout must be one of"):
        qo.AdamW([nn.Parameter(torch.zeros(2))], state_dict_layout="sharded")
    p = nn.Parameter(torch.randn(40, 128))
    opt = qo.Lion8bit([p], state_dict_layout="rows")
    p.grad = torch.randn(40, 128)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["exp_avg_absmax"][3, 0] = 0.5
    with pytest.raises(ValueError, match="phase column"):
        qo.Lion8bit([nn.Parameter(p.detach().clone())]).load_state_dict(sd)


# --- (a) end to end: a single process that reduces the gradient the way FSDP does ------------


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' GEMMs ran on one thread
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("cls", [qo.AdamW, qo.PagedAdamW8bit], ids=lambda c: c.__name__)
def test_fsdp_run_equals_single_process_run(runs, cls, one_thread):
    """One process, plain modules, the full batch of every step, its gradient taken as
    the mean of the two ranks' half-batch gradients ((g0 + g1) / 2: FSDP's reduce-scatter
    of 2 ranks adds two fp32 numbers, commutative and correctly rounded, and halves,
    exactly). Parameters and losses after every step equal the 2-rank FSDP run bit for bit:
    the summation order of the gradient is the only difference between data-parallel and
    full-batch training, and here it is the same. (A full-batch gradient differs from
    this one by the rounding of its batch sums, amplified by Adam's division by sqrt(v);
    the optimizer adds no error of its own, as the tests above show bit-exactly.)"""
    w2 = [w["train"][cls.__name__] for w in runs["w2"]]
    model = _model()
    named = dict(model.named_parameters())
    # 8-bit: the unaligned weight's blocks follow the shards, so it is stepped as its two
    # row chunks (Parameters over views of the weight: the step updates it in place)
    chunked = _is8(cls)
    chunks = [nn.Parameter(c) for c in named[UNALIGNED].data.chunk(2)] if chunked else []
    opts = [_opt(cls, [p for n, p in named.items() if not (chunked and n == UNALIGNED)])]
    if chunked:
        opts.append(_opt(cls, chunks, min_8bit_size=1))
    for step in range(STEPS):
        x, y = _batch(step)
        halves = []
        for r in range(2):
            model.zero_grad()
            loss = F.mse_loss(model(x.chunk(2)[r]), y.chunk(2)[r])
            loss.backward()
            _bits_equal(loss.detach(), w2[r]["losses"][step], f"rank {r} loss step {step}")
            halves.append([p.grad.clone() for p in model.parameters()])
        for p, g0, g1 in zip(model.parameters(), *halves):
            p.grad = (g0 + g1) / 2
        for n, p in model.named_parameters():
            _bits_equal(p.grad, w2[0]["grads"][step][n], f"gradient {n} step {step}")
        for c, g in zip(chunks, named[UNALIGNED].grad.chunk(2)):
            c.grad = g
        for o in opts:
            o.step()
        for n, p in model.named_parameters():
            _bits_equal(p.detach(), w2[0]["params"][step][n], f"{n} step {step}")
