"""What a model remembers about its adapters: `model._lorakit`, a `Registry`.

Each adapter's config and the module names it adapted, so that saving writes the exact target set and unloading
restores the original `requires_grad` flags; the active set; and a cached list of the model's LoRA layers, so that
switching adapters walks no module tree.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import AdapterError
from lorakit.layers import LoraLayer
from lorakit.walk import base_modules


@dataclass
class AdapterInfo:
    """What the model remembers about one adapter."""

    config: LoraConfig
    modules: list[str]
    trainable: bool = True
    saved: list[str] = field(default_factory=list)
    """Modules it saves whole, in its own copies (modules_to_save)."""
    params: dict[str, list[str]] = field(default_factory=dict)
    """Module -> its parameters the adapter adapts (target_parameters), in the module's order."""
    tokens: dict[str, list[int]] = field(default_factory=dict)
    """Module -> the rows it trains alone (trainable_token_indices), for the modules that own the rows."""


@dataclass
class Registry:
    adapters: dict[str, AdapterInfo] = field(default_factory=dict)
    requires_grad: dict[str, bool] = field(default_factory=dict)  # base parameters' flags before injection
    active: dict[str, float] = field(default_factory=dict)  # adapter name -> weight
    layers: list | None = None  # cached (name, LoraLayer) list; None after the set of wrappers changed
    replication: object | None = None  # lorakit.replicate.Replication: the layers layer_replication replaced


def registry(model: nn.Module, *, create: bool = False) -> Registry:
    reg = model.__dict__.get("_lorakit")
    if reg is None:
        if not create:
            raise AdapterError(
                f"{type(model).__name__} has no LoRA adapters (use lorakit.inject or load_adapter first)"
            )
        reg = Registry(requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
        model.__dict__["_lorakit"] = reg
    return reg


def uses_wrappers(model: nn.Module) -> bool:
    """Whether an adapter on `model` saves modules whole, trains token rows or adapts parameters: only then do
    switching and mixing look for those wrappers (plain LoRA switching walks no module tree)."""
    reg = model.__dict__.get("_lorakit")
    return reg is not None and any(i.saved or i.tokens or i.params for i in reg.adapters.values())


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters on `model`, in the order they were added."""
    reg = model.__dict__.get("_lorakit")
    return list(reg.adapters) if reg else []


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """(name, layer) for every LoRA layer in `model` (cached in the registry: switching adapters walks no tree)."""
    reg = model.__dict__.get("_lorakit")
    if reg is not None and reg.layers is not None:
        yield from reg.layers
        return
    found = [(name, m) for name, m in base_modules(model) if isinstance(m, LoraLayer)]
    if reg is not None:
        reg.layers = found
    yield from found


def adapter_layers(model: nn.Module, name: str) -> list[tuple[str, LoraLayer]]:
    """(module name, layer) of the LoRA layers that hold adapter `name`."""
    return [(m, layer) for m, layer in lora_layers(model) if name in layer.adapters]
