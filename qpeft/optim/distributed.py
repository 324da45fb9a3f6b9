"""Optimizer state of DTensor parameters (FSDP2's ``fully_shard``) and the "rows"
checkpoint layout of 8-bit state, which reshards exactly (docs/design.md,
"Optimizers under FSDP2 and DDP").

A DTensor parameter is stepped through its local shard: the step ops see
``param.to_local()`` and ``grad.to_local()``, and the per-element state (fp32 moments,
8-bit codes) is a DTensor over a local tensor, with the parameter's mesh, placements
and global shape, as torch.optim keeps it. The 8-bit absmax belongs to the blocks of
the local shard, which are not blocks of the whole tensor, so it stays a plain local
tensor; the state dict carries it as a per-row table instead (``absmax_to_rows``).

Nothing here imports torch.distributed: a DTensor can only exist once
``torch.distributed.tensor`` has been imported by whoever made it.
"""

from __future__ import annotations

import sys

import torch

from .._optim_math import STATE_BLOCK

# Placements whose local shard is a contiguous range of whole dim-0 rows of the global
# tensor (or all of it): every element's block-local position is then fixed by its row.
SUPPORTED = "Shard(0) or Replicate() on every mesh dimension"


def dtensor_type():
    """The DTensor class, or None if torch.distributed.tensor was never imported."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def is_dtensor(t) -> bool:
    cls = dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the very tensor object it holds, not a view: the
    paged-memory marker lives on it), or ``t`` itself."""
    # DTensor.to_local() returns this object only with grad mode off; it is the same
    # attribute either way.
    return t._local_tensor if is_dtensor(t) else t


def check_placements(p, where: str) -> None:
    """ValueError unless every placement of DTensor ``p`` is Shard(0) or Replicate()."""
    from torch.distributed.tensor import Replicate, Shard

    bad = [pl for pl in p.placements if not (type(pl) is Replicate or (type(pl) is Shard and pl.dim == 0))]
    if bad:
        raise ValueError(
            f"{where} is a DTensor with placements {tuple(p.placements)}; qpeft optimizers step DTensors "
            f"with {SUPPORTED} (what fully_shard makes by default, and HSDP), because 8-bit state is "
            "quantized in blocks of the local shard and checkpointed per dim-0 row. Shard the parameter "
            "with fully_shard without a shard_placement_fn (or one returning Shard(0)), or "
            "redistribute it to Shard(0)"
        )


def local_grad(p, g, where: str) -> torch.Tensor:
    """The local shard of the gradient of DTensor ``p``, which must be a DTensor with the
    parameter's mesh and placements (the reduced, sharded gradient FSDP2 leaves)."""
    if not is_dtensor(g):
        raise TypeError(
            f"the gradient of {where} is a {type(g).__name__}, the parameter a DTensor: the gradient "
            "must be a DTensor with the parameter's placements (FSDP2 leaves one after backward)"
        )
    if g.device_mesh != p.device_mesh or tuple(g.placements) != tuple(p.placements):
        raise ValueError(
            f"the gradient of {where} has placements {tuple(g.placements)}, the parameter "
            f"{tuple(p.placements)} (or another mesh): a Partial gradient must be reduced first; "
            "redistribute it with grad.redistribute(param.device_mesh, param.placements)"
        )
    return g._local_tensor


def wrap_like(t: torch.Tensor, p, shape: tuple[int, ...] | None = None):
    """``t`` (a local tensor of p's shard layout) as a DTensor with p's mesh and
    placements and global shape ``shape`` (default p's)."""
    from torch.distributed.tensor import DTensor

    shape = tuple(p.shape) if shape is None else shape
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(s, 1)
    return DTensor.from_local(
        t,
        p.device_mesh,
        p.placements,
        run_check=False,
        shape=torch.Size(shape),
        stride=tuple(reversed(stride)),
    )


def localize(saved: torch.Tensor, p, shape: tuple[int, ...]) -> torch.Tensor:
    """The part of a loaded state tensor (global shape ``shape``, laid out along dim 0 as
    parameter p) that this rank keeps: the local shard of a DTensor (redistributed if its
    placements differ from p's), the matching slice of a plain full tensor, or for a
    plain parameter the whole tensor (a DTensor is gathered: a collective)."""
    if not is_dtensor(p):
        return saved.full_tensor() if is_dtensor(saved) else saved
    if is_dtensor(saved):
        if saved.device_mesh != p.device_mesh or tuple(saved.placements) != tuple(p.placements):
            saved = saved.redistribute(p.device_mesh, p.placements)
        return saved._local_tensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    sizes, offsets = compute_local_shape_and_global_offset(shape, p.device_mesh, p.placements)
    return saved[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))]


# --- the "rows" layout of 8-bit absmax -------------------------------------------------
#
# A Shard(0) shard is a run of whole dim-0 rows, and the blocks of 256 of an 8-bit state
# start at the shard's first element. Each row of R elements therefore starts at a fixed
# offset ("phase") in its first block and touches at most k = (R + 254) // 256 + 1
# consecutive blocks. The table has one row per dim-0 row: [phase, absmax of the 1st,
# 2nd, ... k-th block the row touches] (unused entries repeat the last block). It is
# sharded along dim 0 exactly like the parameter, so DCP reshards it with the codes, and
# it gives every element the absmax its code was quantized with, whatever the layout.


def rows_geometry(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(rows, elements per row, table columns - 1) of a parameter of global ``shape``."""
    rows = shape[0] if shape else 1
    numel = 1
    for s in shape:
        numel *= s
    row = numel // rows if rows else 0
    return rows, row, (row + STATE_BLOCK - 2) // STATE_BLOCK + 1


def absmax_to_rows(absmax: torch.Tensor, rows: int, row: int, k: int) -> torch.Tensor:
    """The [rows, 1 + k] table of a local shard of ``rows`` rows of ``row`` elements whose
    8-bit state has block absmax ``absmax`` (blocks of 256 from the shard's start)."""
    dev = absmax.device
    start = torch.arange(rows, device=dev, dtype=torch.int64) * row
    idx = (start // STATE_BLOCK)[:, None] + torch.arange(k, device=dev, dtype=torch.int64)
    table = torch.empty((rows, 1 + k), dtype=torch.float32, device=dev)
    table[:, 0] = (start % STATE_BLOCK).float()
    if rows:
        table[:, 1:] = absmax[idx.clamp_(max=absmax.numel() - 1)]
    return table


def rows_to_state(
    q: torch.Tensor, table: torch.Tensor, code: torch.Tensor, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, block absmax) of the 8-bit state of a local shard (blocks of 256 from its
    start) from its codes ``q`` (any shape, rows along dim 0) and its rows table.

    A block whose elements all carry the same saved absmax (bitwise) keeps its codes and
    that absmax: the state is the saved one, bit for bit (always so when the saved blocks
    are this shard's blocks: the same world size, or shard boundaries on multiples of 256
    elements). Any other block straddles saved blocks with different absmax: its elements
    are dequantized with their own absmax and that block is quantized again (the step's
    encoding), an error of at most half a code step of the new absmax per element."""
    # The step's own state encoding (the reference the kernels equal bit for bit).
    from ..backends.default.optim import quantize_state

    rows = table.shape[0]
    flat_q = q.reshape(-1)
    n = flat_q.numel()
    if n == 0:
        return flat_q.clone(), torch.empty((0,), dtype=torch.float32, device=q.device)
    row = n // rows
    k = table.shape[1] - 1
    phase_f = table[:, 0]
    phase = phase_f.long()
    if not bool(((phase_f == phase.float()) & (phase >= 0) & (phase < STATE_BLOCK)).all()):
        raise ValueError(
            f"the rows absmax table of {where} has a phase column outside 0..{STATE_BLOCK - 1}: "
            "the checkpoint is corrupt"
        )
    col = (phase[:, None] + torch.arange(row, device=q.device)) // STATE_BLOCK
    if row and int(col.max()) >= k:
        raise ValueError(f"the rows absmax table of {where} has {k + 1} columns, too few for its rows")
    per_elem = table[:, 1:].gather(1, col).reshape(-1)  # the absmax of every element's code
    nb = -(n // -STATE_BLOCK)
    pad = nb * STATE_BLOCK - n
    firsts = per_elem[::STATE_BLOCK]
    blocks = torch.cat([per_elem, firsts[-1:].expand(pad)]).view(nb, STATE_BLOCK)
    bits = blocks.view(torch.int32)
    uniform = (bits == bits[:, :1]).all(dim=1)
    absmax = firsts.clone()
    if bool(uniform.all()):
        return flat_q.clone(), absmax
    values = code[flat_q.long()] * per_elem  # the step's decode: code[q] * absmax in fp32
    new_q, new_absmax = quantize_state(values, code)
    keep = uniform.repeat_interleave(STATE_BLOCK)[:n]
    out_q = torch.where(keep, flat_q, new_q)
    out_absmax = torch.where(uniform, absmax, new_absmax)
    return out_q, out_absmax
