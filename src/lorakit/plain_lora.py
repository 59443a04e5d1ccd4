"""Adapters whose init moved s·B0·A0 out of W0 (PiSSA, OLoRA, CorDA, LoRA-GA, randomised PiSSA), as plain LoRA on
the original W0: rank 2r, A' = [A; A0] and B' = [B, −B0] with the same s (PEFT's conversion at save, with
`path_initial_model_for_weight_conversion`).

- `with_starts` (save): an adapter whose start came from data or random draws (`LoraAdapter.start`) is written so,
  since no load could compute that start again.
- `as_plain_lora` (load): a PiSSA or OLoRA file, whose start a load computes again from W0, becomes so, which
  leaves the base weight alone for the other adapters.
- `doubled`: the config of such an adapter.
- `plain_file` (save with `plain=True`): an adapter of a variant whose change to W0 is a LoRA pair (KaSA, BD-LoRA)
  written as that pair, for runtimes that know plain LoRA only.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import AdapterError
from lorakit.formats import PREFIX
from lorakit.handlers import handler_for
from lorakit.layers import INIT_FACTORS, LoraLayer, Variant
from lorakit.registry import adapter_layers


def with_starts(model: nn.Module, name: str, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> LoraConfig:
    """When adapter `name` keeps the start its init computed from data or random draws (CorDA, LoRA-GA, randomised
    PiSSA), make its file `tensors` (PEFT keys) plain LoRA on the original W0, in place, and return the doubled
    config; else return `config` as it is."""
    started = {m: layer.adapters[name].start for m, layer in adapter_layers(model, name)}
    if all(v is None for v in started.values()):
        return config
    if any(v is None for v in started.values()):
        raise AdapterError(f"adapter {name!r} has a data-driven start on some of its modules only; cannot save it")
    for m, (a0, b0) in started.items():
        a, b = f"{PREFIX}{m}.lora_A.weight", f"{PREFIX}{m}.lora_B.weight"
        tensors[a] = torch.cat([tensors[a], a0.to(tensors[a].dtype)]).contiguous()
        tensors[b] = torch.cat([tensors[b], -b0.to(tensors[b].dtype)], dim=1).contiguous()
    return doubled(config)


@torch.no_grad()
def as_plain_lora(
    model: nn.Module, config: LoraConfig, copies: list[tuple[str, str, torch.Tensor]]
) -> tuple[LoraConfig, list[tuple[str, str, torch.Tensor]]]:
    """A PiSSA or OLoRA adapter, whose B·A is relative to W0 − s·B0·A0, as plain LoRA on the original W0: rank 2r,
    A' = [A; A0] and B' = [B, −B0] with the same s (PEFT's conversion at save, with
    path_initial_model_for_weight_conversion). B0 and A0 are computed again from W0, as its init computed them.

    Loaded so, the adapter leaves the base weight alone, as every other adapter does: an adapter bank (`lorakit
    serve`) can hold it beside others, it merges and unloads like them, and it exports to llama.cpp as a pair.
    The config's ranks double and its alphas grow to keep s (2×, or √2× with rsLoRA)."""
    factors = INIT_FACTORS[config.init]
    start: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # module -> (A0, B0)
    out = []
    for module, attr, t in copies:
        if attr in ("lora_A", "lora_B") and module not in start:
            layer = model.get_submodule(module)
            handler = handler_for(layer)
            base = layer.base_layer if isinstance(layer, LoraLayer) else layer
            if handler is None or handler.quantized or not handler.linear:
                raise AdapterError(
                    f"{module}: a {config.init} adapter needs a full-precision linear base layer, not "
                    f"{type(base).__name__}"
                )
            w = handler.weight(base).float()
            if isinstance(layer, LoraLayer):  # another PiSSA adapter moved a part of W0: the original is W0 + it
                for other in layer.adapters.values():
                    if other.base_residual is not None:
                        w = w + other.base_residual.float()
            start[module] = factors(handler.to_2d(w), config.rank_for(module), config.scaling_for(module))
        if attr == "lora_A":
            t = torch.cat([t, start[module][0].to(t.dtype)])
        elif attr == "lora_B":
            t = torch.cat([t, -start[module][1].to(t.dtype)], dim=1)
        out.append((module, attr, t))
    return doubled(config), out


@torch.no_grad()
def plain_file(model: nn.Module, name: str, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> LoraConfig:
    """Adapter `name`'s file `tensors` (PEFT keys) rewritten in place as plain LoRA with the same change to the
    original W0, for runtimes that know LoRA pairs only (vLLM, PEFT without the variant): each module's pair from
    its variant's `plain_pair` (KaSA: rank 2r, BD-LoRA: the dense factors); the variant's own tensors dropped.
    Returns the file's config. Raises AdapterError, before changing anything, for a variant that is no LoRA pair."""
    todo = {}
    for m, layer in adapter_layers(model, name):
        adapter = layer.adapters[name]
        variant = adapter.variant
        if not variant.plain:
            raise AdapterError(f"adapter {name!r} cannot be written as plain LoRA: {variant.not_plain_because}")
        pair = variant.plain_pair(adapter)
        if pair is not None:
            todo[m] = (layer, variant, pair)
    grown = {pair[0].shape[0] / layer.adapters[name].r for layer, _, pair in todo.values()}
    if len(grown) > 1 or not grown <= {1.0, 2.0}:
        raise AdapterError(f"adapter {name!r}: its modules' plain pairs grow the rank unevenly ({sorted(grown)})")
    for m, (layer, variant, (A, B)) in todo.items():
        for suffix in variant.tensor_names(layer.handler).values():
            tensors.pop(f"{PREFIX}{m}.{suffix}", None)
        a, b = Variant().tensor_names(layer.handler).values()
        tensors[f"{PREFIX}{m}.{a}"] = A.detach().clone().contiguous()
        tensors[f"{PREFIX}{m}.{b}"] = B.detach().clone().contiguous()
    if grown == {2.0}:
        config = doubled(config)
    return config.replace(use_kasa=False, use_bdlora=None)


def doubled(config: LoraConfig) -> LoraConfig:
    """The config of an adapter written as plain LoRA [A; A0], [B, −B0]: init default, ranks doubled, alphas grown
    to keep s (2×, or √2× with rsLoRA)."""
    grow = 2.0**0.5 if config.use_rslora else 2.0
    return config.replace(
        init="default",
        pissa_niter=0,
        r=2 * config.r,
        alpha=grow * config.alpha,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: grow * v for k, v in config.alpha_pattern.items()},
    )
