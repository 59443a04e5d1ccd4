"""Orthogonal initialisation: A and B both random and non-zero, yet B·A = 0, so that the model's output is
unchanged at initialisation while both factors get gradients from the first step.

Matches PEFT's `init_lora_weights="orthogonal"` (after datta0.github.io/posts/rethink-lora-init): Q, an orthogonal
r×r matrix (the QR decomposition of a Gaussian one), gives A its odd rows and B its even rows, each mixed with a
Gaussian matrix and divided by 10: A = (G_A·Q[0::2])ᵀ/10, B = G_Bᵀ·Q[1::2]/10, and Q[1::2]·Q[0::2]ᵀ = 0. The rank
must be even. Registered as the init "orthogonal" (`LoraConfig(init="orthogonal")`); it draws from torch's global
generator, as the other random inits do.
"""

from __future__ import annotations

import torch

from lorakit.errors import AdapterError
from lorakit.layers import LoraAdapter, LoraLayer, register_init


@torch.no_grad()
def orthogonal_init(layer: LoraLayer, adapter: LoraAdapter) -> None:
    if not layer.handler.linear:
        raise AdapterError(
            f"orthogonal init supports linear layers only, not {type(layer.base_layer).__name__}"
        )
    r = adapter.r
    if r % 2:
        raise AdapterError(f"orthogonal init needs an even rank (half of it for A, half for B), got r={r}")
    q, _ = torch.linalg.qr(torch.randn(r, r))
    out_features, in_features = adapter.lora_B.shape[0], adapter.lora_A.shape[1]
    a = torch.randn(in_features, r // 2).mm(q[0::2]).T / 10.0
    b = torch.randn(r // 2, out_features).T.mm(q[1::2]) / 10.0
    adapter.lora_A.data.copy_(a)
    adapter.lora_B.data.copy_(b)


register_init("orthogonal", orthogonal_init)
