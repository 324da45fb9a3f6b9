"""qpeft: kernels for 4-bit (QLoRA) fine-tuning in PyTorch.

Importing qpeft defines the ``torch.ops.qpeft`` ops and registers every backend's
kernels; it loads no native module and never initialises CUDA.
"""

from . import (
    _ops,  # noqa: F401
    backends,  # noqa: F401
    functional,
    nn,
    optim,
)
from ._dispatch import BackendUnavailableError, available_backends, current_backend, use_backend
from ._native import CudaFallbackWarning, ReferenceFallbackWarning, cpu_info
from .convert import add_adapter, convert, disable_adapters, merge_adapters, set_adapter, unmerge_adapters
from .loading import load_safetensors
from .quant_state import QuantState
from .serialization import load_adapter, load_quantized, save_adapter, save_quantized
from .weight4bit import Weight4bit

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "CudaFallbackWarning",
    "QuantState",
    "ReferenceFallbackWarning",
    "add_adapter",
    "available_backends",
    "convert",
    "cpu_info",
    "current_backend",
    "disable_adapters",
    "functional",
    "load_adapter",
    "load_quantized",
    "load_safetensors",
    "merge_adapters",
    "nn",
    "optim",
    "save_adapter",
    "save_quantized",
    "set_adapter",
    "unmerge_adapters",
    "use_backend",
    "Weight4bit",
]
