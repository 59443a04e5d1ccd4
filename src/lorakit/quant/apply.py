"""Quantize a model's linear layers in place (QLoRA's frozen 4-bit base), undo it, and describe it.

`quantize` swaps every plain `nn.Linear` for an `NF4Linear`, except the output head (by default), layers whose
size is not a multiple of the block size, and layers whose weight is shared with another module (tied
embeddings); those stay in full precision and the report says why. LoRA is injected afterwards, on top.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import AdapterFileError, QuantizationError
from lorakit.formats import WEIGHTS_NAME
from lorakit.handlers import handler_for
from lorakit.layers import LoraLayer
from lorakit.quant import bnb
from lorakit.quant.nf4 import BLOCK_SIZE, NF4Linear
from lorakit.readers import safetensors_metadata
from lorakit.task_types import task_heads, task_type_for
from lorakit.walk import base_modules, parameter_uses, set_submodule

log = logging.getLogger(__name__)

METHODS = ("nf4",)
METADATA_KEY = "lorakit.base_quantization"  # safetensors metadata of adapters trained on a quantized base


@dataclass
class QuantReport:
    """What `quantize` did. Bits per parameter count the quantized layers' weights only (codes and block
    constants, measured from their buffers; biases stay full precision and are not counted)."""

    method: str
    double_quant: bool
    block_size: int
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # module -> why it stayed full precision
    params: int = 0  # weights quantized
    bytes_before: int = 0  # those weights in their original dtype
    bytes_after: int = 0  # the buffers that now encode them

    @property
    def bits_per_param(self) -> float:
        return 8 * self.bytes_after / self.params if self.params else 0.0

    def summary(self) -> str:
        dq = "double quant" if self.double_quant else "no double quant"
        line = (
            f"{self.method} ({dq}, blocks of {self.block_size}): {len(self.quantized)} linear layers, "
            f"{self.params:,} weights, {self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB "
            f"({self.bits_per_param:.3f} bits/param)"
        )
        if self.skipped:
            line += f"; {len(self.skipped)} left in full precision: " + "; ".join(
                f"{n} ({why})" for n, why in self.skipped.items()
            )
        return line


def quantized_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every 4-bit linear layer: ours and bitsandbytes' `Linear4bit`."""
    return [(n, m) for n, m in base_modules(model) if isinstance(m, NF4Linear) or bnb.is_linear4bit(m)]


def is_quantized(model: nn.Module) -> bool:
    return bool(quantized_modules(model))


def quant_stats(model: nn.Module) -> dict[str, Any] | None:
    """Storage of the 4-bit layers, measured from their tensors: method, double_quant, layers, params (weights
    they encode), bytes, bits_per_param. None for a model without 4-bit layers."""
    found = quantized_modules(model)
    if not found:
        return None
    params = sum(m.in_features * m.out_features for _, m in found)
    nbytes = sum(m.storage_bytes() if isinstance(m, NF4Linear) else bnb.storage_bytes(m) for _, m in found)
    info = base_quantization(model) or {}
    return {
        "method": info.get("method"),
        "double_quant": info.get("double_quant"),
        "layers": len(found),
        "params": params,
        "bytes": nbytes,
        "bits_per_param": 8 * nbytes / params,
    }


def quantize(
    model: nn.Module,
    method: str = "nf4",
    double_quant: bool = True,
    skip: tuple[str, ...] | list[str] = ("lm_head",),
    *,
    block_size: int = BLOCK_SIZE,
    source: Callable[[str], torch.Tensor] | None = None,
) -> QuantReport:
    """Replace the model's `nn.Linear` layers in place with 4-bit `NF4Linear` ones (QLoRA's frozen base).

    `skip`: module names (exact, or a suffix after a dot) to keep in full precision; the output head by default.
    A classification model's task head (a reward model's `score`) is never quantized: it is new and trained
    whole. Quantize before injecting LoRA. Raises QuantizationError on an unknown method, a model that is already
    quantized, or one that already carries LoRA adapters.

    `source` (used by `load_quantized`): called with "<module>.weight" to read each weight just before it is
    quantized, so the model's own full-precision weights can be left unmaterialised; one layer is in full
    precision at a time.
    """
    _check_quantizable(model, method)
    if isinstance(skip, str):
        skip = (skip,)
    skip = (*skip, *(h for h in task_heads(model, task_type_for(model)) if h not in skip))
    report = QuantReport(method=method, double_quant=double_quant, block_size=block_size)
    shared = _shared_weights(model)
    for name, m in list(model.named_modules()):
        if type(m) is not nn.Linear:
            continue
        why = _reason_to_skip(name, m, skip, block_size, shared)
        if why:
            report.skipped[name] = why
            continue
        report.params += m.weight.numel()
        report.bytes_before += m.weight.numel() * m.weight.element_size()
        if source is not None:
            m.weight.data = source(f"{name}.weight")
        q = NF4Linear.from_linear(m, double_quant=double_quant, block_size=block_size)
        if source is not None:
            m.weight.data = torch.empty(0, dtype=m.weight.dtype)  # free the full-precision copy now
            q.source = functools.partial(source, f"{name}.weight")  # W0 read again on demand (LoftQ init)
        set_submodule(model, name, q)
        report.quantized.append(name)
        report.bytes_after += q.storage_bytes()
    if not report.quantized:
        raise QuantizationError(
            f"no linear layer of {type(model).__name__} could be quantized: {report.skipped}"
        )
    model.__dict__["_lorakit_quant"] = {
        "method": method,
        "block_size": block_size,
        "double_quant": double_quant,
        "skip": list(skip),
    }
    for name, why in report.skipped.items():
        if not any(_matches(name, s) for s in skip):
            log.warning("left %s in full precision: %s", name, why)
    log.info("quantized %s", report.summary())
    return report


def _check_quantizable(model: nn.Module, method: str) -> None:
    """Raise QuantizationError on an unknown method, an already quantized model, or one with LoRA adapters."""
    if method not in METHODS:
        raise QuantizationError(f"unknown quantization method {method!r}; supported: {', '.join(METHODS)}")
    done = quantized_modules(model)
    if done:
        name, m = done[0]
        raise QuantizationError(
            f"{type(model).__name__} is already quantized ({len(done)} 4-bit layers, e.g. {name!r}: "
            f"{type(m).__name__}); quantize a full-precision model, once"
        )
    if "_lorakit" in model.__dict__:
        raise QuantizationError(
            "the model already has LoRA adapters: quantize the base first, then inject or load adapters"
        )


def _reason_to_skip(name: str, m: nn.Linear, skip, block_size: int, shared: set[int]) -> str | None:
    if any(_matches(name, s) for s in skip):
        return "in the skip list"
    n = m.weight.numel()
    if n % block_size:
        return (
            f"{m.out_features}x{m.in_features} = {n:,} weights is not a multiple of the block size {block_size}; "
            "left unquantized (not padded)"
        )
    if id(m.weight) in shared:
        return "weight shared with another module (tied); quantizing it would untie them"
    if not m.weight.dtype.is_floating_point:
        return f"weight dtype {m.weight.dtype} is not floating point"
    return None


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def _shared_weights(model: nn.Module) -> set[int]:
    return {k for k, uses in parameter_uses(model).items() if uses > 1}


@torch.no_grad()
def dequantize(model: nn.Module) -> nn.Module:
    """Replace every 4-bit linear layer (ours or bitsandbytes') with an `nn.Linear` holding its dequantized
    weight, in place; LoRA wrappers keep their adapters. Merging is then possible. Returns `model`."""
    wrappers = {id(m.base_layer): m for _, m in base_modules(model) if isinstance(m, LoraLayer)}
    for name, q in quantized_modules(model):
        w = q.dequantize() if isinstance(q, NF4Linear) else bnb.dequantize_linear4bit(q, bnb.weight_dtype(q))
        lin = nn.Linear(q.in_features, q.out_features, bias=False, device=w.device, dtype=w.dtype)
        lin.weight = nn.Parameter(w, requires_grad=id(q) not in wrappers)
        lin.bias = q.bias
        layer = wrappers.get(id(q))
        if layer is not None:
            layer.base_layer = lin
            layer.handler = handler_for(lin)
        else:
            set_submodule(model, name, lin)
    model.__dict__.pop("_lorakit_quant", None)
    return model


def base_quantization(model: nn.Module) -> dict[str, Any] | None:
    """How the model's base is quantized, or None: `lorakit.quantize`'s settings, or those read off
    bitsandbytes layers (with `skip` = the plain linear layers it left)."""
    info = model.__dict__.get("_lorakit_quant")
    if info is not None:
        return dict(info)
    found = quantized_modules(model)
    if not found:
        return None
    first = found[0][1]
    if bnb.is_linear4bit(first):
        info = bnb.settings(first)
    else:
        info = {"method": "nf4", "block_size": first.block_size, "double_quant": first.double_quant}
    plain = [
        n.replace(".base_layer", "")
        for n, m in model.named_modules()
        if type(m) is nn.Linear and not isinstance(m, LoraLayer)
    ]
    return {**info, "skip": plain}


def adapter_metadata(model: nn.Module) -> dict[str, str]:
    """Safetensors metadata recording the quantized base an adapter was trained on ({} for full precision).

    Kept out of adapter_config.json so that the folder stays exactly what PEFT writes and reads silently."""
    info = base_quantization(model)
    return {METADATA_KEY: json.dumps(info, sort_keys=True)} if info else {}


def adapter_base_quantization(path: str | os.PathLike) -> dict[str, Any] | None:
    """The quantized base recorded in an adapter folder's safetensors metadata, or None."""

    file = Path(path) / WEIGHTS_NAME
    if not file.exists():
        return None
    raw = safetensors_metadata(file).get(METADATA_KEY)  # a corrupt file: AdapterFileError naming it
    try:
        info = json.loads(raw) if raw else None
    except ValueError:
        raise AdapterFileError(f"{file}: unreadable {METADATA_KEY} metadata {raw[:60]!r}") from None
    return info if isinstance(info, dict) else None


def note_adapter_base(model: nn.Module, path: str | os.PathLike) -> None:
    """Log a note when an adapter trained on a quantized base is loaded onto a full-precision one (allowed)."""
    info = adapter_base_quantization(path)
    if info and not is_quantized(model):
        log.warning(
            "%s was trained on a %s-quantized base; loading it onto this full-precision base works, but outputs "
            "differ slightly from the training-time model (quantize the base the same way with "
            "lorakit.quantize to reproduce it exactly)",
            path,
            info.get("method"),
        )
