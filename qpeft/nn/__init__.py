"""Drop-in modules: ``Linear4bit`` (frozen 4-bit linear, bitsandbytes state-dict layout),
``QLoRALinear`` (LoRA / rsLoRA / DoRA / BitFit adapters over a 4-bit or 16-bit base,
several named adapters per layer) and ``IA3Linear`` (output scaling)."""

from .ia3 import IA3Linear
from .linear4bit import Linear4bit
from .lora import LoRAAdapter, MergeReport, QLoRALinear

__all__ = ["IA3Linear", "Linear4bit", "LoRAAdapter", "MergeReport", "QLoRALinear"]
