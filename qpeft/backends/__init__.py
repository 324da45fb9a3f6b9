"""The backends: each ``<backend>/ops.py`` registers all of that backend's kernels.

``default`` is the pure-torch reference (any device), ``cpu`` the C++ kernels, ``cuda``
the CUDA C++ kernels, ``triton`` the Triton kernels, ``cuda_emulated`` the CUDA C++
kernels run on CPU tensors by the emulation harness (a test backend, never chosen by
default). ``native/`` holds the wrappers of the raw-pointer ABI that cpu, cuda and
cuda_emulated share. Registration imports no native module and touches no device:
availability is probed when a kernel is first chosen.
"""

from .cpu import ops as _cpu  # noqa: F401
from .cuda import ops as _cuda  # noqa: F401
from .cuda_emulated import ops as _cuda_emulated  # noqa: F401
from .default import ops as _default  # noqa: F401
from .triton import ops as _triton  # noqa: F401
