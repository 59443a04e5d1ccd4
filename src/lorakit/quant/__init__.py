"""Quantized bases for QLoRA: NF4 with double quantization in plain PyTorch (`nf4`), the model-level
`quantize` / `dequantize` (`apply`), and bitsandbytes' `Linear4bit` as a base (`bnb`)."""

from __future__ import annotations

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
