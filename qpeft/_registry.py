"""Which backend runs an op: per-op kernel tables, device priorities, `use_backend`.

Every op in ``qpeft._ops`` has one torch.library implementation that asks this
module for a kernel. By default the fastest available backend for the tensors'
device runs ("cpu" then "default" on CPU; "triton", "cuda", "default" on CUDA).
``use_backend(name)`` forces one backend inside a ``with`` block, which is how the
tests hold every backend to the pure-torch reference ("default").

"cuda_emulated" is a test backend: the CUDA C++ kernels compiled for the CPU and run
on CPU tensors by an emulation harness (qpeft._C_cuda_emu). It is slow and never
chosen by default (it is in no priority list); only ``use_backend("cuda_emulated")``
runs it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator

import torch

BACKENDS = ("default", "cpu", "cuda", "triton", "cuda_emulated")

# Backends that can run on a device type, in order of preference.
_PRIORITY = {
    "cpu": ("cpu", "default"),
    # Triton first: its kernels are the ones CI executes (under the interpreter) for
    # every op they cover; the CUDA C++ module serves the ops Triton lacks and triton-less
    # installs. No GPU timing exists yet to choose per op by speed.
    "cuda": ("triton", "cuda", "default"),
}

_kernels: dict[str, dict[str, Callable]] = {}
_availability: dict[str, Callable[[], str | None]] = {}
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("qpeft_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """A backend was requested that cannot run here (missing module, no device, ...)."""


def register_kernel(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` is ``backend``'s kernel for ``qpeft::op``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {BACKENDS}")

    def decorator(fn: Callable) -> Callable:
        _kernels.setdefault(op, {})[backend] = fn
        return fn

    return decorator


def register_availability(backend: str, check: Callable[[], str | None]) -> None:
    """``check()`` returns None when ``backend`` can run, else the reason it cannot."""
    _availability[backend] = check


def unavailable_reason(backend: str) -> str | None:
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}"
    check = _availability.get(backend)
    if check is None:
        return f"no kernels are registered for backend {backend!r}"
    return check()


def available_backends() -> list[str]:
    return [b for b in BACKENDS if unavailable_reason(b) is None]


def _device_types(backend: str) -> tuple[str, ...]:
    if backend == "default":
        return ("cpu", "cuda", "meta")
    if backend == "cuda_emulated":
        return ("cpu",)  # CUDA kernels run by the emulation harness on CPU memory
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        return ("cpu", "cuda")  # the interpreter runs Triton kernels on CPU tensors
    return ("cuda",) if backend in ("cuda", "triton") else ("cpu",)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every qpeft op inside the block with backend ``name``'s kernels.

    Raises ``BackendUnavailableError`` if the backend cannot run here, and inside
    the block an op whose tensors live on a device the backend does not serve
    raises instead of silently falling back.
    """
    reason = unavailable_reason(name)
    if reason is not None:
        raise BackendUnavailableError(f"qpeft backend {name!r} is unavailable: {reason}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def current_backend() -> str | None:
    """The backend forced by the innermost ``use_backend`` block, or None."""
    return _forced.get()


def kernel_for(op: str, device: torch.device) -> Callable:
    table = _kernels.get(op, {})
    forced = _forced.get()
    if forced is not None:
        if device.type not in _device_types(forced):
            raise BackendUnavailableError(
                f"qpeft backend {forced!r} cannot run qpeft::{op} on {device.type} tensors"
            )
        fn = table.get(forced)
        if fn is None:
            raise BackendUnavailableError(f"qpeft backend {forced!r} has no kernel for qpeft::{op}")
        return fn
    for backend in _PRIORITY.get(device.type, ("default",)):
        fn = table.get(backend)
        if fn is not None and unavailable_reason(backend) is None:
            return fn
    raise BackendUnavailableError(f"no qpeft backend can run qpeft::{op} on {device.type} tensors")
