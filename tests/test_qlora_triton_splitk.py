"""The split schedule of the fused QLoRA kernels at small M (triton_kernels/qlora.py,
``qlora_*_split_kernel`` + ``qlora_split_reduce_kernel``; docs/design.md, "Triton configs").

Under the interpreter the tiles are 16 x 16 x 64 (BLOCK_M, BLOCK_N, BLOCK_K), so K = 192 is
3 K tiles for the forward and N = 45 is 3 N tiles (the last partial) for dx: split 3 ways,
each split runs one loop tile. M = 17, 33, 40: 2 and 3 M tiles, the last partial (the split path runs at M <= 64).

Bounds: the fp64 oracle's (qpeft/testing.py ``oracle``) hold for any summation order. Its
base term (k + 2) u |x||W| (dx: (n + 2) u |dy'||W|) is Higham's gamma bound for a sum of k
products evaluated in any binary tree (each product's error path passes through at most
k - 1 additions, and exact bf16/fp16 products in fp32), plus the LoRA and bias terms. A
split run is such a tree: within a split the loop's MMA order over its K (N) range, then
the reduction adds the S partials in split order, so each product still meets at most
k - 1 fp32 additions (S <= number of loop tiles, each tile >= 16 deep). The LoRA
down-projection (xa, g) is summed the same way and keeps its k u (n u) bound. So the bound
formulas are unchanged, and asserted below.
"""

from __future__ import annotations

import pytest
import torch

from qpeft._formats import code4
from qpeft.backends.triton.qlora import _kernels
from qpeft.testing import U32

from ._helpers import assert_bits_equal, assert_within, triton_test_device
from ._helpers import make_problem as _problem
from ._helpers import oracle as _oracle


@pytest.fixture(autouse=True)
def _on_triton_device():
    with triton_test_device():
        yield


def _state_args(p):
    st = p["state"]
    nested = (st.state2.absmax, st.state2.code, st.offset.reshape(1)) if st.nested else (None, None, None)
    n, k = st.shape
    return (
        p["packed"].reshape(-1),
        st.absmax,
        *nested,
        code4(st.quant_type, p["x"].device),
        st.blocksize,
        st.state2.blocksize if st.nested else 256,
        n,
        k,
    )


def _fwd(p, lora, split):
    a, b = (p["a"], p["b"]) if lora else (None, None)
    return _kernels().qlora_forward(
        p["x"],
        *_state_args(p),
        a,
        b,
        p["scaling"],
        p["bias"],
        p["rank_scale"] if lora else None,
        p["out_scale"],
        return_xa=lora,
        split=split,
    )


def _dyp(p):
    dy = p["dy"]
    return dy if p["out_scale"] is None else (dy.float() * p["out_scale"].float()).to(dy.dtype)


def _dx(p, lora, split):
    a, b = (p["a"], p["b"]) if lora else (None, None)
    return _kernels().qlora_dx(
        _dyp(p),
        *_state_args(p),
        a,
        b,
        p["scaling"],
        p["rank_scale"] if lora else None,
        return_g=lora,
        split=split,
    )


# (dtype, M, N, K, r, quant type, double quant, blocksize, bias, rank_scale, out_scale), LoRA on
CASES = [
    ((torch.bfloat16, 17, 45, 192, 8, "nf4", True, 64, True, True, True), True),
    ((torch.float16, 33, 45, 192, 4, "fp4", False, 64, True, False, False), False),
    # K % blocksize != 0: quant blocks straddle rows (the per-element fp32 decode path)
    ((torch.bfloat16, 40, 45, 150, 16, "nf4", True, 32, False, True, False), True),
]


def _setup(case, lora):
    p = _problem(case, seed=case[1])
    if not lora:  # no adapter: the oracle with zero LoRA weights is the base GEMM
        p["a"], p["b"], p["rank_scale"] = torch.zeros_like(p["a"]), torch.zeros_like(p["b"]), None
    return p


@pytest.mark.parametrize(
    "case,lora", CASES, ids=lambda c: "-".join(map(str, c)) if isinstance(c, tuple) else None
)
def test_split_matches_oracle(case, lora):
    p = _setup(case, lora)
    ref = _oracle(p, case[0])
    y3, xa3 = _fwd(p, lora, 3)
    dx3, g3 = _dx(p, lora, 3)
    assert_within(y3, *ref["y"], "y split 3")
    assert_within(dx3, *ref["dx"], "dx split 3")
    if lora:
        assert_within(xa3, *ref["xa"], "xa split 3")
        dyp, b = _dyp(p).double(), p["b"].double()
        n = b.shape[0]
        assert_within(g3, dyp @ b, n * U32 * (dyp.abs() @ b.abs()), "g split 3")  # fp32 g, depth <= n


@pytest.mark.parametrize("run", [_fwd, _dx], ids=["fwd", "dx"])
def test_split_is_deterministic_and_one_split_is_unsplit(run):
    # the M = 40 case (LoRA, nested absmax, quant blocks straddling rows): its per-element
    # decode is the fast one under the interpreter; the reduction does not depend on the decode
    case, lora = CASES[2]
    p = _setup(case, lora)
    out3, side3 = run(p, lora, 3)
    again3, again_side3 = run(p, lora, 3)  # fixed-order reduction, no atomics: same bits
    assert_bits_equal(again3, out3)
    assert_bits_equal(again_side3, side3)
    out1, side1 = run(p, lora, 1)  # one split: the same loop and epilogue operations
    out0, side0 = run(p, lora, 0)
    assert_bits_equal(out1, out0)
    assert_bits_equal(side1, side0)


def test_split_count_and_plan():
    kern = _kernels()
    # M = 32, N = K = 4096 on 132 SMs, forward 32x64x128 tiles: 64 tiles, 32 K tiles -> 5
    # splits of 7 tiles (320 programs >= 2 x 132)
    assert kern.split_count(64, 32, 132) == 5
    assert kern.split_count(132, 32, 132) == 1  # the grid already fills the SMs
    assert kern.split_count(10, 6, 132) == 1  # < 2 x MIN_SPLIT_TILES loop tiles: no split
    assert kern.split_count(1, 1000, 132) == 250  # 4 tiles per split at most 264 programs
    for out_tiles in (1, 7, 64, 131):
        for loop_tiles in (1, 5, 31, 32, 257):
            s = kern.split_count(out_tiles, loop_tiles, 132)
            tps = -(-loop_tiles // s)
            assert 1 <= s <= loop_tiles and (s - 1) * tps < loop_tiles  # no empty split
    cpu = torch.device("cpu")
    assert kern._split_plan("fwd", 65, 4096, 4096, 16, cpu, None) is None  # M > SPLIT_M
    assert kern._split_plan("fwd", 33, 4096, 4096, 16, cpu, 0) is None
    for name, c, loop, split in (("fwd", 45, 192, 7), ("dx", 192, 45, 2), ("fwd", 45, 4096, 3)):
        cfg, _, _, _, splits, tps = kern._split_plan(name, 1, c, loop, 8, cpu, split)
        loop_tiles = -(-loop // cfg["BLOCK_K" if name == "fwd" else "BLOCK_N"])
        assert splits <= split and (splits - 1) * tps < loop_tiles <= splits * tps  # forced, none empty


class _Recorder:
    """Stands in for a @triton.jit kernel: records each launch's grid and arguments."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launches.append((grid, args, kwargs))

        return run


@pytest.mark.parametrize(
    ("m", "r", "split_grid", "br"),
    [
        (32, 16, (64, 5), 64),
        (64, 16, (128, 3), 64),
        (1, 8, (64, 5), 32),  # 16x64x128 tiles: 64 programs, 5 splits
        (65, 16, None, 16),
        (40, 128, (128, 3), 128),
    ],
)
def test_launch_decisions_as_on_a_gpu(monkeypatch, m, r, split_grid, br):
    """With the interpreter off and recording kernels (nothing compiled or run): M = 32,
    N = K = 4096 on 132 SMs runs the split kernels (32x64 tiles: 64 programs, 5 splits of
    7 K tiles) then the reduction over the 64 output tiles; M > 64 the unsplit kernel."""
    kern = _kernels()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rec = {
        name: _Recorder()
        for name in ("qlora_fwd_kernel", "qlora_fwd_split_kernel", "qlora_split_reduce_kernel")
    }
    for name, r_ in rec.items():
        monkeypatch.setattr(kern, name, r_)
    n = k = 4096
    x = torch.zeros(m, k, dtype=torch.bfloat16, device="cpu")
    packed = torch.zeros(n * k // 2, dtype=torch.uint8, device="cpu")
    absmax = torch.ones(n * k // 64, device="cpu")
    a, b = torch.zeros(r, k, device="cpu"), torch.zeros(n, r, device="cpu")
    kern.qlora_forward(
        x, packed, absmax, None, None, None, torch.zeros(16, device="cpu"), 64, 256, n, k, a, b, 1.0
    )
    if split_grid is None:
        assert not rec["qlora_fwd_split_kernel"].launches and len(rec["qlora_fwd_kernel"].launches) == 1
        assert rec["qlora_fwd_kernel"].launches[0][2]["BLOCK_R"] == br
        return
    assert not rec["qlora_fwd_kernel"].launches
    (grid, args, kwargs) = rec["qlora_fwd_split_kernel"].launches[0]
    assert grid == split_grid and kwargs["BLOCK_R"] == br and "GROUP_M" not in kwargs
    tps = args[14]  # TILES_PER_SPLIT
    assert (grid[1] - 1) * tps < k // kwargs["BLOCK_K"] <= grid[1] * tps
    (rgrid, rargs, rkwargs) = rec["qlora_split_reduce_kernel"].launches[0]
    assert rgrid == (grid[0],) and rargs[11] == grid[1] and rkwargs["BLOCK_R"] == br  # SPLITS
