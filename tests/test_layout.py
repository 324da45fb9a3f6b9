"""The GPU fragment layout of packed 4-bit codes (qpeft/layout.py; docs/design.md, "Formats").

repack_4bit / unrepack_4bit are byte permutations with a nibble swap: the round trip is
bit-exact for every shape the layout admits; each code lands where the byte-by-byte
definition says (the mma.sync m16n8k16 B-fragment order); absmax and the nested
statistics are untouched, so a repacked weight decodes (after unrepacking) exactly like
the original, with or without double quantization, NF4 and FP4, every blocksize.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qpeft import functional as qf
from qpeft.layout import CHUNK, fragment_layout_ok, repack_4bit, unrepack_4bit


def _bnb(codes: torch.Tensor) -> torch.Tensor:
    flat = codes.reshape(-1)
    return ((flat[0::2] << 4) | flat[1::2]).reshape(-1, 1)


def _nibble_histogram(b: torch.Tensor) -> torch.Tensor:
    flat = b.reshape(-1)
    return torch.bincount(torch.cat((flat >> 4, flat & 0xF)).long(), minlength=16)


def _code_at(repacked: torch.Tensor, n: int, k: int, row: int, kk: int) -> int:
    """The code of W[row, kk] read from the fragment layout by its definition (qpeft/layout.py)."""
    c, r = divmod(kk, CHUNK)
    s, r = divmod(r, 16)
    q, r = divmod(r, 8)
    t, p = divmod(r, 2)
    j, h = divmod(s, 2)
    e = 4 * h + 2 * q + p
    byte = int(repacked.reshape(-1)[row * k // 2 + 64 * c + 16 * t + 4 * j + e // 2])
    return (byte >> (4 * (e % 2))) & 0xF


def test_every_code_is_where_the_definition_puts_it():
    n, k = 3, 256
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    repacked = repack_4bit(_bnb(codes), n, k, 64)
    assert repacked.shape == (n * k // 2, 1) and repacked.dtype == torch.uint8
    for row in range(n):
        for kk in range(k):
            assert _code_at(repacked, n, k, row, kk) == int(codes[row, kk]), (row, kk)


def test_lane_bytes_are_the_mma_b_fragments():
    # lane (g, t) of m16n8k16: b[0] = W[g][16 s + 2t + {0, 1}], b[1] = W[g][16 s + 2t + 8 + {0, 1}];
    # word j of its 16 bytes decodes to (b[0], b[1]) of step 2j, then of step 2j + 1
    n, k = 8, 128
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    b = repack_4bit(_bnb(codes), n, k, 128).reshape(n, 4, 16)  # [row g, lane t, byte]
    for g in range(n):
        for t in range(4):
            nibbles = [int(v) for byte in b[g, t] for v in (byte & 0xF, byte >> 4)]
            want = []
            for s in range(8):
                want += [int(codes[g, 16 * s + 2 * t + d]) for d in (0, 1, 8, 9)]
            assert nibbles == want


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 9),
    chunks=st.integers(1, 4),
    blocksize=st.sampled_from([32, 64, 128, 256, 512, 1024, 2048, 4096]),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_is_bit_exact(n, chunks, blocksize, seed):
    k = CHUNK * chunks
    if k % blocksize:
        k = blocksize * max(1, k // blocksize)
    assert fragment_layout_ok(n, k, blocksize)
    packed = torch.randint(
        0, 256, (n * k // 2, 1), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )
    repacked = repack_4bit(packed, n, k, blocksize)
    assert torch.equal(unrepack_4bit(repacked, n, k, blocksize), packed)
    # a permutation of the codes: the multiset of nibbles is unchanged
    assert torch.equal(_nibble_histogram(repacked), _nibble_histogram(packed))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize(
    ("n", "k", "blocksize"), [(5, 384, 64), (3, 4096, 4096), (7, 256, 32), (1, 128, 128)]
)
def test_repacked_weight_decodes_like_the_original(quant_type, double_quant, n, k, blocksize):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * k))
    packed, state = qf.quantize_4bit(w, blocksize, quant_type, double_quant)
    repacked = repack_4bit(packed, n, k, blocksize)
    assert repacked.numel() == packed.numel()  # same bytes: 4 bits per code, statistics untouched
    back = unrepack_4bit(repacked, n, k, blocksize)
    assert torch.equal(
        qf.dequantize_4bit(back, state, torch.float32), qf.dequantize_4bit(packed, state, torch.float32)
    )


@pytest.mark.parametrize(("n", "k", "blocksize"), [(4, 64, 64), (4, 192, 64), (2, 256, 512), (0, 128, 64)])
def test_shapes_outside_the_layout_are_refused(n, k, blocksize):
    assert not fragment_layout_ok(n, k, blocksize)
    with pytest.raises(ValueError, match="fragment layout needs"):
        repack_4bit(torch.zeros(max(n * k // 2, 1), dtype=torch.uint8), n, k, blocksize)


def test_bad_inputs_are_named():
    with pytest.raises(TypeError, match="uint8"):
        repack_4bit(torch.zeros(64, dtype=torch.int8), 1, 128, 64)
    with pytest.raises(ValueError, match="packed bytes"):
        unrepack_4bit(torch.zeros(63, dtype=torch.uint8), 1, 128, 64)
