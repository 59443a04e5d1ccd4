"""Many adapters on one base: activate, weight, disable, merge and unmerge.

Switching is a change of small per-layer dicts; base weights are never copied or reloaded. Merging folds the
active adapters into the base weights (exact up to fp rounding) and is undone by `unmerge`, in reverse order.
A merge is all or nothing: every layer's merged weight is computed in a copy and checked finite before any is
assigned. Plug-ins whose adapters are no weight delta (the ladder) refuse merging through `register_merge_guard`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from lorakit.errors import AdapterError, QuantizationError
from lorakit.params import param_wrappers
from lorakit.registry import adapter_names, lora_layers, registry, uses_wrappers
from lorakit.saved import activate, check_activation, set_disabled
from lorakit.tying import merges_as_one
from lorakit.walk import parameter_uses

log = logging.getLogger(__name__)

MERGE_GUARDS: list[Callable[[nn.Module], str | None]] = []
"""Functions model -> a reason the model's adapters cannot be merged, or None; `merge` asks each first."""


def register_merge_guard(guard: Callable[[nn.Module], str | None]) -> None:
    """Make `merge` refuse (AdapterError with the reason) whenever `guard(model)` returns a reason."""
    MERGE_GUARDS.append(guard)


FOLDER_USES = ("bank", "merge", "gguf")
FOLDER_CHECKS: list[Callable[[dict[str, Any], str], str | None]] = []
"""Functions (an adapter folder's adapter_config.json content, a use) -> a reason the adapter cannot serve that use,
or None. The uses: "bank" (an AdapterBank, lorakit serve), "merge" (lorakit merge, merged_model), "gguf" (a
llama.cpp file). `lorakit.formats.folder_refusal` asks each before any model loads."""


def register_folder_check(check: Callable[[dict[str, Any], str], str | None]) -> None:
    """Make a bank, lorakit merge and GGUF export refuse a folder whenever `check(config, use)` gives a reason."""
    FOLDER_CHECKS.append(check)


def set_active(model: nn.Module, adapters: str | list[str] | dict[str, float]) -> None:
    """Activate one adapter, several (weight 1 each), or several with weights: {name: weight}.

    If adapters are merged and the active set changes, they are unmerged first so the base weights stay exact.
    A module that adapters save whole (modules_to_save) runs the copy of the one active adapter that has it; two
    active adapters with copies of the same module, or a copy at a weight other than 1, are refused.
    """
    wanted = _as_weights(adapters)
    known = adapter_names(model)
    for name in wanted:
        if name not in known:
            raise AdapterError(f"no adapter {name!r} on {type(model).__name__}; adapters: {known}")
    wrapped = uses_wrappers(model)
    if wrapped:
        check_activation(model, wanted)
    if _any_merged(model) and active_adapters(model) != wanted:
        unmerge(model)
    for _, layer in lora_layers(model):
        layer.active = {n: w for n, w in wanted.items() if n in layer.adapters}
        layer.refresh()
    if wrapped:
        activate(model, wanted)
        for _, wrapper in param_wrappers(model):
            wrapper.active = {n: w for n, w in wanted.items() if n in wrapper.lora}
    registry(model).active = dict(wanted)


def active_adapters(model: nn.Module) -> dict[str, float]:
    """The active adapters and their weights."""
    reg = model.__dict__.get("_lorakit")
    return dict(getattr(reg, "active", {}) or {})


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the plain base model inside the block; merged adapters are unmerged and merged back afterwards."""
    layers = [layer for _, layer in lora_layers(model)]
    was_merged = _any_merged(model)
    if was_merged:
        unmerge(model)
    for layer in layers:
        layer.disabled = True
        layer.refresh()
    params = [w for _, w in param_wrappers(model)] if uses_wrappers(model) else []
    set_disabled(model, True, walk=uses_wrappers(model))
    for wrapper in params:
        wrapper.disabled = True
    try:
        yield model
    finally:
        for wrapper in params:
            wrapper.disabled = False
        set_disabled(model, False, walk=uses_wrappers(model))
        for layer in layers:
            layer.disabled = False
            layer.refresh()
        if was_merged:
            merge(model)


@contextmanager
def merged(model: nn.Module, *, or_unmerged: bool = False) -> Iterator[nn.Module]:
    """Run the block with the active adapters merged (fast inference), then restore the previous state.

    The unmerge subtracts what the merge added, so the base weights come back within a rounding of their dtype,
    not always bitwise. On SmolLM2 with a random adapter on every linear layer, 5.2% of those weights came back
    changed in float32, by up to 2.4e-7, and 11.8% in bfloat16, by up to 0.016 (benchmarks/merge_roundtrip.py).

    `or_unmerged`: when the adapters cannot be merged (a lora_bias on a layer without a bias, a 4-bit base, ...),
    run the block with the model as it is instead of raising; for inference that merges only to be faster. A
    refused merge changes nothing."""
    was_merged = _any_merged(model)
    try:
        merge(model)
    except (AdapterError, QuantizationError) as e:  # merge is all or nothing: the model is as it was
        if not or_unmerged:
            raise
        log.info("running unmerged: %s", e)
        was_merged = True  # nothing to undo
    try:
        yield model
    finally:
        if not was_merged:
            unmerge(model)


def merge(model: nn.Module) -> None:
    """Fold the active adapters (with their weights) into the base weights. Merging twice changes nothing.

    All or nothing: a refusal, or a layer whose merged weight would not be finite, leaves every weight as it was.
    """
    _check_mergeable(model)
    layers = list(lora_layers(model))
    for name, layer in layers:  # every result checked before any weight changes (one layer's copy at a time)
        try:
            layer.merged_weight()
        except AdapterError as e:
            raise AdapterError(f"{name}: {e}") from None
    _untie_merged_weights(model)
    for _, layer in layers:
        layer.merge_active()
    for _, wrapper in param_wrappers(model) if uses_wrappers(model) else ():  # target_parameters
        wrapper.merge()


def _check_mergeable(model: nn.Module) -> None:
    for guard in MERGE_GUARDS:
        reason = guard(model)
        if reason:
            raise AdapterError(reason)
    for name, layer in lora_layers(model):
        active = [n for n in layer.active if n in layer.adapters]
        refusal = layer.handler.merge_refusal(layer.base_layer) if active else None
        if refusal:  # e.g. a 4-bit base
            raise QuantizationError(f"{name}: {refusal}")
        alone = [n for n in active if layer.adapters[n].variant.merges_alone]
        if alone and len(layer.active) > 1:
            label = layer.adapters[alone[0]].variant.label
            raise AdapterError(
                f"cannot merge {label} adapter {alone[0]!r} together with others in {name!r}; merge one at a time"
            )


def unmerge(model: nn.Module) -> None:
    """Undo `merge`: subtract the merged adapters from the base weights, newest first. No-op if nothing is merged."""
    for _, layer in lora_layers(model):
        layer.unmerge_all()
    for _, wrapper in param_wrappers(model) if uses_wrappers(model) else ():
        wrapper.unmerge()


def _any_merged(model: nn.Module) -> bool:
    return any(layer.merged for _, layer in lora_layers(model)) or any(
        w.merged for _, w in (param_wrappers(model) if uses_wrappers(model) else ())
    )


def _untie_merged_weights(model: nn.Module) -> None:
    """Give each layer about to merge its own weight if the weight is shared (tied input/output embeddings).

    Merging into a tied embedding would otherwise change the output head too. The model config is marked untied so
    that `save_pretrained` writes both tensors.
    """
    counts = parameter_uses(model)
    sharing: dict[int, list] = {}  # weight -> the LoRA layers on it
    for _, layer in lora_layers(model):
        sharing.setdefault(id(layer.handler.weight(layer.base_layer)), []).append(layer)
    for name, layer in lora_layers(model):
        w = layer.handler.weight(layer.base_layer)
        group = sharing[id(w)]
        if len(group) == counts.get(id(w), 1) and merges_as_one(group):  # ensure_weight_tying: one update
            continue
        if layer.active and not layer.merged and counts.get(id(w), 1) > 1:
            layer.base_layer.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
            cfg = getattr(model, "config", None)
            if getattr(cfg, "tie_word_embeddings", False):
                cfg.tie_word_embeddings = False
            log.warning("untied %s.weight from the weights it shared before merging into it", name)


def _as_weights(adapters: str | list[str] | dict[str, float]) -> dict[str, float]:
    if isinstance(adapters, str):
        return {adapters: 1.0}
    if isinstance(adapters, dict):
        return {str(k): float(v) for k, v in adapters.items()}
    if isinstance(adapters, (list, tuple)):
        return {str(n): 1.0 for n in adapters}
    raise AdapterError(
        f"set_active takes a name, a list of names or a {{name: weight}} dict, not {type(adapters).__name__}"
    )
