"""Layer replication (PEFT's `layer_replication`): a deeper model from the base's own decoder layers, the copies
sharing their weights, each copy with its own adapter.

`LoraConfig(layer_replication=[[0, 20], [10, 30]])` turns layers 0..29 into 0..19 followed by 10..29: 40 layers,
where layers 10..19 appear twice. A copy shares every parameter with its original (no memory for weights), so only
the adapters tell the two apart; a file's keys name the new indices, as PEFT's do (PEFT's LLaMA-Pro-style
expansion; the idea of stacking layers without new weights is from "SOLAR" and "Llama Pro"). `inject` replicates
before it adapts; the adapter's file carries the map, so a load (lorakit's or PEFT's) replicates the same way.

What lorakit adds to PEFT's: the map is checked before the model is touched; the model's config follows
(`num_hidden_layers`, and `layer_types` for models that mix attention kinds); every adapter on a replicated model
must say the same map (a plain adapter there would name layers a fresh base does not have); and deleting the last
adapter gives the original layers back. Merging is refused (the copies share W0, so no single W0 could hold two
different updates), as in PEFT.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from lorakit.control import register_folder_check, register_merge_guard
from lorakit.errors import AdapterError, ConfigError
from lorakit.registry import Registry


@dataclass
class Replication:
    """What `replicate_layers` changed, to give it back."""

    layer_map: list[list[int]]
    parent: nn.Module
    attr: str
    original: nn.ModuleList
    num_layers: int
    layer_types: list | None


def layer_stack(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(the module holding the decoder layers, its attribute, the layers): `.layers` of the innermost `.model`
    (Llama, Mistral, Qwen, ...), `.encoder.layer` (BERT) or `.h` (GPT-2, Falcon), as PEFT looks for them."""
    inner = model
    while hasattr(inner, "model") and isinstance(inner.model, nn.Module):
        inner = inner.model
    inner = getattr(inner, "bert", inner)
    for parent, attr in ((inner, "layers"), (getattr(inner, "encoder", None), "layer"), (inner, "h"), (getattr(inner, "transformer", None), "h")):
        layers = getattr(parent, attr, None) if parent is not None else None
        if isinstance(layers, nn.ModuleList):
            return parent, attr, layers
    raise AdapterError(
        f"layer_replication: found no list of decoder layers in {type(model).__name__} (looked for .layers, "
        ".encoder.layer and .h, as PEFT does)"
    )


def check_layer_map(layer_map: list[list[int]], count: int) -> None:
    """A one-line ConfigError for a range of `layer_map` (its shape is LoraConfig's to check) outside the model's
    `count` layers."""
    for start, end in layer_map:
        if end > count:
            raise ConfigError(
                f"layer_replication: [{start}, {end}] is not a range [start, end) of the model's {count} layers",
                key="layer_replication",
            )


def replicate_layers(model: nn.Module, layer_map: list[list[int]] | None, reg: Registry) -> bool:
    """Make `model`'s layers those of `layer_map` (None: none replicated), sharing weights, unless they already
    are; returns whether it replicated them now. An adapter on a replicated model must name the same map. Checks
    run before anything changes."""
    done: Replication | None = reg.replication
    if done is not None:
        if layer_map is None or [list(p) for p in layer_map] != done.layer_map:
            raise AdapterError(
                f"the model's layers are replicated (layer_replication={done.layer_map}): an adapter on it must have "
                f"the same layer_replication, not {layer_map}"
            )
        return False
    if layer_map is None:
        return False
    parent, attr, layers = layer_stack(model)
    check_layer_map(layer_map, len(layers))
    pairs = [list(p) for p in layer_map]
    if reg.adapters:
        raise AdapterError(
            f"layer_replication changes the model's layers, which adapters {list(reg.adapters)} already adapt: "
            "add it first, on the plain model"
        )
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None)
    types = getattr(config, "layer_types", None)
    keep_types = list(types) if isinstance(types, list) and len(types) == len(layers) else None
    copies = []
    for start, end in pairs:
        for i in range(start, end):
            clone = _shared_clone(layers[i])
            for sub in clone.modules():  # the cache slot of each layer (as PEFT's hack: HF's layer_idx)
                if hasattr(sub, "layer_idx"):
                    sub.layer_idx = len(copies)
            copies.append(clone)
    reg.replication = Replication(pairs, parent, attr, layers, count, keep_types)
    setattr(parent, attr, nn.ModuleList(copies))
    if count is not None:
        config.num_hidden_layers = len(copies)
    if keep_types is not None:
        config.layer_types = [keep_types[i] for start, end in pairs for i in range(start, end)]
    return True


@contextmanager
def replicated(model: nn.Module, layer_map: list[list[int]] | None) -> Iterator[None]:
    """The model with its layers as `layer_map` makes them, for the duration (a load's plan checks a file's keys
    against it); as it was afterwards. The same refusals as `replicate_layers`."""
    reg = model.__dict__.get("_lorakit")
    scratch = reg if reg is not None else Registry()
    now = replicate_layers(model, layer_map, scratch)
    try:
        yield
    finally:
        if now:
            restore_layers(model, scratch)


def restore_layers(model: nn.Module, reg: Registry) -> None:
    """Give the model its original layers back (after its last adapter went)."""
    done: Replication | None = reg.replication
    if done is None:
        return
    setattr(done.parent, done.attr, done.original)
    config = getattr(model, "config", None)
    if done.num_layers is not None:
        config.num_hidden_layers = done.num_layers
    if done.layer_types is not None:
        config.layer_types = done.layer_types
    reg.replication = None


def _shared_clone(module: nn.Module) -> nn.Module:
    """A deep copy of `module` whose parameters are the original's (never copied; buffers are)."""
    return copy.deepcopy(module, memo={id(p): p for p in module.parameters()})


def _merge_guard(model: nn.Module) -> str | None:
    reg = model.__dict__.get("_lorakit")
    done = getattr(reg, "replication", None)
    if done is None:
        return None
    return (
        f"cannot merge: the model's layers are replicated (layer_replication={done.layer_map}) and the copies "
        "share their base weights, so no single weight can hold two copies' updates (as in PEFT)"
    )


def _folder_check(config: dict, use: str) -> str | None:
    """A replicated adapter, from its folder: no bank, merge or llama.cpp file."""
    done = config.get("layer_replication")
    if not done:
        return None
    return {
        "bank": f"layer_replication={done} changes the base model's layers, which every adapter in a bank (and "
        "lorakit serve) shares; load it alone (lorakit.load_adapter, lorakit generate)",
        "merge": f"layer_replication={done}: cannot merge, the copied layers share the base's weights, so no single "
        "weight can hold two copies' updates (as in PEFT)",
        "gguf": f"layer_replication={done} has no llama.cpp form: its copied layers share the base's weights (and "
        "cannot be merged), and llama.cpp's model has the base's blocks only",
    }[use]


register_merge_guard(_merge_guard)
register_folder_check(_folder_check)
