"""A walk of a model's module tree whose cost does not grow with the adapters it holds.

`model.named_modules()` visits every adapter of every wrapper: with 32 adapters of r=16 on the 210 linear layers of
SmolLM2-135M it visits 14,257 modules, where the model and its 210 wrappers are 607. Loading, injecting and
deleting walk the tree dozens of times, so each load got slower with every adapter already loaded. `base_modules`
visits the same modules in the same order, but not the per-adapter containers of lorakit's wrappers: a wrapper
class names them in its `per_adapter` attribute (a LoRA layer's `adapters`, a saved module's copies, token rows'
deltas, a parameter wrapper's factors). What lies there belongs to one adapter, and the callers that want it ask
the wrapper for it by adapter name.

`Wrapper` is the base of the wrappers that stand where a model's module was (saved copies, token rows, a
parameter's factors), and `set_submodule` puts a module at a dotted name.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from torch import nn


def base_modules(model: nn.Module, *, remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) as `model.named_modules()` yields them, in its order, without descending into the children
    that a module's class lists in `per_adapter`. `remove_duplicate=False` yields a module shared by two parents
    under both names, as torch's does."""
    memo: set[nn.Module] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, module = stack.pop()
        if remove_duplicate:
            if module in memo:
                continue
            memo.add(module)
        yield name, module
        skip = getattr(type(module), "per_adapter", ())
        children = [
            (f"{name}.{key}" if name else key, child)
            for key, child in module._modules.items()
            if child is not None and key not in skip
        ]
        stack.extend(reversed(children))


def base_parameters(model: nn.Module, *, remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) as `model.named_parameters()` yields them, without the parameters of the per-adapter
    containers `base_modules` leaves out: the model's own weights (and the wrappers' other parameters)."""
    seen: set[int] = set()
    for prefix, module in base_modules(model, remove_duplicate=remove_duplicate):
        for key, p in module._parameters.items():
            if p is None or (remove_duplicate and id(p) in seen):
                continue
            seen.add(id(p))
            yield (f"{prefix}.{key}" if prefix else key), p


def parameter_uses(model: nn.Module) -> Counter[int]:
    """id(parameter) -> how many names the model gives it: above 1 for a weight two modules share (a tied
    embedding and output head). The base's weights only: adapters share none."""
    return Counter(id(p) for _, p in base_parameters(model, remove_duplicate=False))


class Wrapper(nn.Module):
    """A module that stands where another was: attribute reads it lacks (`weight`, `out_features`, ...) go to the
    module it wraps (`target()`), so code that inspects the model keeps working."""

    # the submodule that must exist before reads are forwarded (during __init__ it does not yet)
    _inner = "base_layer"

    def target(self) -> nn.Module:
        return self.base_layer

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or self._inner not in self.__dict__["_modules"]:
                raise
            return getattr(self.target(), name)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at `name` ("model.layers.0.mlp.up_proj"; "" is not a submodule) in `model`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
