"""The CUDA emulation harness itself (csrc/emu): its CUDA semantics held to the CUDA
programming guide's definitions, and planted bugs it must expose.

The probes and planted bugs are test-only kernels compiled into qpeft._C_cuda_emu
(module ``testing``; csrc/emu/probe_kernels.cu, csrc/emu/planted_bugs.cu).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from qpeft.backends.cuda_emulated import emulation

from .emu_support import emu_module

SEEDS = [0, 1, 2, 3, 4, 5]  # 0: in order, 1: reverse, >= 2: random interleavings


@pytest.fixture(scope="module")
def emu():
    return emu_module()


@pytest.fixture(scope="module")
def t(emu):
    return emu.testing


def _i32(n):
    return torch.zeros(n, dtype=torch.int32)


# --- builtins, barriers, warp collectives, atomics, shared memory ------------------------


@pytest.mark.parametrize(
    "grid,block", [((2, 3, 2), (4, 2, 3)), ((5, 1, 1), (33, 1, 1)), ((1, 2, 1), (1, 1, 64))]
)
def test_thread_and_block_indices(t, grid, block):
    nthreads = block[0] * block[1] * block[2]
    nblocks = grid[0] * grid[1] * grid[2]
    out = _i32(nblocks * nthreads * 12)
    t.probe_indices(out.data_ptr(), *grid, *block)
    rows = out.view(nblocks, nthreads, 12)
    for b in range(nblocks):
        bx, by, bz = b % grid[0], (b // grid[0]) % grid[1], b // (grid[0] * grid[1])
        for i in range(nthreads):
            tx, ty, tz = i % block[0], (i // block[0]) % block[1], i // (block[0] * block[1])
            assert rows[b, i].tolist() == [tx, ty, tz, bx, by, bz, *block, *grid], (b, i)


@pytest.mark.parametrize("seed", SEEDS)
def test_syncthreads_waits_for_every_thread(t, seed):
    # Counters read right after a barrier have seen every thread's increment; the
    # aggregating barriers count/and/or the predicates of all threads.
    threads, phases = 96, 4
    out = _i32(threads * phases)
    pred = (torch.arange(threads) % 3 == 0).int()
    agg = _i32(3)
    with emulation(seed=seed):
        t.probe_barrier(out.data_ptr(), pred.data_ptr(), agg.data_ptr(), threads, phases)
    for p in range(phases):
        assert bool((out[p * threads : (p + 1) * threads] == threads * (p + 1)).all()), p
    assert agg.tolist() == [32, 0, 1]
    ones = torch.ones(threads, dtype=torch.int32)
    t.probe_barrier(out.data_ptr(), ones.data_ptr(), agg.data_ptr(), threads, 1)
    assert agg.tolist() == [threads, 1, 1]


def _expected_shuffle(op, values, b, width, threads):
    # The CUDA programming guide's definitions (per width-lane segment).
    out = values.clone()
    for tid in range(threads):
        lane, base = tid % 32, tid - tid % 32
        start = lane - lane % width
        if op == 0:  # __shfl_sync: lane srcLane % width of the segment
            src = start + b[tid] % width
        elif op == 1:  # __shfl_up_sync: lane - delta, own value below the segment start
            src = lane - b[tid] if lane - b[tid] >= start else lane
        elif op == 2:  # __shfl_down_sync: lane + delta, own value past the segment end
            src = lane + b[tid] if lane + b[tid] < start + width else lane
        else:  # __shfl_xor_sync: lane ^ laneMask; later segments give the own value
            src = lane ^ b[tid]
            src = src if src < start + width else lane
        out[tid] = values[base + src]
    return out


@pytest.mark.parametrize("op", [0, 1, 2, 3], ids=["idx", "up", "down", "xor"])
@pytest.mark.parametrize("width", [32, 16, 8, 2, 1])
@pytest.mark.parametrize("elem_bytes", [4, 8])
def test_shuffles(t, op, width, elem_bytes):
    threads = 64
    g = torch.Generator().manual_seed(op * 100 + width)
    dtype = torch.int32 if elem_bytes == 4 else torch.int64
    values = torch.randint(-(2**30), 2**30, (threads,), generator=g, dtype=torch.int64)
    if elem_bytes == 8:
        values = values * (2**31) + 12345  # uses the upper 32 bits
    values = values.to(dtype)
    b = torch.randint(0, 40, (threads,), generator=g, dtype=torch.int32)  # also past the warp
    out = torch.zeros(threads, dtype=dtype)
    t.probe_shuffle(
        op, values.data_ptr(), b.data_ptr(), out.data_ptr(), threads, 0xFFFFFFFF, width, elem_bytes
    )
    expected = _expected_shuffle(op, values, b.tolist(), width, threads)
    assert torch.equal(out, expected)


def test_shuffle_with_partial_mask(t):
    # The lower 16 lanes shuffle among themselves; the others do not call.
    threads = 32
    values = torch.arange(100, 100 + threads, dtype=torch.int32)
    b = torch.full((threads,), 5, dtype=torch.int32)
    out = torch.zeros(threads, dtype=torch.int32)
    t.probe_shuffle(3, values.data_ptr(), b.data_ptr(), out.data_ptr(), threads, 0x0000FFFF, 16, 4)
    expected = values.clone()
    expected[:16] = values[torch.arange(16) ^ 5]
    assert torch.equal(out, expected)


@pytest.mark.parametrize("mask", [0xFFFFFFFF, 0x0F0F0F0F])
def test_votes(t, mask):
    threads = 64
    g = torch.Generator().manual_seed(mask & 0xFF)
    for pattern in ("random", "all", "none"):
        pred = {
            "random": torch.randint(0, 2, (threads,), generator=g, dtype=torch.int32),
            "all": torch.ones(threads, dtype=torch.int32),
            "none": torch.zeros(threads, dtype=torch.int32),
        }[pattern]
        out = torch.full((threads * 3,), -7, dtype=torch.int32)
        t.probe_vote(pred.data_ptr(), out.data_ptr(), threads, mask)
        for tid in range(threads):
            lane, warp = tid % 32, tid // 32
            if not (mask >> lane) & 1:
                assert out[3 * tid : 3 * tid + 3].tolist() == [-7, -7, -7]
                continue
            lanes = [i for i in range(32) if (mask >> i) & 1]
            bits = sum(1 << i for i in lanes if pred[warp * 32 + i])
            ballot = int(out[3 * tid]) & 0xFFFFFFFF
            assert ballot == bits, (pattern, tid)
            assert int(out[3 * tid + 1]) == int(all(pred[warp * 32 + i] for i in lanes))
            assert int(out[3 * tid + 2]) == int(any(pred[warp * 32 + i] for i in lanes))


@pytest.mark.parametrize("workers", [1, 3])
def test_atomics(t, workers):
    blocks, threads, wrap = 8, 64, 5
    total = blocks * threads
    counters = torch.tensor([0, -1, 2**31 - 1, 0, 0, 0], dtype=torch.int32)
    sums = torch.zeros(1)
    with emulation(workers=workers):
        t.probe_atomics(counters.data_ptr(), sums.data_ptr(), blocks, threads, wrap)
    # atomicInc cycles 0..wrap: `total` increments from 0 end at total % (wrap + 1).
    assert counters.tolist() == [total, total - 1, 0, total, total % (wrap + 1), 7]
    assert float(sums[0]) == float(total)


def test_dynamic_shared_memory(t):
    threads = 200
    before, after = _i32(threads), _i32(threads)
    t.probe_dynamic_smem(before.data_ptr(), after.data_ptr(), threads)
    assert bool((before == -1).all()), "dynamic shared memory starts poisoned with 0xff bytes"
    assert torch.equal(after, torch.arange(threads - 1, -1, -1, dtype=torch.int32))


def _order(t, seed, blocks=2, threads=64, phases=3):
    out = _i32(blocks * threads * phases)
    with emulation(seed=seed):
        t.probe_order(out.data_ptr(), blocks, threads, phases)
    return out.view(blocks, phases, threads)


def test_interleaving_follows_the_seed(t):
    threads = 64
    ident = torch.arange(threads, dtype=torch.int32)
    in_order, reverse = _order(t, 0), _order(t, 1)
    assert bool((in_order == ident).all())
    assert bool((reverse == ident.flip(0)).all())
    r2, r3 = _order(t, 2), _order(t, 3)
    assert torch.equal(r2, _order(t, 2)), "a seed reproduces its interleaving"
    for r in (r2, r3):
        assert bool((r.sort(dim=-1).values == ident).all())  # a permutation per phase
        assert not bool((r == ident).all(dim=-1).any()), "random seeds do not run threads in order"
        assert not torch.equal(r[0, 0], r[0, 1]), "each barrier phase is shuffled anew"
        assert not torch.equal(r[0], r[1]), "each block has its own interleaving"
    assert not torch.equal(r2, r3)


def test_activemask_reports_the_converged_lanes(t):
    threads = 48  # a partial second warp
    out = _i32(threads)
    t.probe_activemask(out.data_ptr(), threads)
    out = out.to(torch.int64) & 0xFFFFFFFF
    for tid in range(threads):
        warp = tid // 32
        lanes = range(min(32, threads - warp * 32))
        same = [i for i in lanes if (i % 3 == 0) == ((tid % 32) % 3 == 0)]
        assert int(out[tid]) == sum(1 << i for i in same), tid


@pytest.mark.parametrize(
    "grid,block,match",
    [
        ((1, 1, 1), (1025, 1, 1), "1..1024 threads"),
        ((1, 70000, 1), (32, 1, 1), "out of range"),
        ((1, 1, 1), (1, 1, 65), "blockDim.z"),
    ],
)
def test_bad_launch_configuration(t, grid, block, match):
    out = _i32(1)
    with pytest.raises(RuntimeError, match=match):
        t.probe_indices(out.data_ptr(), *grid, *block)


def test_import_loads_no_native_module():
    code = (
        "import sys, torch, qpeft, qpeft.functional\n"
        "import qpeft.backends.cuda_emulated\n"
        "assert 'qpeft._C_cuda_emu' not in sys.modules\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_not_chosen_by_default(emu):
    import qpeft
    from qpeft._dispatch import kernel_for, kernels_of

    cpu = torch.device("cpu")
    assert "cuda_emulated" in qpeft.available_backends()
    emulated = kernels_of("cuda_emulated")
    assert {
        "quantize_4bit",
        "dequantize_4bit",
        "dequantize_4bit_nested",
        "quantize_blockwise",
        "dequantize_blockwise",
        "gemv_4bit",
    } <= set(emulated)
    for op, fn in emulated.items():
        assert kernel_for(op, cpu) is not fn, op
        with qpeft.use_backend("cuda_emulated"):
            assert kernel_for(op, cpu) is fn, op
    with qpeft.use_backend("cuda_emulated"), pytest.raises(qpeft.BackendUnavailableError):
        kernel_for("quantize_4bit", torch.device("meta"))


# --- planted bugs -------------------------------------------------------------------------
# Each runs its correct twin (must pass for every seed) and the bug, which must be
# caught: an exception from the harness, or a result the check rejects, for the
# seeds listed (deterministically: a seed fixes the interleaving of every block).


def _run_reverse(t, bug, blocks=3):
    x = torch.randn(blocks * 256)
    out = torch.zeros_like(x)
    t.bug_missing_barrier(x.data_ptr(), out.data_ptr(), blocks, bug)
    return torch.equal(out, x.view(blocks, 256).flip(1).reshape(-1))


def _run_block_sum(t, bug, blocks=3):
    x = torch.randint(-8, 8, (blocks * 256,)).float()  # integer sums: exact in any order
    out = torch.zeros(blocks)
    t.bug_divergent_barrier(x.data_ptr(), out.data_ptr(), blocks, bug)
    return torch.equal(out, x.view(blocks, 256).sum(1))


def _run_block_index(t, bug):
    x = torch.randn(1000)
    out = torch.zeros_like(x)
    t.bug_block_index(x.data_ptr(), out.data_ptr(), x.numel(), bug)
    return torch.equal(out, 2 * x)


def _run_lane_sum(fn, bug):
    x = torch.randint(-8, 8, (32,)).float()
    out = torch.zeros(1)
    fn(x.data_ptr(), out.data_ptr(), bug)
    return float(out[0]) == float(x[:16].sum())


def _run_lane_sum32(fn, bug):
    x = torch.randint(-8, 8, (32,)).float()
    out = torch.zeros(1)
    fn(x.data_ptr(), out.data_ptr(), bug)
    return float(out[0]) == float(x.sum())


def _run_spin(fn, bug):
    out = torch.zeros(64)
    fn(out.data_ptr(), bug)
    return bool((out == 1).all())


def _run_warp_sums(t, bug, blocks=2):
    x = torch.randint(-8, 8, (blocks * 256,)).float()
    out = torch.zeros(blocks * 8)
    t.bug_warp_sync(x.data_ptr(), out.data_ptr(), blocks, bug)
    return torch.equal(out, x.view(-1, 32).sum(1))


def _run_copy(fn, bug):
    x = torch.randn(128)
    out = torch.zeros(128)
    fn(x.data_ptr(), out.data_ptr(), bug)
    return torch.equal(out, x)


PLANTED = {
    # name: (run(t, bug) -> result correct?, error the harness raises or None, seeds that catch it)
    "wrong block index": (lambda t, bug: _run_block_index(t, bug), None, SEEDS),
    "divergent barrier": (
        lambda t, bug: _run_block_sum(t, bug),
        "not every thread of the block reaches",
        SEEDS,
    ),
    "missing barrier before another warp's read": (lambda t, bug: _run_reverse(t, bug), None, SEEDS),
    "shuffle reading a lane outside its mask": (
        lambda t, bug: _run_lane_sum(t.bug_shuffle_lane, bug),
        "lane 8 reads lane 16, which is not in the mask",
        SEEDS,
    ),
    "full-mask shuffle in a half-warp branch": (
        lambda t, bug: _run_lane_sum(t.bug_shuffle_missing_lanes, bug),
        "non-participating lane",
        SEEDS,
    ),
    "shuffle and barrier waiting for each other": (
        lambda t, bug: _run_lane_sum32(t.bug_deadlock, bug),
        r"deadlock: .*16 of 32 threads wait at __syncthreads\(\) at planted_bugs.cu:\d+.* lanes 0-15 wait in "
        r"__shfl_xor_sync\(mask=0xffffffff\) .* for lanes 16-31",
        SEEDS,
    ),
    "spin-wait on a flag nobody raises": (
        lambda t, bug: _run_spin(t.bug_spin_wait, bug),
        "spin-wait without progress",
        SEEDS,
    ),
    # Reverse order (seed 1) happens to be the dependency order of this reduction.
    "warp-synchronous reduction without __syncwarp": (
        lambda t, bug: _run_warp_sums(t, bug),
        None,
        [0, 2, 3, 4, 5],
    ),
    "__shared__ array indexed past its end": (
        lambda t, bug: _run_copy(t.bug_smem_oob, bug),
        r"out-of-bounds array access: index 128 into 'float \[128\]'",
        SEEDS,
    ),
    "dynamic shared memory written past its end": (
        lambda t, bug: _run_copy(t.bug_dynamic_smem_oob, bug),
        "out-of-bounds write to dynamic shared memory",
        SEEDS,
    ),
}


@pytest.mark.parametrize("name", list(PLANTED))
def test_planted_bug_is_caught(t, name):
    run, error, catching = PLANTED[name]
    for seed in SEEDS:
        with emulation(seed=seed):
            assert run(t, 0), f"{name}: the correct twin fails with seed {seed}"
    for seed in catching:
        with emulation(seed=seed):
            if error is None:
                assert not run(t, 1), f"{name}: seed {seed} gives the right result"
            else:
                with pytest.raises(RuntimeError, match=error):
                    run(t, 1)
        # The harness stays usable after a fault.
        assert run(t, 0)


def test_fault_message_names_block_thread_and_line(t):
    x = torch.randn(3 * 256)
    out = torch.zeros(3)
    with emulation(seed=0, workers=1), pytest.raises(RuntimeError) as info:
        t.bug_divergent_barrier(x.data_ptr(), out.data_ptr(), 3, 1)
    msg = str(info.value)
    assert "bug_divergent_barrier" in msg and "block (0,0,0)" in msg and "thread (" in msg
    assert "planted_bugs.cu:" in msg and "__syncthreads()" in msg
