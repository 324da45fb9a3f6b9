"""Per-backend kernel registrations; importing this package registers them all.

``default`` is the pure-torch reference (any device), ``cpu`` the C++ kernels,
``cuda`` the CUDA C++ kernels, ``triton`` the Triton kernels, ``cuda_emulated`` the CUDA C++ kernels
run on CPU tensors by the emulation harness (a test backend, never chosen by default).
Registration imports no native module and touches no device: availability is checked
when a kernel is first chosen.
"""

from . import native_optim as _native_optim  # noqa: F401
from . import triton as _triton  # noqa: F401
from .cpu import gemv as _cpu_gemv  # noqa: F401
from .cpu import ops as _cpu_ops  # noqa: F401
from .cpu import qlora as _cpu_qlora  # noqa: F401
from .cuda import ops as _cuda_ops  # noqa: F401
from .cuda_emulated import ops as _cuda_emulated_ops  # noqa: F401
from .default import ops as _default_ops  # noqa: F401
from .default import optim as _default_optim  # noqa: F401
