"""Adapter files in PEFT's layout (`adapter_config.json` + `adapter_model.safetensors`): load, check, save,
describe.

The public functions ask the folder's (or the adapter's) format once (`lorakit.formats`) and hand over to its
hooks; PEFT's LORA layout itself is `lorakit.lora_format`, and plug-ins register theirs. A load is planned (every
file and shape check) before the model changes, then applied. Writes are atomic; pickled files are refused by
default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.control import set_active
from lorakit.errors import AdapterError
from lorakit.formats import (
    AdapterFormat,
    after_load,
    folder_format,
    model_format,
)
from lorakit.lora_format import read_adapter, save_lora  # noqa: F401  (read_adapter re-exported; importing it registers the LORA format)

# --------------------------------------------------------------------------------------------------------------
# The public functions: one question to the folder's (or the adapter's) format, then its hooks
# --------------------------------------------------------------------------------------------------------------


@dataclass
class LoadPlan:
    """A folder read and checked against a model, ready to apply: its format, and what the format needs."""

    path: Path
    format: AdapterFormat
    payload: Any

    @property
    def peft_type(self) -> str:
        return self.format.peft_type


def plan_adapter(
    model: nn.Module, path: str | os.PathLike, name: str | None = None, *, allow_pickle: bool = False
) -> LoadPlan:
    """Read adapter folder `path` and check it against `model` as adapter `name`, without changing the model."""
    path = Path(path)
    fmt, raw = folder_format(path)
    return LoadPlan(path, fmt, fmt.plan(model, path, raw, name or "default", allow_pickle))


def apply_plan(
    model: nn.Module, plan: LoadPlan, name: str | None = None, *, activate=True, trainable=False
) -> str:
    """Put a planned adapter on `model`; returns its name there. On any error the model is left as it was."""
    name = plan.format.apply(model, plan.payload, name or "default", trainable)
    after_load(model, plan.path)
    if activate and plan.format.activates:
        set_active(model, name)
    return name


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    name: str | None = None,
    *,
    allow_pickle: bool = False,
    activate: bool = True,
    trainable: bool = False,
) -> str:
    """Load a PEFT-layout adapter into `model` (injecting wrappers as needed). Returns the adapter name.

    Everything is checked before the model changes: on any error the model is left exactly as it was.
    A ladder folder (peft_type LADDER) attaches its side network instead and returns "ladder".
    """
    plan = plan_adapter(model, path, name, allow_pickle=allow_pickle)
    return apply_plan(model, plan, name, activate=activate, trainable=trainable)


def check_adapter(model: nn.Module, path: str | os.PathLike, *, allow_pickle: bool = False) -> None:
    """Raise the error `load_adapter` would raise for this file on this model, without changing the model."""
    fmt, raw = folder_format(path)
    fmt.plan(model, Path(path), raw, "default", allow_pickle)


def save_adapter(
    model: nn.Module, path: str | os.PathLike, name: str = "default", *, plain: bool = False
) -> Path:
    """Write adapter `name` as a PEFT folder at `path`, atomically: a crash leaves any previous folder intact.

    `plain`: write a KaSA or BD-LoRA adapter as the plain LoRA pair of its change to the original W0 (KaSA: rank
    2r), which runtimes that know plain LoRA only load (vLLM, PEFT without the variant); other LoRA adapters are
    written as they are, and what no LoRA pair expresses (DoRA, lora_bias, aLoRA) is refused."""
    fmt = model_format(model, name)
    if not plain:
        return fmt.save(model, Path(path), name)
    if fmt.save is not save_lora:
        raise AdapterError(f"adapter {name!r} is {fmt.label}, which has no plain LoRA form")
    return save_lora(model, Path(path), name, plain=True)


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors PEFT saves for adapter `name` (keys without the adapter name), detached copies."""
    fmt = model_format(model, name)
    if fmt.state_dict is None:
        raise AdapterError(f"{fmt.label} adapter {name!r} has no PEFT state dict; save it with save_adapter")
    return fmt.state_dict(model, name)


def describe_adapter(path: str | os.PathLike) -> dict[str, Any]:
    """Config and per-module shapes of an adapter folder, without a model (a ladder folder: its description)."""
    fmt, raw = folder_format(path)
    return fmt.describe(Path(path), raw)
