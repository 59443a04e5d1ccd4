"""bitsandbytes interop: read the weight of a `bitsandbytes.nn.Linear4bit` (what transformers'
`BitsAndBytesConfig(load_in_4bit=True)` puts in a model) without running its matmul.

bitsandbytes is never imported here unless it already is: a model holding `Linear4bit` layers has imported it.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn


def linear4bit_class() -> type | None:
    """`bitsandbytes.nn.Linear4bit` if bitsandbytes is imported, else None."""
    if "bitsandbytes" not in sys.modules:
        return None
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit


def is_linear4bit(module: nn.Module) -> bool:
    cls = linear4bit_class()
    return cls is not None and isinstance(module, cls)


def _state(module: nn.Module):
    """The weight's QuantState, converted back from bitsandbytes' CPU-packed layout if a forward packed it."""
    w = module.weight
    qs = getattr(w, "quant_state", None) or getattr(module, "quant_state", None)
    if qs is not None and getattr(qs, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        w.data, qs = _convert_weight_packed_for_cpu_inverse(w.data, qs)  # what bitsandbytes' state_dict does
        w.quant_state = qs
    return qs


def dequantize_linear4bit(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight (out_features, in_features) of a `Linear4bit`, in `dtype` (default: the quantized dtype)."""
    qs = _state(module)
    if qs is None:  # not quantized yet (bitsandbytes quantizes when the layer moves to a device)
        w = module.weight.data
    else:
        from bitsandbytes.functional import dequantize_4bit

        w = dequantize_4bit(module.weight.data, qs).reshape(module.out_features, module.in_features)
    return w if dtype is None else w.to(dtype)


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the weight had before quantization (the layer's compute dtype if it has one)."""
    qs = _state(module)
    return getattr(module, "compute_dtype", None) or (qs.dtype if qs is not None else module.weight.dtype)


def storage_bytes(module: nn.Module) -> int:
    """Bytes that encode the weight: packed codes, absmax (8-bit with nested statistics), nested scales and
    offset. bitsandbytes' lookup tables (per layer, ~1 KB) are not counted, as ours are not."""
    qs = _state(module)
    tensors = [module.weight.data]
    if qs is not None:
        tensors.append(qs.absmax)
        if getattr(qs, "nested", False):
            tensors += [qs.state2.absmax, torch.as_tensor(qs.offset)]
    return sum(t.numel() * t.element_size() for t in tensors)


def settings(module: nn.Module) -> dict[str, Any]:
    """How a `Linear4bit` was quantized, in `lorakit.quantize`'s terms."""
    qs = _state(module)
    quant_type = getattr(qs, "quant_type", None) or getattr(module.weight, "quant_type", "fp4")
    return {
        "method": f"bitsandbytes-{quant_type}",
        "block_size": getattr(qs, "blocksize", 64),
        "double_quant": bool(getattr(qs, "nested", False)),
    }
