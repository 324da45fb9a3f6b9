"""Backend "default": the pure-torch reference, registered for CPU and CUDA tensors.

Written for clarity, not speed: each step is one torch op rounding in fp32, in the
order docs/design.md ("Formats") defines, so the native and Triton kernels are held to
it bit for bit. It is every test's oracle and the fallback of every device.
"""

from __future__ import annotations

from ..._dispatch import register_backend
from . import gemv, optim, qlora, quant

register_backend(
    "default",
    {
        "quantize_4bit": quant.quantize_4bit,
        "dequantize_4bit": quant.dequantize_4bit,
        "dequantize_4bit_nested": quant.dequantize_4bit_nested,
        "quantize_blockwise": quant.quantize_blockwise,
        "dequantize_blockwise": quant.dequantize_blockwise,
        "gemv_4bit": gemv.gemv_4bit,
        "qlora_linear": qlora.qlora_linear,
        "qlora_linear_backward": qlora.qlora_linear_backward,
        **{name: getattr(optim, name) for name in optim.STEP_OPS},
    },
)
