"""LoRA and its variants (rsLoRA, DoRA, PiSSA/OLoRA init, lora_bias)."""

from adapters_core.methods.lora.config import LoraConfig
from adapters_core.methods.lora.layer import LoraLayer

__all__ = ["LoraConfig", "LoraLayer"]
