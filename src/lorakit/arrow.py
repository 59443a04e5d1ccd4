"""Arrow routing (PEFT's `arrow_config`): a library of LoRA adapters as experts, picked per token and per layer.

    with lorakit.arrow(model, ["math", "code", "law"], top_k=2):
        logits = model(input_ids).logits

No training: in each LoRA layer, every adapter's prototype is the top right singular vector of its ΔW = B·A (the
input direction it changes most). Each token's input x scores every adapter by |x·prototype|; the `top_k` best
are mixed with softmax(score / temperature) weights, and the layer adds Σ weight_e · s_e·B_e·A_e·x to the base
output (Ostapenko et al., "Towards Modular LLMs by Building and Reusing a Library of LoRAs", 2024).

`general`: GenKnowSub (Bhardwaj et al., 2025): the mean A and the mean B of these "general knowledge" adapters are
subtracted from each routed adapter's A and B first (as PEFT does), so that what every adapter knows is not
counted k times. lorakit does it inside the block and restores the adapters at its end, bit for bit.

Unlike PEFT's power iteration from a random start (15 steps), the prototypes here are exact (an SVD of r×r
factors, in float64), so they do not depend on a seed. They are computed once per layer and kept while the
adapters' tensors are unchanged. Only plain LoRA adapters on linear layers route (as in PEFT); every routed
adapter must adapt the same modules. Inside the block the model is the base plus the routed adapters: the active
set does not apply. No gradient flows through the routing weights.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.checks import is_int, is_number
from lorakit.errors import AdapterError, ConfigError
from lorakit.handlers import Handler
from lorakit.layers import LoraLayer, Variant
from lorakit.registry import adapter_names, lora_layers


@dataclass(eq=False)
class ArrowPlan:
    """The routing every LoRA layer of the model follows inside `arrow` (set as the layers' `row_plan`)."""

    names: tuple[str, ...]
    top_k: int
    temperature: float
    prototypes: dict[int, tuple[tuple, torch.Tensor]] = field(default_factory=dict)  # id(layer) -> (stamp, P)

    def forward(self, layer: LoraLayer, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.names[0] not in layer.adapters:  # a layer no routed adapter adapts: the base alone
            return out
        adapters = [layer.adapters[n] for n in self.names]
        dtype = adapters[0].lora_A.dtype
        tokens = x.reshape(-1, x.shape[-1]).to(dtype)
        with torch.no_grad():
            protos = self._prototypes(layer).to(device=tokens.device, dtype=dtype)
            score = (tokens @ protos.T).abs()  # (tokens, experts); sign-free: a singular vector's sign is arbitrary
            top, idx = score.topk(min(self.top_k, len(self.names)), dim=1)
            weights = torch.zeros_like(score).scatter_(1, idx, torch.softmax(top / self.temperature, dim=1))
        delta = None
        for e, adapter in enumerate(adapters):
            y = (tokens @ adapter.lora_A.T) @ adapter.lora_B.T * (weights[:, e : e + 1] * adapter.scaling)
            delta = y if delta is None else delta + y
        return out + delta.reshape(*out.shape[:-1], delta.shape[-1]).to(out.dtype)

    def _prototypes(self, layer: LoraLayer) -> torch.Tensor:
        """(experts, in_features): each adapter's top right singular vector of B·A, kept while unchanged."""
        adapters = [layer.adapters[n] for n in self.names]
        stamp = tuple((a.lora_A._version, a.lora_B._version, id(a.lora_A), id(a.lora_B)) for a in adapters)
        kept = self.prototypes.get(id(layer))
        if kept is not None and kept[0] == stamp:
            return kept[1]
        protos = torch.stack([top_right_singular_vector(a.lora_A, a.lora_B) for a in adapters])
        self.prototypes[id(layer)] = (stamp, protos)
        return protos


def top_right_singular_vector(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The top right singular vector of B·A (A: r×k, B: d×r), without forming it: Aᵀ = Q·R (QR), so
    B·A = (B·Rᵀ)·Qᵀ and its right singular vectors are Q times those of the small B·Rᵀ. In float64; unit norm,
    sign as the SVD gives it."""
    q, r = torch.linalg.qr(A.detach().to(torch.float64).T)  # (k, r), (r, r)
    _, _, vh = torch.linalg.svd(B.detach().to(torch.float64) @ r.T, full_matrices=False)
    return (q @ vh[0]).to(torch.float32)


@contextmanager
def arrow(
    model: nn.Module,
    adapters: Sequence[str] | None = None,
    *,
    top_k: int = 3,
    temperature: float = 1.0,
    general: Sequence[str] = (),
) -> Iterator[ArrowPlan]:
    """Inside the block, every LoRA layer routes each token to its `top_k` best adapters of `adapters` (default:
    all but `general`), mixed by softmax(|x·prototype| / temperature). `general`: adapters whose mean A and B are
    subtracted from the routed ones inside the block (GenKnowSub). Checks run before anything changes."""
    known = adapter_names(model)
    general = list(general)
    names = list(adapters) if adapters is not None else [n for n in known if n not in general]
    _check(model, names, general, known, top_k, temperature)
    layers = [layer for _, layer in lora_layers(model)]
    plan = ArrowPlan(tuple(names), int(top_k), float(temperature))
    kept = _subtract_general(layers, names, general) if general else []
    for layer in layers:
        layer.row_plan = plan
    try:
        yield plan
    finally:
        for layer in layers:
            layer.row_plan = None
        with torch.no_grad():
            for tensor, original in kept:
                tensor.copy_(original)


def _check(model, names, general, known, top_k, temperature) -> None:
    if not names:
        raise AdapterError("arrow: no adapters to route between")
    for n in [*names, *general]:
        if n not in known:
            raise AdapterError(f"arrow: no adapter {n!r} on {type(model).__name__}; adapters: {known}")
    if len(set(names)) != len(names) or set(names) & set(general):
        raise AdapterError(f"arrow: each adapter routes once and is not also general: {names}, general {general}")
    if not is_int(top_k, 1):
        raise ConfigError(f"arrow: top_k must be a positive integer, got {top_k!r}")
    if not (is_number(temperature) and temperature > 0):
        raise ConfigError(f"arrow: temperature must be a number > 0, got {temperature!r}")
    reg = model.__dict__["_lorakit"]
    for n in [*names, *general]:
        info = reg.adapters[n]
        if info.saved or info.tokens or info.params:
            raise AdapterError(
                f"arrow: adapter {n!r} also saves modules whole, trains token rows or adapts parameters, which Arrow "
                "does not route (it routes LoRA layers, as PEFT's)"
            )
    wanted = set(names) | set(general)
    for where, layer in lora_layers(model):
        present = wanted & set(layer.adapters)
        if not present:
            continue
        missing = sorted(wanted - present)
        if missing:
            raise AdapterError(
                f"arrow: adapter {missing[0]!r} does not adapt {where!r}, which {sorted(present)[0]!r} does; Arrow "
                "routes between adapters of the same modules"
            )
        if layer.merged:
            raise AdapterError("arrow: adapters are merged into the base weights; unmerge(model) first")
        if layer.row_plan is not None:
            raise AdapterError("arrow: the model already routes its rows (row_adapters or arrow); leave that first")
        if type(layer.handler).lora is not Handler.lora:
            raise AdapterError(f"arrow: {where!r} is no linear layer (Arrow routes linear layers, as in PEFT)")
        for n in present:
            if type(layer.adapters[n].variant) is not Variant:
                raise AdapterError(
                    f"arrow: adapter {n!r} is {layer.adapters[n].variant.label}, not plain LoRA, on {where!r}"
                )
        if general and len({layer.adapters[n].lora_A.shape for n in present}) != 1:
            raise AdapterError(f"arrow: general adapters need the ranks of the routed ones, which differ on {where!r}")


def _subtract_general(layers, names, general) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Subtract the general adapters' mean A and mean B from each routed adapter's; returns (tensor, its original
    values) to copy back at the end (bit for bit)."""
    kept = []
    with torch.no_grad():
        for layer in layers:
            if names[0] not in layer.adapters:
                continue
            mean_a = torch.stack([layer.adapters[n].lora_A for n in general]).mean(0)
            mean_b = torch.stack([layer.adapters[n].lora_B for n in general]).mean(0)
            for n in names:
                for tensor, mean in ((layer.adapters[n].lora_A, mean_a), (layer.adapters[n].lora_B, mean_b)):
                    kept.append((tensor, tensor.clone()))
                    tensor.sub_(mean)
    return kept
