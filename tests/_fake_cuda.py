"""Two fake CUDA devices, to test without a GPU that every launch runs on its tensors' device.

On a multi-GPU machine a kernel launched while device 0 is current, on tensors of device 1,
runs on the wrong device (Triton, the CUDA runtime) or with a stream of another device
(an invalid-handle error); the CPU cannot show either. This mock makes both visible:

- ``FakeCudaTensor``: CPU memory whose ``.device`` says ``cuda:1`` (``is_cuda`` True), made
  by a torch-function mode that also turns ``device="cuda:1"`` in any factory call into a
  CPU allocation that claims cuda:1. Pointers are real host pointers, so the kernels run
  (native ones in the CUDA emulation harness, Triton ones in its interpreter) and their
  results can be checked.
- ``torch.cuda.device`` / ``current_device`` / ``current_stream`` are replaced by a record
  of one "current device" (0 until a guard changes it) and one stream handle per device.
- Every launch is recorded with the device current at that moment and the stream it gets:
  native calls through a stand-in for ``qpeft._C_cuda`` (the stream is their last
  argument), Triton launches at the interpreter's ``run`` (Triton takes the current
  device's current stream, as on a GPU).

A launch without ``qpeft._dispatch.on_device`` around it records device 0 (and for Triton
device 0's stream), which is what ``FakeCuda.assert_all_on`` rejects.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

# Distinct handles per device; real ones are pointers, these only have to differ.
STREAM_BASE = 0x5000


def stream_of(index: int) -> int:
    return STREAM_BASE + index


class FakeCudaTensor(torch.Tensor):
    """Host memory that reports a CUDA device (see the module docstring)."""


def _is_cuda_device(a) -> bool:
    return (isinstance(a, torch.device) and a.type == "cuda") or (isinstance(a, str) and a.startswith("cuda"))


class _FakeCudaMode(TorchFunctionMode):
    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self._device_get = torch.Tensor.device.__get__
        self._is_cuda_get = torch.Tensor.is_cuda.__get__
        # Storages handed out as fake device memory: a tensor over one is a fake even when
        # autograd hands it back as a plain Tensor (a saved tensor whose Python object died).
        self.storages: set[int] = set()

    def is_fake(self, a) -> bool:
        if isinstance(a, FakeCudaTensor):
            return True
        if not isinstance(a, torch.Tensor):
            return False
        with torch._C.DisableTorchFunctionSubclass():
            return a.untyped_storage().data_ptr() in self.storages

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.device:  # naming a device allocates nothing: keep it as asked
            return func(*args, **kwargs)
        fake_in = any(self.is_fake(a) for a in tree_flatten((args, kwargs))[0])
        if fake_in and func == self._device_get:
            return self.device
        if fake_in and func == self._is_cuda_get:
            return True
        if fake_in and func is torch.Tensor.get_device:
            return self.device.index
        if isinstance(func, torch._ops.OpOverload | torch._ops.OpOverloadPacket) and str(func).startswith(
            "qpeft."
        ):
            # Run qpeft's router with this mode still active, so that the kernels below see
            # cuda:1 tensors (torch would run them with the mode popped); the dispatcher would
            # pick the CPU key of these host tensors, so call the forced backend's kernel.
            from qpeft import _dispatch

            name = str(func).split(".")[1]
            with self:
                return _dispatch.kernel_for(name, self.device)(*args, **kwargs)
        to_cuda = any(_is_cuda_device(a) for a in tree_flatten((args, kwargs))[0])
        args, kwargs = tree_map(lambda a: torch.device("cpu") if _is_cuda_device(a) else a, (args, kwargs))
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if not (fake_in or to_cuda):
            return out

        def wrap(t):
            if isinstance(t, torch.Tensor):
                with torch._C.DisableTorchFunctionSubclass():
                    ptr = t.untyped_storage().data_ptr()
                    if ptr:
                        self.storages.add(ptr)
                    if not isinstance(t, FakeCudaTensor):
                        return t.as_subclass(FakeCudaTensor)
            return t

        return tree_map(wrap, out)


class FakeCuda:
    """The fake devices, the launch record and the stand-in CUDA module (see the module doc)."""

    def __init__(self, emu_module) -> None:
        self.current = 0
        self.launches: list[tuple[str, str, int, int | None]] = []
        self._emu = emu_module

    # --- torch.cuda stand-ins ---------------------------------------------------------
    def device_guard(self, device):
        fake = self

        class _Guard:
            def __enter__(self):
                self.prev = fake.current
                index = device if isinstance(device, int) else torch.device(device).index
                if index is not None and index >= 0:
                    fake.current = index

            def __exit__(self, *exc):
                fake.current = self.prev
                return False

        return _Guard()

    def current_stream(self, device=None):
        index = self.current if device is None else torch.device(device).index
        return types.SimpleNamespace(cuda_stream=stream_of(self.current if index is None else index))

    # --- qpeft._C_cuda stand-in --------------------------------------------------------
    def module(self):
        fake = self

        class _Module:
            def __getattr__(self, name):
                return functools.partial(fake._native_call, name)

        return _Module()

    def _native_call(self, name, *args):
        if name == "managed_dlpack":
            numel, _, bits, _ = args
            self.launches.append(("native", name, self.current, None))
            return torch.utils.dlpack.to_dlpack(
                torch.zeros(numel, dtype=torch.float32 if bits == 32 else torch.uint8)
            )
        if name == "concurrent_managed_access":
            self.launches.append(("native", name, self.current, None))
            return True
        if name == "probe":  # qpeft/_native.py's one availability probe: the stand-in device works
            return ""
        if name == "prefetch_location":
            self.launches.append(("native", name, self.current, None))
            return self.current
        # Kernel entry points and prefetch take the stream handle last.
        self.launches.append(("native", name, self.current, args[-1]))
        if name == "prefetch":
            return None
        return getattr(self._emu, name)(*args[:-1], 0)  # the harness ignores the stream

    def assert_all_on(self, index: int, kinds: set[str]) -> None:
        seen = {kind for kind, *_ in self.launches}
        assert kinds <= seen, f"expected {sorted(kinds)} launches, recorded only {sorted(seen)}"
        wrong = [
            rec
            for rec in self.launches
            if rec[2] != index or (rec[3] is not None and rec[3] != stream_of(index))
        ]
        assert not wrong, (
            f"{len(wrong)} of {len(self.launches)} launches not on cuda:{index} and its stream "
            f"{stream_of(index):#x}: {wrong[:4]}"
        )


def _clear_device_caches() -> None:
    """Device-keyed caches (code tables) now hold fake cuda:1 tensors: drop them."""
    import qpeft._formats as formats

    mods = [formats]
    with contextlib.suppress(ImportError):
        import qpeft.triton_kernels.quant as tq

        mods.append(tq)
    for mod in mods:
        for value in vars(mod).values():
            if callable(getattr(value, "cache_clear", None)):
                value.cache_clear()


@contextlib.contextmanager
def fake_cuda(monkeypatch, index: int = 1):
    """Inside: cuda:``index`` tensors are fakes, device 0 is current, launches are recorded."""
    from qpeft import _dispatch, _native

    emu = _native.cuda_emu_module()
    fake = FakeCuda(emu)
    real_load = _native._load
    monkeypatch.setattr(
        _native, "_load", lambda name: (fake.module(), None) if name == "_C_cuda" else real_load(name)
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", fake.device_guard)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: fake.current)
    monkeypatch.setattr(torch.cuda, "current_stream", fake.current_stream)

    mode = _FakeCudaMode(torch.device("cuda", index))
    real_from_dlpack = torch.utils.dlpack.from_dlpack

    def from_dlpack(capsule):  # managed memory of the fake device claims that device
        with torch._C.DisableTorchFunctionSubclass():
            t = real_from_dlpack(capsule)
            mode.storages.add(t.untyped_storage().data_ptr())
            return t.as_subclass(FakeCudaTensor)

    monkeypatch.setattr(torch.utils.dlpack, "from_dlpack", from_dlpack)
    with contextlib.suppress(ImportError):
        from triton.runtime.interpreter import InterpretedFunction

        real_run = InterpretedFunction.run

        def run(self, *args, **kwargs):
            fake.launches.append(("triton", self.__name__, fake.current, fake.current_stream().cuda_stream))
            return real_run(self, *args, **kwargs)

        monkeypatch.setattr(InterpretedFunction, "run", run)
    # torch's autograd engine does not carry torch-function modes into backward: re-enter
    # the mode there, so the backward kernels see their tensors' fake device as well.
    from qpeft.autograd import QLoRAFunction

    real_backward = QLoRAFunction.backward

    def backward(ctx, *grads):
        with mode:
            return real_backward(ctx, *grads)

    monkeypatch.setattr(QLoRAFunction, "backward", staticmethod(backward))
    _dispatch.reset()  # availability probes ran against the real torch.cuda
    _native._cuda_probe.cache_clear()  # ... and the module probe against the real module
    try:
        with mode:
            yield fake
    finally:
        _clear_device_caches()
        monkeypatch.undo()
        _dispatch.reset()
        _native._cuda_probe.cache_clear()
