"""Resumable checkpoints: trainable tensors (safetensors), optimizer and scheduler state, step, base model id.

Each checkpoint is a folder `checkpoints/step-000050/`, written atomically; the two newest are kept. Optimizer
state is saved with torch.save and read back with `weights_only=True` (tensors and numbers only, no code).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.atomic import atomic_dir
from lorakit.errors import LorakitError

KEEP = 2


class CheckpointError(LorakitError, RuntimeError):
    """A checkpoint cannot be used to resume this run."""


def save_checkpoint(
    out_dir: Path, step: int, model: nn.Module, opt, sched, cfg, *, base_model_id: str | None
) -> Path:
    root = Path(out_dir) / "checkpoints"
    path = root / f"step-{step:06d}"
    tensors = {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "trainable.safetensors"), metadata={"format": "pt"})
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp / "optimizer.pt")
        state: dict[str, Any] = {"step": step, "base_model": base_model_id, "config": cfg.to_dict()}
        (tmp / "state.json").write_text(json.dumps(state, indent=2, default=str))

    atomic_dir(path, write)
    for old in sorted(root.glob("step-*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = sorted((Path(out_dir) / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def load_checkpoint(path: Path, model: nn.Module, opt, sched, *, base_model_id: str | None) -> int:
    """Restore trainable tensors, optimizer and scheduler from `path`; return the step to continue from."""
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{path}: not a lorakit checkpoint (no state.json)")
    state = json.loads((path / "state.json").read_text())
    if base_model_id is not None and state.get("base_model") not in (None, base_model_id):
        raise CheckpointError(
            f"{path}: made with base model {state['base_model']!r}, but this run uses {base_model_id!r}"
        )
    tensors = load_file(str(path / "trainable.safetensors"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        missing = sorted(set(params) - set(tensors))[:3]
        extra = sorted(set(tensors) - set(params))[:3]
        raise CheckpointError(
            f"{path}: trainable parameters differ from this run's (missing {missing}, extra {extra})"
        )
    with torch.no_grad():
        for n, p in params.items():
            if tensors[n].shape != p.shape:
                raise CheckpointError(
                    f"{path}: {n} has shape {tuple(tensors[n].shape)}, this run has {tuple(p.shape)}"
                )
            p.copy_(tensors[n])
    blob = torch.load(path / "optimizer.pt", weights_only=True)
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    return int(state["step"])
