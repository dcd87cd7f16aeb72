"""Serving pieces of the engine: adapters in fixed slots of one resident model, one slot per batch row.

See :class:`SlottedModel` (slots, routing), :func:`prepare_adapter` (PEFT files → slot layout) and
:mod:`adapters_core.serving.kernels` (the batched LoRA product in torch), with the compiled CPU kernel
(:mod:`~adapters_core.serving.cpu_bgmv`) and the fused GPU decode kernel (:mod:`~adapters_core.serving.gpu_bgmv`).
"""

from adapters_core.serving.layers import SlotLoraLayer, SlotModuleSwap, SlotWeights
from adapters_core.serving.prepare import PreparedAdapter, prepare_adapter
from adapters_core.serving.slotted import SlottedModel

__all__ = ["PreparedAdapter", "SlotLoraLayer", "SlotModuleSwap", "SlotWeights", "SlottedModel", "prepare_adapter"]
