"""PEFT's `lora_bias`: a trainable bias b on B, so the update is s·(B·A·x + b).

Picked by `LoraConfig(lora_bias=True)`. The file key is PEFT's `lora_B.bias` (shape (out_features,)); b starts at
zero, as in PEFT, so a new adapter leaves the model's output unchanged. Each adapter holds its own b: switching
adapters, or mixing them in one batch, never touches the base layer's bias (PEFT's older `bias="lora_only"`
overwrites it). Merging adds s·b to the base's bias, which must exist (as in PEFT). The main use is an adapter
extracted from a full fine-tune whose biases changed (`lorakit extract`).

It is its own variant, so the plain path (the fused kernels) stays free of a bias branch; it runs the generic path,
which is exact. Mixed-adapter batches stack it with plain adapters (`stacks`: the biases go into a (G, d) stack
beside B's). llama.cpp's LoRA pairs have no bias, so GGUF export refuses it.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.handlers import Handler
from lorakit.layers import LoraAdapter, LoraLayer, Variant, register_variant


@register_variant
class LoraBiasVariant(Variant):
    name = "lora_bias"
    label = "lora_bias"
    plain = False
    not_plain_because = "its bias on B (lora_bias) has no place in llama.cpp's LoRA pairs"
    stacks = True  # s·B·A·x + s·b: mixed batches stack it, with the biases beside the B stacks

    @classmethod
    def selects(cls, config: LoraConfig) -> bool:
        return config.lora_bias

    @classmethod
    def refusal(cls, handler: Handler) -> str | None:
        if handler.embedding:
            return "lora_bias does not work with Embedding layers (as in PEFT)"
        return None

    def tensor_names(self, handler: Handler) -> dict[str, str]:
        return {**super().tensor_names(handler), "lora_bias": "lora_B.bias"}

    def tensor_shapes(self, handler: Handler, base: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
        return {**super().tensor_shapes(handler, base, r), "lora_bias": (handler.dims(base)[0],)}

    def init(self, layer: LoraLayer, adapter: LoraAdapter) -> None:
        d = layer.handler.dims(layer.base_layer)[0]
        A = adapter.lora_A
        adapter.lora_bias = nn.Parameter(torch.zeros(d, dtype=A.dtype, device=A.device))

    def _along_features(self, layer: LoraLayer, b: torch.Tensor, ndim: int) -> torch.Tensor:
        """b shaped to broadcast along the output's feature dimension (last for linears, 1 for convolutions)."""
        dim = layer.handler.feature_dim % ndim
        return b.reshape((-1,) + (1,) * (ndim - 1 - dim))

    def forward(
        self, layer: LoraLayer, adapter: LoraAdapter, x: torch.Tensor, base_out: torch.Tensor
    ) -> torch.Tensor:
        y = super().forward(layer, adapter, x, base_out)
        b = self._along_features(layer, adapter.lora_bias * adapter.scaling, y.dim())
        return y + b.to(y.dtype)

    def bias_delta(self, layer: LoraLayer, adapter: LoraAdapter) -> torch.Tensor:
        return adapter.lora_bias * adapter.scaling
