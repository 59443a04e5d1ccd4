"""Random adapters for the benchmarks, saved as PEFT folders: each changes the model's output (B is not zero)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def save_random(model, folders: Sequence[Path], config, *, std: float) -> list[Path]:
    """For each folder i: an adapter with `config` on `model`, drawn after `torch.manual_seed(i)` (its init, plus
    normal noise of `std` on every tensor), saved there and removed from the model. Returns the folders."""
    import torch

    import lorakit

    saved = []
    for i, folder in enumerate(folders):
        torch.manual_seed(i)
        lorakit.inject(model, config, name="random")
        with torch.no_grad():
            for p in lorakit.adapter_parameters(model, "random"):
                p.add_(torch.randn_like(p) * std)
        saved.append(lorakit.save_adapter(model, folder, "random"))
        lorakit.delete_adapter(model, "random")
    return saved
