"""Which kernel runs an op: torch's dispatcher picks the device, this module the backend.

Every op of ``qpeft._ops`` gets one kernel per device key (``CPU``, ``CUDA``) registered
with ``torch.library``, so torch's dispatcher, profiler and ``torch.compile`` see real
device kernels (``torch._C._dispatch_has_kernel_for_dispatch_key("qpeft::dequantize_4bit",
"CPU")`` is true). Several backends can serve one device (on CUDA: Triton, the CUDA C++
module, the pure-torch reference), so the kernel registered for a key is a small router:

- default path: the first backend in ``PRIORITY[device]`` that registered the op and can
  run here, resolved on the first call and cached (availability is probed once per
  process, never per call);
- ``use_backend(name)``: a context variable, read once per call, forces one backend; an
  op or device that backend cannot serve raises instead of falling back silently.

Backends register in ``qpeft/backends/<backend>/ops.py`` through ``register_backend``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

BACKENDS = ("default", "cpu", "cuda", "triton", "cuda_emulated")

# Backends that serve a device type by default, in order of preference.
PRIORITY = {
    "cpu": ("cpu", "default"),
    # Triton first: its kernels are the ones CI executes (under the interpreter) for every op
    # they cover; the CUDA C++ module serves the ops Triton lacks and triton-less installs.
    # No GPU measurement exists yet to choose per op by speed (docs/design.md, backends).
    "cuda": ("triton", "cuda", "default"),
}

# torch dispatch keys of the device types qpeft has kernels for.
DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


class BackendUnavailableError(RuntimeError):
    """A backend was requested that cannot run here (missing module, no device, ...)."""


@dataclass
class _Backend:
    name: str
    kernels: dict[str, Callable] = field(default_factory=dict)
    unavailable: Callable[[], str | None] = lambda: None
    # cached result of unavailable(): probed once
    reason: str | None = None
    probed: bool = False

    def why_not(self) -> str | None:
        if not self.probed:
            self.reason = self.unavailable()
            self.probed = True
        return self.reason


_backends: dict[str, _Backend] = {}
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("qpeft_backend", default=None)
# (op, device type) -> the kernel the default path runs; filled on first use
_default_kernel: dict[tuple[str, str], Callable] = {}
# (op, device type) -> name of the backend the default path picks (kernel_backend's cache)
_default_backend: dict[tuple[str, str], str | None] = {}
_lib = torch.library.Library("qpeft", "IMPL")
_routed: set[tuple[str, str]] = set()
# op -> positions of the arguments it updates in place (version counters to bump)
_mutations: dict[str, tuple[int, ...]] = {}


# op -> the check of its arguments the router runs before any backend's kernel
# (qpeft._checks, "direct op calls")
_arg_checks: dict[str, Callable] = {}


def declare_check(op: str, check: Callable) -> None:
    """``check(*args)`` validates a call of ``qpeft::op`` before any backend's kernel runs."""
    _arg_checks[op] = check


def declare_mutations(op: str, positions: tuple[int, ...]) -> None:
    """``qpeft::op`` updates the arguments at ``positions`` in place (tensors or lists)."""
    _mutations[op] = positions


def route_other_keys(op: str) -> None:
    """Also route calls that reach no device key (a sparse tensor among the arguments, or
    no tensor at all: empty lists) through the kernel of the first tensor's device type,
    whose checks then name the problem; with no tensor at all the call is a no-op."""

    def fallback(*args):
        for a in args:
            t = a[0] if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor) else a
            if isinstance(t, torch.Tensor):
                return _router(op, t.device.type)(*args)
        return None

    _lib.impl(op, fallback, "CompositeExplicitAutograd")


class KernelTable(dict):
    """``{op name: kernel}``, filled with ``@table("op")`` on each kernel definition."""

    def __call__(self, op: str) -> Callable[[Callable], Callable]:
        def add(fn: Callable) -> Callable:
            self[op] = fn
            return fn

        return add


def register_backend(
    name: str, kernels: dict[str, Callable], unavailable: Callable[[], str | None] = lambda: None
) -> None:
    """``name`` serves ``kernels`` (op name -> kernel taking the op's arguments);
    ``unavailable()`` returns None when the backend can run, else the reason it cannot.
    Called once per backend, at import, by ``qpeft/backends/<name>/ops.py``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: {BACKENDS}")
    backend = _backends.setdefault(name, _Backend(name))
    backend.kernels.update(kernels)
    backend.unavailable = unavailable
    backend.probed = False
    _default_kernel.clear()
    _default_backend.clear()
    for op in kernels:
        for device in serves(name):
            if device in DISPATCH_KEYS and (op, device) not in _routed:
                _lib.impl(op, _router(op, device), DISPATCH_KEYS[device])
                _routed.add((op, device))


def serves(backend: str) -> tuple[str, ...]:
    """Device types whose tensors ``backend`` runs on."""
    if backend == "default":
        return ("cpu", "cuda")
    if backend == "cuda_emulated":
        return ("cpu",)  # CUDA kernels run by the emulation harness on CPU memory
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        return ("cpu", "cuda")  # the interpreter runs Triton kernels on CPU tensors
    return ("cuda",) if backend in ("cuda", "triton") else ("cpu",)


def unavailable_reason(backend: str) -> str | None:
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}"
    entry = _backends.get(backend)
    if entry is None:
        return f"no kernels are registered for backend {backend!r}"
    return entry.why_not()


def available_backends() -> list[str]:
    return [b for b in BACKENDS if unavailable_reason(b) is None]


def kernels_of(backend: str) -> dict[str, Callable]:
    """``{op: kernel}`` registered by ``backend`` (empty when it registered none)."""
    entry = _backends.get(backend)
    return dict(entry.kernels) if entry is not None else {}


def reset() -> None:
    """Forget every cached availability probe and default choice (tests that change
    the environment, e.g. hide a native module, call this)."""
    for backend in _backends.values():
        backend.probed = False
    _default_kernel.clear()
    _default_backend.clear()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every qpeft op inside the block with backend ``name``'s kernels.

    Raises ``BackendUnavailableError`` if the backend cannot run here, and inside the
    block an op whose tensors live on a device the backend does not serve raises
    instead of silently falling back.
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


# One shared instance: nullcontext is reusable, so a CPU call allocates nothing.
_NO_DEVICE_GUARD = contextlib.nullcontext()


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """The context every kernel launch and CUDA-runtime call on ``device``'s memory runs in.

    For a CUDA device: ``torch.cuda.device(device)``, so that on a multi-GPU machine the
    launch goes to the tensor's device and torch's current stream *of that device* (Triton
    and the CUDA runtime read the current device; a stream of one device used while another
    is current is an invalid-handle error). For any other device: a shared no-op.
    ``torch.cuda.device`` is looked up at each call (tests replace it to record launches).
    """
    if device.type == "cuda":
        return torch.cuda.device(device)
    return _NO_DEVICE_GUARD


def kernel_for(op: str, device: torch.device | str) -> Callable:
    """The kernel ``qpeft::op`` runs on ``device`` right now (forced or default). Kernels
    that compose other ops (the CPU QLoRA layer decodes W panel by panel) call each
    other through this, skipping the dispatcher's per-call cost."""
    device_type = device if isinstance(device, str) else device.type
    forced = _forced.get()
    if forced is not None:
        return _forced_kernel(op, forced, device_type)
    fn = _default_kernel.get((op, device_type))
    return fn if fn is not None else _resolve_default(op, device_type)


def kernel_backend(op: str, device: torch.device | str) -> str | None:
    """The backend whose kernel ``qpeft::op`` runs on ``device`` right now (forced or
    default), or None when none can (the call would raise). Lets a composition choose
    between two ops, e.g. ``functional.linear_4bit`` takes the GEMV only where a kernel
    other than the whole-W reference serves it (docs/design.md, "Decode path")."""
    device_type = device if isinstance(device, str) else device.type
    forced = _forced.get()
    if forced is not None:
        entry = _backends.get(forced)
        ok = entry is not None and op in entry.kernels and device_type in serves(forced)
        return forced if ok else None
    key = (op, device_type)
    if key in _default_backend:
        return _default_backend[key]
    choice = None
    for name in PRIORITY.get(device_type, ("default",)):
        entry = _backends.get(name)
        if entry is not None and op in entry.kernels and entry.why_not() is None:
            choice = name
            break
    _default_backend[key] = choice
    return choice


def kernel_after(op: str, device: torch.device | str, backend: str) -> Callable:
    """The default kernel of ``qpeft::op`` on ``device`` from the backends after ``backend``
    in ``PRIORITY``: what a default-mode call goes to when ``backend``'s kernel does not
    take its arguments (the Triton QLoRA kernels take no fp64), so that the call runs on
    the next backend, as if ``backend`` lacked the op, instead of failing."""
    device_type = device if isinstance(device, str) else device.type
    order = PRIORITY.get(device_type, ("default",))
    for name in order[order.index(backend) + 1 :] if backend in order else order:
        entry = _backends.get(name)
        fn = None if entry is None else entry.kernels.get(op)
        if fn is not None and entry.why_not() is None:
            return fn
    raise BackendUnavailableError(
        f"no qpeft backend after {backend!r} can run qpeft::{op} on {device_type} tensors"
    )


def has_kernel(op: str, device: torch.device | str) -> bool:
    """True when ``qpeft::op`` can run on ``device`` right now (see ``kernel_backend``)."""
    return kernel_backend(op, device) is not None


def _forced_kernel(op: str, backend: str, device_type: str) -> Callable:
    if device_type not in serves(backend):
        raise BackendUnavailableError(
            f"qpeft backend {backend!r} cannot run qpeft::{op} on {device_type} tensors"
        )
    fn = _backends[backend].kernels.get(op)
    if fn is None:
        raise BackendUnavailableError(f"qpeft backend {backend!r} has no kernel for qpeft::{op}")
    return fn


def _resolve_default(op: str, device_type: str) -> Callable:
    for name in PRIORITY.get(device_type, ("default",)):
        backend = _backends.get(name)
        fn = None if backend is None else backend.kernels.get(op)
        if fn is None:
            continue
        if backend.why_not() is None:  # the cpu backend's probe warns when it falls back
            _default_kernel[(op, device_type)] = fn
            return fn
    raise BackendUnavailableError(f"no qpeft backend can run qpeft::{op} on {device_type} tensors")


def _router(op: str, device_type: str) -> Callable:
    """The kernel torch calls for ``qpeft::op`` on ``device_type`` tensors."""
    key = (op, device_type)
    default = _default_kernel
    forced_var = _forced

    def route(*args):
        forced = forced_var.get()
        if forced is not None:
            return _forced_kernel(op, forced, device_type)(*args)
        fn = default.get(key)
        if fn is None:
            fn = _resolve_default(op, device_type)
        return fn(*args)

    check = _arg_checks.get(op)
    if check is not None:  # every backend's kernel gets arguments it can read safely
        unchecked = route

        def route(*args):
            check(*args)
            return unchecked(*args)

    mutated = _mutations.get(op)
    if mutated:
        plain = route

        def route(*args):
            plain(*args)
            for i in mutated:  # what custom_op's wrappers would do: one call per list
                torch.autograd.graph.increment_version(args[i])

    route.__name__ = f"{op}_{device_type}"
    return route
