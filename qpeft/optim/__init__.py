"""Optimizers over qpeft's fused step kernels (C++ on CPU, CUDA on GPU).

``AdamW`` / ``AdamW8bit`` / ``Lion`` / ``Lion8bit`` and their paged variants
``PagedAdamW`` / ``PagedAdamW8bit`` / ``PagedLion`` / ``PagedLion8bit``, which keep
the state of large parameters in CUDA unified memory (see ``qpeft.optim.paging``).
All are ``torch.optim.Optimizer`` subclasses: param groups, ``zero_grad``, LR
schedulers, ``state_dict``/``load_state_dict`` (bit-exact resume, 8-bit state
included). ``state_bytes_per_param()`` and ``memory_report()`` account for the state.
DTensor parameters (FSDP2's ``fully_shard``) are stepped on their local shards, state
sharded alike and checkpointable with torch.distributed.checkpoint at any world size
(``qpeft.optim.distributed``; docs/design.md, "Optimizers under FSDP2 and DDP").
"""

from .adamw import AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit
from .lion import Lion, Lion8bit, PagedLion, PagedLion8bit
from .optimizer import QpeftOptimizer
from .paging import PAGE_MIN_NUMEL, CudaManagedMemory

__all__ = [
    "PAGE_MIN_NUMEL",
    "AdamW",
    "AdamW8bit",
    "CudaManagedMemory",
    "Lion",
    "Lion8bit",
    "PagedAdamW",
    "PagedAdamW8bit",
    "PagedLion",
    "PagedLion8bit",
    "QpeftOptimizer",
]
