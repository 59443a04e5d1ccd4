"""LoRA+ (Hayou et al. 2024): the learning rate of B is λ times that of A (λ = 16 by default).

In a wide layer, A (r × k, fan-in k large) and B (d × r, fan-in r small) call for learning rates of different
orders; one learning rate for both either makes B learn slowly or A unstable. LoRA+ is only optimizer parameter
groups, so it composes with every method (`--method loraplus`, `--method dylora+loraplus`).

The groups follow the paper's code and PEFT's `create_loraplus_optimizer`, with parameters found through the LoRA
layers rather than by name:

    lora_A, and other adapter matrices (2-D and up)       lr
    lora_B, and vector-shaped parameters (DoRA magnitude,  lr · ratio
      trainable biases: like B, their fan-in is O(1))
    every parameter of an adapter on an Embedding layer   lr_embedding
    other trainable parameters: 1-D                        lr · ratio     (PEFT's rule: `param.ndim == 1`)
                                2-D and up                 lr

Weight decay is left to the optimizer's default for every group (PEFT sets its own `loraplus_weight_decay`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.errors import AdapterError, ConfigError
from lorakit.registry import lora_layers


def loraplus_groups(
    model: nn.Module, *, lr: float, ratio: float = 16.0, lr_embedding: float = 1e-6
) -> list[dict[str, Any]]:
    """AdamW parameter groups for LoRA+: "lora_A" at lr, "lora_B" at ratio·lr, "embedding" at lr_embedding.

    Only trainable parameters are included; empty groups are left out. Each group carries a "name" key.
    """
    groups: dict[str, list[nn.Parameter]] = {"lora_A": [], "lora_B": [], "embedding": []}
    seen: set[int] = set()
    for _, layer in lora_layers(model):
        for adapter in layer.adapters.values():
            for p in adapter.parameters():
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                if layer.handler.embedding:
                    groups["embedding"].append(p)
                elif p is adapter.lora_B or p.ndim == 1:
                    groups["lora_B"].append(p)
                else:
                    groups["lora_A"].append(p)
    for p in model.parameters():  # biases (bias="all"/"lora_only"), other methods' parameters
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            groups["lora_B" if p.ndim == 1 else "lora_A"].append(p)
    rates = {"lora_A": lr, "lora_B": lr * ratio, "embedding": lr_embedding}
    return [{"params": ps, "lr": rates[name], "name": name} for name, ps in groups.items() if ps]


def loraplus_optimizer(
    model: nn.Module,
    *,
    lr: float,
    ratio: float = 16.0,
    lr_embedding: float = 1e-6,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """An optimizer (AdamW unless `optimizer_cls`) over `loraplus_groups(model, ...)`; `kwargs` go to it.

    >>> opt = lorakit.loraplus_optimizer(model, lr=2e-4, ratio=16)    # B learns at 3.2e-3
    """
    if not ratio > 0:
        raise ConfigError(f"LoRA+ ratio must be > 0, got {ratio!r}")
    groups = loraplus_groups(model, lr=lr, ratio=ratio, lr_embedding=lr_embedding)
    if not groups:
        raise AdapterError(f"{type(model).__name__} has no trainable parameters (inject an adapter first)")
    return optimizer_cls(groups, lr=lr, **kwargs)
