"""qpeft: kernels for 4-bit (QLoRA) fine-tuning in PyTorch.

Importing qpeft defines the ``torch.ops.qpeft`` ops and registers every backend's
kernels; it loads no native module and never initialises CUDA.
"""

from . import _ops  # noqa: F401
from . import backends  # noqa: F401
from . import functional
from ._registry import BackendUnavailableError, available_backends, current_backend, use_backend
from .quant_state import QuantState

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "QuantState",
    "available_backends",
    "current_backend",
    "functional",
    "use_backend",
]
