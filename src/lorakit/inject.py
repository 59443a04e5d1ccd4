"""Put LoRA wrappers into a model, freeze the base, remove adapters, unload.

The model keeps a small registry (`model._lorakit`) with each adapter's config and the module names it adapted,
so that saving writes the exact target set and unloading restores the original `requires_grad` flags.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import AdapterError, TargetError
from lorakit.fused import assign_sibling_groups
from lorakit.layers import LoraLayer, handler_for
from lorakit.targeting import select_modules

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass
class AdapterInfo:
    """What the model remembers about one adapter."""

    config: LoraConfig
    modules: list[str]
    trainable: bool = True


@dataclass
class Registry:
    adapters: dict[str, AdapterInfo] = field(default_factory=dict)
    requires_grad: dict[str, bool] = field(default_factory=dict)  # base parameters' flags before injection
    active: dict[str, float] = field(default_factory=dict)  # adapter name -> weight
    layers: list | None = None  # cached (name, LoraLayer) list; None after the set of wrappers changed


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
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    if reg is not None:
        reg.layers = found
    yield from found


def inject(
    model: nn.Module,
    config: LoraConfig,
    name: str = "default",
    *,
    activate: bool = True,
    trainable: bool = True,
) -> nn.Module:
    """Add adapter `name` to every module `config` selects; freeze everything else. Returns `model` (changed in place).

    All checks run before the model is touched: a bad name, no match, or an unsupported layer leaves it as it was.
    """
    check_new_name(model, name)
    names = select_modules(model, config)
    for n in names:
        module = model.get_submodule(n)
        reason = handler_for(module).check(module.base_layer if isinstance(module, LoraLayer) else module)
        if reason:
            raise TargetError(f"cannot add LoRA to {n!r} ({type(module).__name__}): {reason}")
    reg = registry(model, create=True)
    reg.layers = None
    try:
        for n in names:
            layer = _wrap(model, n)
            layer.add_adapter(
                name,
                r=config.rank_for(n),
                alpha=config.alpha_for(n),
                scaling=config.scaling_for(n),
                dropout=config.dropout,
                init=config.init,
                use_dora=config.use_dora,
            )
    except Exception:
        _remove_from_layers(model, name)
        reg.layers = None
        raise
    reg.layers = None
    assign_sibling_groups(list(lora_layers(model)))
    reg.adapters[name] = AdapterInfo(config=config, modules=names, trainable=trainable)
    set_trainable(model)
    if activate:
        from lorakit.control import set_active

        set_active(model, name)
    log.info("injected adapter %r into %d modules", name, len(names))
    return model


def check_new_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise AdapterError(f"adapter name {name!r} must be letters, digits, '_' or '-'")
    if name in adapter_names(model):
        raise AdapterError(
            f"adapter {name!r} already exists on {type(model).__name__}; delete it or pick another name"
        )


def set_trainable(model: nn.Module) -> None:
    """Freeze the base; make trainable the adapters marked trainable and the biases their `bias` setting names."""
    reg = registry(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        for aname, adapter in layer.adapters.items():
            info = reg.adapters.get(aname)
            adapter.requires_grad_(bool(info and info.trainable))
    for info in reg.adapters.values():
        if not info.trainable:
            continue
        if info.config.bias == "all":
            for pname, p in model.named_parameters():
                if pname == "bias" or pname.endswith(".bias"):
                    p.requires_grad_(True)
        elif info.config.bias == "lora_only":
            for n in info.modules:
                bias = getattr(model.get_submodule(n).base_layer, "bias", None)
                if bias is not None:
                    bias.requires_grad_(True)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` everywhere (unmerging first if needed). Wrappers left with no adapter are unwrapped."""
    reg = registry(model)
    if name not in reg.adapters:
        raise AdapterError(f"no adapter {name!r} on {type(model).__name__}; adapters: {list(reg.adapters)}")
    from lorakit.control import unmerge

    unmerge(model)
    _remove_from_layers(model, name)
    reg.layers = None
    assign_sibling_groups(list(lora_layers(model)))
    del reg.adapters[name]
    reg.active.pop(name, None)
    if not reg.adapters:
        _restore_requires_grad(model, reg)
        del model.__dict__["_lorakit"]
    else:
        set_trainable(model)


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove all LoRA wrappers. With `merge`, the active adapters are folded into the base weights first.

    Returns the plain model (the same object), with the base parameters' original `requires_grad` flags.
    """
    reg = registry(model)
    if merge:
        from lorakit.control import merge as merge_active

        merge_active(model)
    else:
        from lorakit.control import unmerge

        unmerge(model)
    for name, layer in list(lora_layers(model)):
        merged = {m[0] for m in layer.merged}
        for aname in list(layer.adapters):
            if aname not in merged:  # gives back what PiSSA moved from W0 into B·A
                layer.remove_adapter(aname)
        _set_submodule(model, name, layer.base_layer)
    _restore_requires_grad(model, reg)
    del model.__dict__["_lorakit"]
    return model


def _wrap(model: nn.Module, name: str) -> LoraLayer:
    module = model.get_submodule(name)
    if isinstance(module, LoraLayer):
        return module
    layer = LoraLayer(module, handler_for(module))
    _set_submodule(model, name, layer)
    return layer


def _remove_from_layers(model: nn.Module, name: str) -> None:
    for lname, layer in list(lora_layers(model)):
        if name in layer.adapters:
            layer.remove_adapter(name)
        if not layer.adapters:
            _set_submodule(model, lname, layer.base_layer)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _restore_requires_grad(model: nn.Module, reg: Registry) -> None:
    for pname, p in model.named_parameters():
        key = pname.replace(".base_layer.", ".")
        p.requires_grad_(reg.requires_grad.get(pname, reg.requires_grad.get(key, p.requires_grad)))
