"""Test backend "cuda_emulated": the CUDA C++ kernels of ``csrc/cuda`` compiled as host
C++ and run on CPU tensors by the emulation harness (``qpeft._C_cuda_emu``, csrc/emu).

Never chosen by default; ``qpeft.use_backend("cuda_emulated")`` runs the public ops
through it, which is how CI executes every CUDA kernel without a GPU. It is slow
(every CUDA thread is a fiber): use it on small tensors. ``emulation(seed=...,
workers=...)`` sets how the harness interleaves threads: seed 0 runs ready threads in
order, 1 in reverse, >= 2 at random (reproducibly); a kernel that depends on the order
gives different results, or fails, for some seed. Importing this package loads nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from . import ops  # noqa: F401


@contextlib.contextmanager
def emulation(seed: int | None = None, workers: int | None = None) -> Iterator[None]:
    """Run the block with the harness's scheduling ``seed`` and ``workers`` OS threads
    (None keeps the current setting), restoring the previous settings afterwards."""
    from ... import _native

    mod = _native.cuda_emu_module()
    old_seed, old_workers = mod.seed(), mod.workers()
    try:
        if seed is not None:
            mod.set_seed(seed)
        if workers is not None:
            mod.set_workers(workers)
        yield
    finally:
        mod.set_seed(old_seed)
        mod.set_workers(old_workers)
