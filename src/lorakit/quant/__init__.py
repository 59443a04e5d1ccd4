"""Quantized bases for QLoRA: NF4 with double quantization in plain PyTorch (`nf4`), the model-level
`quantize` / `dequantize` (`apply`), and bitsandbytes' `Linear4bit` as a base (`bnb`).

A plug-in: importing it registers the 4-bit layers as LoRA bases (`handlers`), records in every saved adapter the
quantized base it was trained on, and notes a mismatch when such an adapter is loaded onto a full-precision base.
"""

from __future__ import annotations

from lorakit.formats import register_load_hook, register_metadata
from lorakit.quant import handlers as _handlers  # noqa: F401 (registers the 4-bit layers as LoRA bases)
from lorakit.quant import loftq as _loftq  # noqa: F401 (registers the "loftq" init)
from lorakit.quant.apply import (
    QuantReport,
    adapter_base_quantization,
    adapter_metadata,
    base_quantization,
    dequantize,
    is_quantized,
    note_adapter_base,
    quant_stats,
    quantize,
    quantized_modules,
)
from lorakit.quant.nf4 import NF4Linear

__all__ = [
    "NF4Linear",
    "QuantReport",
    "adapter_base_quantization",
    "adapter_metadata",
    "base_quantization",
    "dequantize",
    "is_quantized",
    "note_adapter_base",
    "quant_stats",
    "quantize",
    "quantized_modules",
]

register_metadata(lambda model, name: adapter_metadata(model))
register_load_hook(note_adapter_base)
