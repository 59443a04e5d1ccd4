"""bitsandbytes interop: read the weight of a `bitsandbytes.nn.Linear4bit` (what transformers'
`BitsAndBytesConfig(load_in_4bit=True)` puts in a model) without running its matmul.

bitsandbytes is never imported here unless it already is: a model holding `Linear4bit` layers has imported it.
"""

from __future__ import annotations

import copy
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


def _raw_state(module: nn.Module):
    return getattr(module.weight, "quant_state", None) or getattr(module, "quant_state", None)


def _packed_for_cpu(qs) -> bool:
    return qs is not None and bool(getattr(qs, "packing_format_for_cpu", False))


def _standard_layout(module: nn.Module):
    """(codes, QuantState) in bitsandbytes' standard layout, without changing the module.

    On a CPU with AVX512-BF16, bitsandbytes repacks a `Linear4bit` for its own kernel at the layer's first
    forward in eval mode without grad: the codes are reordered (lossless), and the absmax constants are
    de-nested and rounded to bf16, which is what the layer computes with from then on. Its own inverse
    (`state_dict`) re-quantizes those constants to 8 bits, a second rounding, and writes it into the module. So
    here the codes are reordered on a copy and the bf16 constants are kept as they are: the weight read is the
    one the layer now computes with, and the module is left as it was.
    """
    qs = _raw_state(module)
    if not _packed_for_cpu(qs):
        return module.weight.data, qs
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    view = copy.copy(qs)
    view.original_nested = False  # keep the bf16 constants: no second rounding
    codes, view = _convert_weight_packed_for_cpu_inverse(module.weight.data, view)
    # bf16 (in/blocksize, out) -> fp32, one constant per block in row-major order
    view.absmax = qs.absmax.T.reshape(-1).float()
    return codes, view


def dequantize_linear4bit(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight (out_features, in_features) of a `Linear4bit`, in `dtype` (default: the quantized dtype)."""
    codes, qs = _standard_layout(module)
    if qs is None:  # not quantized yet (bitsandbytes quantizes when the layer moves to a device)
        w = codes
    else:
        from bitsandbytes.functional import dequantize_4bit

        w = dequantize_4bit(codes, qs).reshape(module.out_features, module.in_features)
    return w if dtype is None else w.to(dtype)


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the weight had before quantization (the layer's compute dtype if it has one)."""
    qs = _raw_state(module)
    if qs is None:
        return getattr(module, "compute_dtype", None) or module.weight.dtype
    original = getattr(qs, "original_dtype", qs.dtype) if _packed_for_cpu(qs) else qs.dtype
    return getattr(module, "compute_dtype", None) or original


def storage_bytes(module: nn.Module) -> int:
    """Bytes that encode the weight: packed codes, absmax (8-bit with nested statistics), nested scales and
    offset, as the layer holds them now (bf16 constants once bitsandbytes repacked it for its CPU kernel).
    bitsandbytes' lookup tables (per layer, ~1 KB) are not counted, as ours are not."""
    qs = _raw_state(module)
    tensors = [module.weight.data]
    if qs is not None:
        tensors.append(qs.absmax)
        if getattr(qs, "nested", False):
            tensors += [qs.state2.absmax, torch.as_tensor(qs.offset)]
    return sum(t.numel() * t.element_size() for t in tensors)


def settings(module: nn.Module) -> dict[str, Any]:
    """How a `Linear4bit` was quantized, in `lorakit.quantize`'s terms."""
    qs = _raw_state(module)
    quant_type = getattr(qs, "quant_type", None) or getattr(module.weight, "quant_type", "fp4")
    nested = getattr(qs, "original_nested", False) if _packed_for_cpu(qs) else getattr(qs, "nested", False)
    return {
        "method": f"bitsandbytes-{quant_type}",
        "block_size": getattr(qs, "blocksize", 64),
        "double_quant": bool(nested),
    }
