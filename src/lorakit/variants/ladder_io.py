"""Ladder adapter folders: `adapter_config.json` with our own keys (peft_type "LADDER") + the side network's
tensors in `adapter_model.safetensors`. Registered in lorakit.formats, so `load_adapter`, `check_adapter`,
`describe_adapter` and `save_adapter(model, path, "ladder")` handle them; `lorakit inspect` prints
`format_ladder`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import AdapterError, AdapterFileError, ConfigError
from lorakit.formats import (
    CONFIG_NAME,
    AdapterFormat,
    file_metadata,
    read_tensors,
    register_format,
    write_folder,
)
from lorakit.readers import read_json
from lorakit.registry import adapter_names
from lorakit.variants.ladder import (
    NAME,
    PEFT_TYPE,
    LadderConfig,
    SideNetwork,
    attach_ladder,
    build_side,
    find_decoder,
    ladder_of,
)

log = logging.getLogger(__name__)


def is_ladder_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is an adapter folder whose config says peft_type LADDER."""
    cfg = Path(path) / "adapter_config.json"
    try:
        return json.loads(cfg.read_text()).get("peft_type") == PEFT_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def save_ladder(model: nn.Module, path: str | os.PathLike, *, base_model: str | None = None) -> Path:
    """Write the attached side network as an adapter folder, atomically."""
    side = ladder_of(model)
    if side is None:
        raise AdapterError(f"{type(model).__name__} has no ladder side network to save")
    tensors = {k: v.detach().clone().contiguous() for k, v in side.state_dict().items()}
    base = base_model or getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config = {
        "peft_type": PEFT_TYPE,
        "lorakit_method": "ladder",
        "base_model_name_or_path": base,
        **asdict(side.config),
        "hidden_size": side.hidden,
        "side_width": side.width,
        "ladder_layers": side.layers,
        "num_layers": len(find_decoder(model)[1]),
    }
    write_folder(Path(path), tensors, config, file_metadata(model, NAME))
    log.info("saved ladder side network (%d tensors) to %s", len(tensors), path)
    return Path(path)


def read_ladder(path: str | os.PathLike) -> tuple[LadderConfig, dict[str, Any], dict[str, torch.Tensor]]:
    """(config, raw json, tensors) of a ladder folder."""
    path = Path(path)
    raw = read_json(path / CONFIG_NAME)
    known = {f.name for f in fields(LadderConfig)}
    try:
        cfg = LadderConfig(**{k: v for k, v in raw.items() if k in known})
    except (TypeError, ConfigError) as e:
        raise AdapterFileError(f"{path / CONFIG_NAME}: {e}") from None
    return cfg, raw, read_tensors(path, allow_pickle=False)


def plan_ladder(model: nn.Module, path: str | os.PathLike) -> tuple[LadderConfig, SideNetwork]:
    """The side network stored at `path`, built and filled for `model` but not attached; the model is unchanged.
    AdapterError if it does not fit."""
    cfg, raw, tensors = read_ladder(path)
    side, _ = build_side(model, cfg)
    n_layers = len(find_decoder(model)[1])
    if raw.get("num_layers", n_layers) != n_layers or raw.get("hidden_size", side.hidden) != side.hidden:
        raise AdapterError(
            f"{path}: ladder was trained on a model with {raw.get('num_layers')} blocks of size "
            f"{raw.get('hidden_size')}, but {type(model).__name__} has {n_layers} of size {side.hidden}"
        )
    expected = side.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    bad = [k for k in expected if k in tensors and tuple(tensors[k].shape) != tuple(expected[k].shape)]
    if missing or extra or bad:
        what = (
            f"missing {missing[:3]}"
            if missing
            else f"unexpected {extra[:3]}"
            if extra
            else f"shape of {bad[:3]}"
        )
        raise AdapterError(f"{path}: ladder tensors do not fit {type(model).__name__}: {what}")
    ref = next(iter(expected.values()))
    with torch.no_grad():
        side.load_state_dict({k: t.to(ref.dtype) for k, t in tensors.items()})
    return cfg, side


def load_ladder(model: nn.Module, path: str | os.PathLike, *, trainable: bool = False) -> str:
    """Attach the side network stored at `path` to `model`; checked before the model changes. Returns "ladder"."""
    return _apply(model, plan_ladder(model, path), NAME, trainable)


def _apply(model: nn.Module, plan: tuple[LadderConfig, SideNetwork], name: str, trainable: bool) -> str:
    cfg, side = plan
    attach_ladder(model, cfg, side=side)
    side.requires_grad_(trainable)
    return NAME


def _owns(model: nn.Module, name: str) -> bool:
    return name == NAME and ladder_of(model) is not None and name not in adapter_names(model)


def describe_ladder(path: str | os.PathLike) -> dict[str, Any]:
    """Config and parameter counts of a ladder folder, without a model."""
    cfg, raw, tensors = read_ladder(path)
    return {
        "kind": "ladder",
        "config": {k: v for k, v in raw.items()},
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors.values()),
        "gates": torch.sigmoid(tensors["alpha"].float() / cfg.temperature).tolist()
        if "alpha" in tensors
        else [],
    }


def format_ladder(info: dict[str, Any]) -> str:
    """A few lines describing a ladder folder (for `lorakit inspect`)."""
    c = info["config"]
    gates = " ".join(f"{g:.2f}" for g in info["gates"])
    return "\n".join(
        [
            f"Ladder side network: block={c.get('block')} width={c.get('side_width')} (hidden {c.get('hidden_size')} "
            f"/ reduction {c.get('reduction')}) rank={c.get('rank')} every={c.get('every')} T={c.get('temperature')}",
            f"ladders from blocks {c.get('ladder_layers')} of {c.get('num_layers')}; base model: "
            f"{c.get('base_model_name_or_path')}",
            f"gates μ: {gates}",
            f"{info['parameters']:,} parameters in {info['tensors']} tensors; not mergeable into the base",
        ]
    )


register_format(
    AdapterFormat(
        peft_type=PEFT_TYPE,
        label="ladder",
        plan=lambda model, path, raw, name, allow_pickle: plan_ladder(model, path),
        apply=_apply,
        owns=_owns,
        save=lambda model, path, name: save_ladder(model, path),
        describe=lambda path, raw: describe_ladder(path),
        activates=False,
    )
)
