"""Where optimizer state lives, and moving paged state before and after an update.

A paged optimizer keeps the state of large parameters in memory the driver can
evict to host RAM under pressure (CUDA unified memory) and prefetches a parameter
group's state back to the device, on torch's current stream, right before the
group's update; with ``page_out=True`` it prefetches it to the host again after.
Nothing here synchronizes the device.

Placement of one parameter's state (``placement``):
  "paged"   parameter on the memory's device type, paged optimizer, >= page_min_numel
            elements (100k by default: below that a prefetch costs more than the
            bytes it saves);
  "device"  any other parameter on a GPU: ordinary torch tensors there;
  "host"    parameters on the CPU: ordinary torch tensors (a machine without CUDA
            runs the same optimizer classes this way).
"""

from __future__ import annotations

import numbers

import torch

from .._dispatch import on_device

PAGE_MIN_NUMEL = 100_000

# DLPack (type code, bits) of the state dtypes.
DLPACK_DTYPES = {torch.float32: (2, 32), torch.uint8: (1, 8)}


def check_numel_arg(value, name: str, minimum: int) -> int:
    """An element-count argument (min_8bit_size, page_min_numel) as an int: an integer,
    not a bool, a float (nan, 2.5) or a string, and at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer (elements), got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def placement(
    numel: int, device: torch.device, paged: bool, paged_device_type: str, page_min_numel: int
) -> str:
    """'paged', 'device' or 'host' for the state of a parameter (see the module docstring)."""
    if paged and device.type == paged_device_type and numel >= page_min_numel:
        return "paged"
    return "host" if device.type == "cpu" else "device"


class CudaManagedMemory:
    """Paged state in CUDA managed memory (qpeft._C_cuda: managed_dlpack, prefetch).

    Tensors are made from DLPack capsules whose deleter cudaFree's the memory when
    the last tensor over it dies. Prefetch is skipped on devices without concurrent
    managed access (there the driver migrates managed memory at each kernel launch).
    Every runtime call runs under ``on_device`` of the parameter's device: the
    allocation's context and the prefetch's stream must be that device's, not whichever
    device happens to be current (device 0 by default on a multi-GPU machine).
    """

    device_type = "cuda"

    def __init__(self) -> None:
        self._prefetch_ok: dict[int, bool] = {}

    @staticmethod
    def _module():
        from .. import _native

        return _native.cuda_module()

    @staticmethod
    def _index(device: torch.device) -> int:
        return device.index if device.index is not None else torch.cuda.current_device()

    def alloc(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        code, bits = DLPACK_DTYPES[dtype]
        module = self._module()  # first: a build without CUDA says how to get it (ImportError)
        with on_device(device):
            capsule = module.managed_dlpack(numel, code, bits, self._index(device))
        return torch.utils.dlpack.from_dlpack(capsule)

    def prefetch(self, tensors: list[torch.Tensor], device: torch.device, to_host: bool) -> None:
        with on_device(device):
            index = self._index(device)
            if index not in self._prefetch_ok:
                self._prefetch_ok[index] = bool(self._module().concurrent_managed_access(index))
            if not self._prefetch_ok[index]:
                return
            stream = torch.cuda.current_stream(device).cuda_stream
            target = -1 if to_host else index
            for t in tensors:
                self._module().prefetch(t.data_ptr(), t.numel() * t.element_size(), target, stream)

    def location(self, t: torch.Tensor) -> str:
        """'device', 'host' or 'unknown': where the range was last prefetched (the
        driver's record; pages it migrated on its own since are not reflected)."""
        with on_device(t.device):
            where = self._module().prefetch_location(t.data_ptr(), max(1, t.numel() * t.element_size()))
        return "host" if where == -1 else ("device" if where >= 0 else "unknown")


class StatePager:
    """Allocates a parameter's state where ``placement`` says and moves the paged part.

    ``memory`` is the paged-memory provider (CudaManagedMemory by default; it needs
    alloc/prefetch/location and a ``device_type``).
    """

    def __init__(
        self, paged: bool, page_out: bool, page_min_numel: int = PAGE_MIN_NUMEL, memory=None
    ) -> None:
        self.paged = paged
        self.page_out = page_out
        self.page_min_numel = check_numel_arg(page_min_numel, "page_min_numel", 0)
        self.memory = memory if memory is not None else CudaManagedMemory()

    def placement(self, param: torch.Tensor) -> str:
        where = placement(
            param.numel(), param.device, self.paged, self.memory.device_type, self.page_min_numel
        )
        if (
            where == "paged"
            and self.memory.device_type == "cuda"
            and isinstance(self.memory, CudaManagedMemory)
        ):
            from .. import _native

            reason = _native.cuda_unavailable()  # probed once per process
            if reason is not None:
                # Managed memory comes from qpeft._C_cuda: without a usable module the state
                # stays in plain device memory (unpaged) rather than failing the first step.
                _native._warn_cuda_fallback(reason)
                return "device"
        return where

    def zeros(self, param: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= s
        if self.placement(param) == "paged":
            t = self.memory.alloc(numel, dtype, param.device).view(shape)
            t.zero_()  # managed memory is not zeroed; this also first-touches it on the device
            t._qpeft_paged = True  # a marker on this tensor object (the one the optimizer state holds)
            return t
        return torch.zeros(shape, dtype=dtype, device=param.device)

    @staticmethod
    def is_paged(t: torch.Tensor) -> bool:
        return getattr(t, "_qpeft_paged", False)

    def before_update(self, tensors: list[torch.Tensor], device: torch.device) -> None:
        paged = [t for t in tensors if self.is_paged(t)]
        if paged:
            self.memory.prefetch(paged, device, to_host=False)

    def after_update(self, tensors: list[torch.Tensor], device: torch.device) -> None:
        if not self.page_out:
            return
        paged = [t for t in tensors if self.is_paged(t)]
        if paged:
            self.memory.prefetch(paged, device, to_host=True)

    def location(self, t: torch.Tensor) -> str:
        """'paged_device', 'paged_host', 'paged_unknown', 'device' or 'host'."""
        if self.is_paged(t):
            return "paged_" + self.memory.location(t)
        return "host" if t.device.type == "cpu" else "device"
