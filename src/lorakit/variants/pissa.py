"""PiSSA initialisation (Meng et al. 2024): A, B from the top-r singular triplets of W0; W0 keeps the residual.

Matches PEFT's `init_lora_weights="pissa"`: with W0 = U·S·Vh, A = diag(√(S_r/s))·Vh_r and B = U_r·diag(√(S_r/s)),
and W0 ← W0 − s·B·A, so the model's output is unchanged at initialisation. The removed part is kept on the
adapter (`base_residual`), so deleting the adapter restores the original base weight. Registered as the init
"pissa" (`LoraConfig(init="pissa")`).
"""

from __future__ import annotations

import torch

from lorakit.errors import AdapterError
from lorakit.layers import LoraAdapter, LoraLayer, delta_weight, register_init


@torch.no_grad()
def pissa_init(layer: LoraLayer, adapter: LoraAdapter) -> None:
    h = layer.handler
    if h.quantized:
        raise AdapterError(
            "PiSSA init moves the top-r part out of W0, which a 4-bit base cannot take; initialise PiSSA on "
            "the full-precision model (or use another init)"
        )
    if not h.linear:
        raise AdapterError(f"PiSSA init supports linear layers only, not {type(layer.base_layer).__name__}")
    w = h.weight(layer.base_layer)
    if not w.dtype.is_floating_point:
        raise AdapterError("PiSSA init needs a floating-point base weight (initialise before quantizing)")
    r, s = adapter.r, adapter.scaling
    u, sv, vh = torch.linalg.svd(h.to_2d(w).float(), full_matrices=False)
    root = torch.sqrt(sv[:r] / s)
    adapter.lora_A.data.copy_(torch.diag(root) @ vh[:r])
    adapter.lora_B.data.copy_(u[:, :r] @ torch.diag(root))
    removed = delta_weight(layer, adapter)
    w.sub_(removed.to(w.dtype))
    adapter.base_residual = removed.to(w.dtype).clone()


register_init("pissa", pissa_init)
