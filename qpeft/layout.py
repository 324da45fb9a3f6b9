"""The GPU fragment layout of packed 4-bit weights (docs/design.md, "Formats: the GPU fragment layout").

Pure torch (runs anywhere, CPU included): ``repack_4bit`` reorders the packed codes of a
row-major [N, K] weight from bitsandbytes' layout into the fragment layout, and
``unrepack_4bit`` is its exact inverse (a byte permutation plus a nibble swap: the round
trip is bit-exact). Only the codes move; absmax, the double-quantization codes and the
nested absmax keep bitsandbytes' order, because every quant block still lies in one row
(``fragment_layout_ok``) and the layout only permutes codes within a row.

The layout, byte by byte (row n, 128-code chunk c = 64 bytes, lane t in 0..3, 32-bit
word j in 0..3, nibble e in 0..7 = bits 4e..4e+3 of the little-endian word, so byte
e // 2, low nibble first):

    byte  n * K/2 + 64 c + 16 t + 4 j + e // 2  holds, in nibble e % 2, the code of
    k = 128 c + 16 (2 j + e // 4) + 8 ((e // 2) % 2) + 2 t + e % 2

so the 16 bytes of (n, c, t) are exactly what lane (g = n % 8, t) of an mma.sync
m16n8k16 needs as B operand ("col" B = W^T: b[0] = W[g][16 s + 2t .. + 1], b[1] =
W[g][16 s + 2t + 8 .. + 9]) for the 8 k16 steps s of chunk c: word j decodes into the four
16-bit pairs (b[0], b[1]) of step 2j and of step 2j + 1, in nibble order. One 16-byte
load per lane per 128 k; no shuffle, no shared-memory staging of W.
"""

from __future__ import annotations

import torch

__all__ = ["LAYOUT_BNB", "LAYOUT_FRAGMENT", "fragment_layout_ok", "repack_4bit", "unrepack_4bit"]

LAYOUT_BNB = "bnb"  # bitsandbytes: flat row-major codes, two per byte, high nibble first
LAYOUT_FRAGMENT = "fragment"  # the layout above
CHUNK = 128  # codes per row chunk (64 bytes: 4 lanes x 16 bytes)


def fragment_layout_ok(n: int, k: int, blocksize: int) -> bool:
    """Whether an [n, k] weight can take the fragment layout: rows of whole 128-code chunks
    and of whole quant blocks (so absmax keeps its order), and at least one element."""
    return n > 0 and k > 0 and k % CHUNK == 0 and k % blocksize == 0


def _check(packed: torch.Tensor, n: int, k: int, blocksize: int) -> None:
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed 4-bit codes must be uint8, got {packed.dtype}")
    if not fragment_layout_ok(n, k, blocksize):
        raise ValueError(
            f"the fragment layout needs in_features divisible by {CHUNK} and by the blocksize "
            f"({blocksize}); got a [{n}, {k}] weight: it stays in the bitsandbytes layout"
        )
    if packed.numel() != n * k // 2:
        raise ValueError(f"a [{n}, {k}] weight has {n * k // 2} packed bytes, got {packed.numel()}")


# code index within a chunk, as [J, H, Q, T, P] (k = 32 j + 16 h + 8 q + 2 t + p); the
# fragment order is [T, J, H, Q, P] (lane, word, nibble e = 4 h + 2 q + p)
_TO_FRAGMENT = (0, 1, 5, 2, 3, 4, 6)  # [N, C, J, H, Q, T, P] -> [N, C, T, J, H, Q, P]
_FROM_FRAGMENT = (0, 1, 3, 4, 5, 2, 6)  # the inverse permutation


def repack_4bit(packed: torch.Tensor, n: int, k: int, blocksize: int) -> torch.Tensor:
    """bitsandbytes-layout codes of an [n, k] weight (uint8, any shape of n * k / 2
    bytes) -> the fragment layout, uint8 of the same shape (a new tensor)."""
    _check(packed, n, k, blocksize)
    b = packed.reshape(-1)
    codes = torch.stack((b >> 4, b & 0xF), dim=-1)  # element 2i: high nibble (bitsandbytes)
    codes = codes.reshape(n, k // CHUNK, 4, 2, 2, 4, 2).permute(_TO_FRAGMENT).reshape(-1, 2)
    out = codes[:, 0] | (codes[:, 1] << 4)  # nibble e even: low nibble
    return out.reshape(packed.shape)


def unrepack_4bit(packed: torch.Tensor, n: int, k: int, blocksize: int) -> torch.Tensor:
    """The inverse of ``repack_4bit``: fragment-layout codes -> bitsandbytes' layout."""
    _check(packed, n, k, blocksize)
    b = packed.reshape(-1)
    codes = torch.stack((b & 0xF, b >> 4), dim=-1)
    codes = codes.reshape(n, k // CHUNK, 4, 4, 2, 2, 2).permute(_FROM_FRAGMENT).reshape(-1, 2)
    out = (codes[:, 0] << 4) | codes[:, 1]
    return out.reshape(packed.shape)
