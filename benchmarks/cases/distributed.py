"""Memory per rank under FSDP2 (issue 16): the 4-bit base and the optimizer state of a
QLoRA-converted Llama, counted in bytes on 1 and 2 ranks (docs/distributed.md, "Memory per
rank").

World 1 is one plain process (no process group, no sharding); world 2 is two gloo ranks
forked from this process (CPU, one thread each), ``fully_shard`` on every decoder layer and
the root, as ``python -m qpeft.train --strategy fsdp2`` does. Counted, not sampled: the 4-bit
base is the sum over the converted layers of their (local) ``Weight4bit``'s packed codes and
statistics (``storage_bytes``: absmax, nested absmax and offset); the optimizer state is
``memory_report()`` after one step (allocated state), checked equal to ``state_bytes()``.

Target (issue 16): per rank <= 1/world + 5% of the world-1 figure, for both. A shard keeps
the 8-bit nested absmax only when it holds whole nested blocks (256 blocks of 64 = 16384
elements; docs/distributed.md, "The 4-bit weight under FSDP2"), else its absmax is fp32 (4
bytes per 64 elements instead of ~1): the models here have rows of 512 and up, so every shard
of every weight holds whole nested blocks and the base halves exactly. Not timed: these are
byte counts, reported as a section of the report (``notes``), and a missed target fails the
run like a wrong result does.
"""

from __future__ import annotations

import copy
import os
import socket
import tempfile
import traceback

import torch

from .peers import optional

WORLD = 2
OPTIMIZERS = ("AdamW", "AdamW8bit", "PagedAdamW8bit")
TARGET = 0.05  # per rank <= 1/world + 5% of the single-process bytes
# (hidden, intermediate, layers); r = 16 on every projection; heads 8, kv heads 8
SIZES = {"quick": (512, 1024, 2), "full": (1024, 2816, 4)}
RANK = 16


def _config(quick: bool):
    import transformers

    hidden, inter, layers = SIZES["quick" if quick else "full"]
    return transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def _model(config):
    import transformers

    import qpeft

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    qpeft.convert(model, r=RANK, alpha=2 * RANK, verbose=False)
    return model


def _counts(model) -> dict:
    """Bytes of the 4-bit base (local shards under FSDP2) and of each optimizer's state
    after one step, for this process."""
    import qpeft.optim as qo
    from qpeft import Weight4bit
    from qpeft.nn import Linear4bit

    base = 0
    for m in model.modules():
        if isinstance(m, Linear4bit):
            w = m.weight.to_local() if hasattr(m.weight, "to_local") else m.weight
            assert isinstance(w, Weight4bit), type(w)
            base += w.storage_bytes()
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    states = {}
    for name in OPTIMIZERS:
        opt = getattr(qo, name)([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        allocated = sum(opt.memory_report().values())
        assert allocated == sum(opt.state_bytes()), (name, allocated, opt.state_bytes())
        states[name] = allocated
        del opt
    return {"base": base, "state": states}


def _rank_main(rank: int, world: int, port: int, out: str, model) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # no OpenMP team across the fork
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        torch.save(_counts(model), os.path.join(out, f"r{rank}.pt"))
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def measure(quick: bool) -> dict:
    """{world: [per-rank counts]} for world 1 (this process) and WORLD (forked ranks)."""
    import torch.multiprocessing as mp

    model = _model(_config(quick))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _counts(copy.deepcopy(model))
    finally:
        torch.set_num_threads(threads)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank_main, args=(WORLD, port, out, model), nprocs=WORLD, start_method="fork")
        ranks = [torch.load(os.path.join(out, f"r{r}.pt")) for r in range(WORLD)]
    return {1: [single], WORLD: ranks}


def cases(device: str, quick: bool) -> list:
    return []  # nothing timed: the counts are a report section (notes)


def notes(device: str, quick: bool) -> str:
    """The report section; raises AssertionError when a rank misses the target."""
    import torch.distributed as dist

    if device != "cpu" or optional("transformers") is None or not dist.is_available():
        return ""
    if not dist.is_gloo_available():
        return ""
    hidden, inter, layers = SIZES["quick" if quick else "full"]
    got = measure(quick)
    single = got[1][0]
    rows = [
        "| what | world 1 (bytes) | world 2, rank 0 | world 2, rank 1 | max rank / world 1 | target |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    misses = []

    def row(what, full, per_rank):
        frac = max(per_rank) / full
        ok = frac <= 1 / WORLD + TARGET
        rows.append(
            f"| {what} | {full:,} | {per_rank[0]:,} | {per_rank[1]:,} | {frac:.4f} | "
            f"<= {1 / WORLD + TARGET:.2f}: {'met' if ok else 'NOT MET'} |"
        )
        if not ok:
            misses.append(f"{what}: {frac:.4f} of world 1 per rank")

    row("4-bit base (packed + statistics)", single["base"], [r["base"] for r in got[WORLD]])
    for name in OPTIMIZERS:
        row(f"{name} state", single["state"][name], [r["state"][name] for r in got[WORLD]])
    text = (
        f"## Memory per rank (FSDP2, counted bytes)\n\n"
        f"Llama config hidden {hidden}, FFN {inter}, {layers} layers, NF4 + double quant, LoRA r = {RANK} "
        f"on every projection; world 1: one process; world 2: fully_shard per decoder layer + root, "
        f"2 gloo ranks (benchmarks/cases/distributed.py).\n\n" + "\n".join(rows)
    )
    assert not misses, "memory per rank above 1/world + 5%: " + "; ".join(misses)
    return text
