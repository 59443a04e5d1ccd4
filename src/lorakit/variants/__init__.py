"""LoRA flavours, one small file each, plugged into `LoraLayer` through the `Variant` strategy interface.

Variants whose state is not in PEFT's tensors (DyLoRA's nesting of ranks) record it in the adapter file's
safetensors metadata, which PEFT never reads: the folder stays exactly what PEFT writes and loads silently.
`RESTORERS` maps a metadata key to the function that puts the variant back on a freshly loaded adapter.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from torch import nn

RESTORERS = {"lorakit.dylora": "lorakit.variants.dylora:restore"}
"""Safetensors metadata key -> "module:function(model, adapter_name, value)" called after loading."""


def variant_metadata(model: nn.Module, name: str) -> dict[str, str]:
    """The metadata the variants of adapter `name` want written into its safetensors file."""
    from lorakit.inject import lora_layers

    out: dict[str, str] = {}
    for _, layer in lora_layers(model):
        if name in layer.adapters:
            out.update(layer.adapters[name].variant.metadata())
    return out


def read_metadata(path: Path) -> dict[str, str]:
    """The safetensors metadata of the adapter folder `path` ({} if there is none)."""
    from lorakit.io import WEIGHTS_NAME
    from lorakit.readers import safetensors_metadata

    file = Path(path) / WEIGHTS_NAME
    return safetensors_metadata(file) if file.exists() else {}


def restore_variants(model: nn.Module, name: str, path: Path) -> None:
    """After `load_adapter` copied the tensors: give adapter `name` back the variants its file records."""
    meta = read_metadata(path)
    for key, target in RESTORERS.items():
        if key in meta:
            module, _, func = target.partition(":")
            getattr(importlib.import_module(module), func)(model, name, meta[key])
