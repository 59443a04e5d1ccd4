"""DoRA (Liu et al. 2024): W' = m · (W0 + sBA) / ‖W0 + sBA‖_row, m initialised to the row norms of W0 + sBA.

The norm is detached in backward (paper §4.3), as in PEFT. The magnitude is stored in PEFT's shape:
(out,) for Linear/Conv1D/Embedding, (1, out, 1, …) for convolutions.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.handlers import Handler
from lorakit.layers import LoraAdapter, LoraLayer, Variant, delta_weight, register_variant


def _norm(layer: LoraLayer, adapter: LoraAdapter, base_weight: torch.Tensor) -> torch.Tensor:
    """‖W0 + sBA‖ per output feature, detached, in the magnitude's shape."""
    h = layer.handler
    w2 = h.to_2d(base_weight) + h.to_2d(delta_weight(layer, adapter).detach())
    d = w2.shape[0]
    return torch.linalg.norm(w2, dim=1).detach().reshape(h.magnitude_shape(d))


def start_magnitude(layer: LoraLayer, adapter: LoraAdapter) -> torch.Tensor:
    """The magnitude DoRA starts from: ‖W0 + sBA‖ per output feature with the adapter's current A and B (with B
    zero, the layer computes W0 exactly)."""
    w = layer.handler.weight(layer.base_layer).to(adapter.lora_A.dtype)
    return _norm(layer, adapter, w)


@register_variant
class DoraVariant(Variant):
    name = "dora"
    label = "DoRA"
    merges_alone = True  # each merge renormalises the whole weight: two DoRA merges do not commute
    plain = False  # the magnitude rescales W0 + ΔW: no (A, B) pair alone expresses it
    not_plain_because = "DoRA's magnitude rescales W0 + ΔW"

    @classmethod
    def selects(cls, config: LoraConfig) -> bool:
        return config.use_dora

    def tensor_names(self, handler: Handler) -> dict[str, str]:
        return {**super().tensor_names(handler), "magnitude": "lora_magnitude_vector"}

    def tensor_shapes(self, handler: Handler, base: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
        magnitude = handler.magnitude_shape(handler.dims(base)[0])
        return {**super().tensor_shapes(handler, base, r), "magnitude": magnitude}

    def init(self, layer: LoraLayer, adapter: LoraAdapter) -> None:
        with torch.no_grad():
            adapter.magnitude = nn.Parameter(start_magnitude(layer, adapter).clone())

    def forward(
        self, layer: LoraLayer, adapter: LoraAdapter, x: torch.Tensor, base_out: torch.Tensor
    ) -> torch.Tensor:
        h, base = layer.handler, layer.base_layer
        A, B = adapter.lora_A, adapter.lora_B
        if x.is_floating_point() and x.dtype != A.dtype:
            x = x.to(A.dtype)
        factor = adapter.magnitude / _norm(layer, adapter, h.weight(base).to(A.dtype))
        xd = adapter.dropout(x)
        lora = h.lora(base, xd, A, B, adapter.scaling)
        if xd is x:
            bias = getattr(base, "bias", None)
            base_nb = base_out.to(A.dtype)
            if bias is not None:
                base_nb = base_nb - bias.reshape(h.magnitude_shape(bias.shape[0])).to(A.dtype)
        else:  # dropout changed x: the base term must see the same dropped input
            base_nb = h.base_nobias(base, xd)
        y = (factor - 1) * base_nb + factor * lora
        return y if y.dtype == base_out.dtype else y.to(base_out.dtype)

    @torch.no_grad()
    def merge(self, layer: LoraLayer, adapter: LoraAdapter, weight: float, w: torch.Tensor) -> object:
        h = layer.handler
        factor = (adapter.magnitude / _norm(layer, adapter, w.to(adapter.lora_A.dtype))).to(w.dtype)
        f2 = factor.reshape(-1, 1)
        # W' = W + weight·(f·(W + ΔW) − W), row-wise
        w2 = h.to_2d(w)
        d2 = h.to_2d(delta_weight(layer, adapter).to(w.dtype))
        new = w2 * (1 - weight + weight * f2) + weight * f2 * d2
        w.copy_(h.from_2d(new, layer.base_layer))
        return f2

    @torch.no_grad()
    def unmerge(self, layer: LoraLayer, adapter: LoraAdapter, weight: float, state: object) -> None:
        h = layer.handler
        w = h.weight(layer.base_layer)
        f2 = state
        d2 = h.to_2d(delta_weight(layer, adapter).to(w.dtype))
        old = (h.to_2d(w) - weight * f2 * d2) / (1 - weight + weight * f2)
        w.copy_(h.from_2d(old, layer.base_layer))
