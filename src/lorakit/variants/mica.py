"""MiCA, Minor Component Adaptation (arXiv 2604.01694): B is fixed to the left singular vectors of W0's r smallest
singular values, A starts at zero and is the only factor trained.

Matches PEFT's `init_lora_weights="mica"`: with W0 = U·S·Vh, B = U[:, -r:] and A = 0, so the model's output is
unchanged at initialisation and W0 is left alone. During training B stays frozen (registered with
`frozen=("lora_B",)`: `inject`'s trainable adapters leave it out, so an optimizer never sees it and a training
checkpoint does not store it). The update s·B·A then lives in the span of W0's minor directions, where the
pretrained weight carries least. Forward, merge, combine and export are plain LoRA's.

Unlike PEFT, the base may be 4-bit (NF4): the SVD is of its dequantized weight. Linear layers only, not with DoRA
(as in PEFT). A saved MiCA adapter loads with B from its file (`config.INITS_IN_WEIGHTS`), frozen again when it is
loaded to train.
"""

from __future__ import annotations

import torch

from lorakit.errors import AdapterError
from lorakit.layers import LoraAdapter, LoraLayer, register_init


def mica_factors(w: torch.Tensor, r: int) -> torch.Tensor:
    """B of MiCA for W0 = `w` (2-D, f32): the left singular vectors of its r smallest singular values."""
    u, _, _ = torch.linalg.svd(w, full_matrices=False)
    return u[:, -r:]


@torch.no_grad()
def mica_init(layer: LoraLayer, adapter: LoraAdapter) -> None:
    h = layer.handler
    if not h.linear:
        raise AdapterError(f"MiCA init supports linear layers only, not {type(layer.base_layer).__name__}")
    w = h.to_2d(h.weight(layer.base_layer)).float()  # a 4-bit base: its dequantized copy
    if adapter.r > min(w.shape):
        raise AdapterError(f"MiCA init needs r <= {min(w.shape)} (the weight's smaller side), got r={adapter.r}")
    adapter.lora_B.data.copy_(mica_factors(w, adapter.r))
    adapter.lora_A.data.zero_()


register_init("mica", mica_init, frozen=("lora_B",))
