"""The 4-bit base layers as LoRA bases: lorakit's `NF4Linear` and bitsandbytes' `Linear4bit`, registered in the
handler table (lorakit.handlers) when lorakit.quant is imported. Their `weight` is a dequantized copy (read-only
use: DoRA norms, export), and merging into them is refused, since it would have to re-quantize W0 + ΔW.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.handlers import LinearHandler, RefusedHandler, register_handler
from lorakit.quant import bnb as bnb_interop
from lorakit.quant.nf4 import NF4Linear, scratch_weight


class QuantLinearHandler(LinearHandler):
    """lorakit's 4-bit `NF4Linear`."""

    quantized = True

    def dims(self, base: nn.Module) -> tuple[int, int]:
        return base.out_features, base.in_features

    def weight(self, base: nn.Module) -> torch.Tensor:
        return base.dequantize()

    def dtype_device(self, base: nn.Module) -> tuple[torch.dtype, torch.device]:
        return base.weight_dtype, base.qweight.device

    def base_nobias(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, base.dequantize(x.dtype))

    def dense_weight(self, base: nn.Module) -> Callable[[torch.dtype], torch.Tensor] | None:
        """The weight dequantized by the native kernels into a per-thread buffer, as the layer's own training
        forward does (`scratch_weight`): the fused LoRA layer uses it at once, forward and again backward."""
        return functools.partial(scratch_weight, base)

    def merge_refusal(self, base: nn.Module) -> str | None:
        return (
            f"cannot merge into a 4-bit base layer ({type(base).__name__}): the merged weight W0 + ΔW would have "
            "to be re-quantized, which rounds away most of the update. Write a merged full-precision model "
            "instead with `lorakit merge --adapter ADAPTER --out DIR` (it dequantizes the base, then merges), or "
            "call lorakit.dequantize(model) first"
        )


class Bnb4bitHandler(QuantLinearHandler):
    """bitsandbytes' `Linear4bit` (transformers' `BitsAndBytesConfig(load_in_4bit=True)`), NF4 or FP4. Its
    forward stays bitsandbytes' own (its compute dtype, its kernels): no fused layer."""

    def dense_weight(self, base: nn.Module) -> None:
        return None

    def weight(self, base: nn.Module) -> torch.Tensor:
        return bnb_interop.dequantize_linear4bit(base, bnb_interop.weight_dtype(base))

    def dtype_device(self, base: nn.Module) -> tuple[torch.dtype, torch.device]:
        return bnb_interop.weight_dtype(base), base.weight.device

    def base_nobias(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, bnb_interop.dequantize_linear4bit(base, x.dtype))


register_handler(NF4Linear, QuantLinearHandler())
# bitsandbytes is never imported by lorakit: these take effect once a model's loading has imported it
register_handler("bitsandbytes.nn.Linear4bit", Bnb4bitHandler())
register_handler(
    "bitsandbytes.nn.Linear8bitLt",
    RefusedHandler("bitsandbytes 8-bit layers are not supported (4-bit Linear4bit layers are)"),
)
